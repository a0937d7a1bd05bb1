"""Layer 9 — the command line: flags, rendering, exit codes."""

from nemoconv.cli.app import main, run

__all__ = ["main", "run"]
