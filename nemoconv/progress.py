"""The one progress bar: transient, on stderr, and only on a terminal (a log or a CI capture gets nothing).

    with Progress("write FP8", quiet=quiet, unit="bytes") as progress:
        progress(done, total)           # a `(done, total)` callback, as the layer loops expect
    with Progress("verify", quiet=quiet) as progress:
        progress.phase("reference", total=len(prompts))
        progress.advance(n)

Commands take the bar's quietness from their caller; rich is imported only when a bar is shown.
"""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, description: str, *, quiet: bool = False, unit: str = "count", total: int | None = None):
        if unit not in ("count", "bytes"):
            raise ValueError(f"unit must be 'count' or 'bytes', not {unit!r}")
        self.description, self.unit, self.total = description, unit, total
        self.shown = not quiet and sys.stderr.isatty()
        self.bar = self.task = None

    def __enter__(self) -> "Progress":
        if self.shown:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as Bar

            columns = ([DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()] if self.unit == "bytes"
                       else [MofNCompleteColumn(), TimeElapsedColumn()])
            self.bar = Bar("[progress.description]{task.description}", BarColumn(), *columns,
                           console=Console(stderr=True), transient=True)
            self.bar.__enter__()
            if self.description:  # no description: the caller starts each stage with phase()
                self.task = self.bar.add_task(self.description, total=self.total)
        return self

    def __call__(self, done: int, total: int | None = None) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=done, total=total if total is not None else self.total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def phase(self, description: str, total: int | None = None) -> None:
        """Start the next stage on a fresh line (the previous one stays until the bar closes)."""
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
