"""What a run of the command line knows besides its command's own flags, filled once in `main` from the global
flags and the process's environment, and handed to every command through click's context (`ctx.obj`).

No NEMOCONV_* variable concerns the command line itself: the model's switches belong to nemoconv.settings,
and the calibrator's (NEMOCONV_CALIBRATOR) to quantize, where the Python API honours it as well.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable

import typer

from nemoconv.progress import Progress

# May be written anywhere on the line (`nemoconv convert A B --to nemo -q`): main moves them before the command.
GLOBAL_FLAGS = ("--quiet", "-q", "--debug")


@dataclass(frozen=True)
class CliOptions:
    quiet: bool = False  # --quiet / -q: no progress bars or summaries (errors still print)
    debug: bool = False  # --debug: a traceback instead of the one error line
    stdout_is_terminal: bool = False  # a terminal gets rich's layout; a pipe or a file gets unwrapped lines

    @classmethod
    def from_command_line(cls, flags: Iterable[str], stdout=None) -> "CliOptions":
        """From the global flags found on the command line and the stream the output goes to."""
        flags = set(flags)
        stdout = sys.stdout if stdout is None else stdout
        return cls(quiet=bool(flags & {"--quiet", "-q"}), debug="--debug" in flags,
                   stdout_is_terminal=_is_terminal(stdout))

    def progress(self, description: str, unit: str = "bytes") -> Progress:
        """The one progress bar (nemoconv.progress), silenced by --quiet; as a `(done, total)` callback."""
        return Progress(description, quiet=self.quiet, unit=unit)


def split_global_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the global flags, the rest of the line in its order)."""
    return [a for a in argv if a in GLOBAL_FLAGS], [a for a in argv if a not in GLOBAL_FLAGS]


def options_of(ctx: typer.Context) -> CliOptions:
    """The run's options: those `main` filled, or (when the typer app is driven directly) the defaults."""
    obj = ctx.find_object(CliOptions)
    return obj if obj is not None else CliOptions.from_command_line(())


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: treat it as a file
        return False
