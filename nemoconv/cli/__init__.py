"""Layer 9 — the command line: flags, rendering, exit codes."""

from nemoconv.cli.main import run

__all__ = ["run"]
