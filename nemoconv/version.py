"""The package version, in the foundation layer so that every layer can stamp it without importing the facade."""

__version__ = "0.1.0"
