"""What every renderer shares: the console the results go to, and numbers written for people."""

from __future__ import annotations

from rich.console import Console

from nemoconv.cli.options import CliOptions


def stdout_console(options: CliOptions) -> Console:
    """A terminal gets rich's layout at its width; a pipe or a file gets lines that never wrap in the middle of
    a value (rich would otherwise wrap at 80 columns)."""
    if options.stdout_is_terminal:
        return Console()
    return Console(width=10_000, soft_wrap=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
