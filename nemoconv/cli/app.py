"""The `nemoconv` command line (docs/DESIGN.md §3): the typer app, its global options, and how a run ends.

Each command lives in its own module (cli/inspect.py, convert.py, quantize.py, verify.py, upload.py, demo.py)
and its rendering in cli/render_*.py; the commands themselves are Python functions in nemoconv.commands.
Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 130/143 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

import typer

from nemoconv.cli import convert, demo, inspect, quantize, upload, verify
from nemoconv.cli.options import CliOptions, split_global_flags
from nemoconv.cli.render import stdout_console
from nemoconv.errors import Interrupted, NemoconvError, VerificationFailed
from nemoconv.schemes import scheme_names
from nemoconv.version import __version__

app = typer.Typer(
    name="nemoconv",
    help="Convert, quantize, verify and publish NVIDIA Nemotron-H hybrid checkpoints "
    "(Hugging Face, NeMo AutoModel and MAX naming schemes).",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries (errors still print)."),
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
):
    # `main` has filled the options from these flags already; when the app is driven directly, they are filled here
    if ctx.find_object(CliOptions) is None:
        ctx.obj = CliOptions.from_command_line([flag for flag, on in (("--quiet", quiet), ("--debug", debug)) if on])
    if version:
        stdout_console(ctx.obj).print(f"nemoconv {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        stdout_console(ctx.obj).print(ctx.get_help())
        raise typer.Exit(0)


# in the order `nemoconv --help` lists them
for _command in (inspect.inspect, convert.convert, quantize.quantize, verify.verify, upload.upload, demo.demo):
    app.command()(_command)


# ---- entry point: one exit code and at most one line on stderr -------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, rest = split_global_flags(argv)
    options = CliOptions.from_command_line(flags)
    _SIGNALLED.clear()
    try:
        with _signals_unwind():
            return _run(flags + rest, options)
    except Interrupted as exc:  # arrived between installing the handlers and _run's own try
        _one_line(INTERRUPTED_LINE)
        return exc.exit_code


def _run(argv: list[str], options: CliOptions) -> int:
    click = _click()
    try:
        scheme_names()  # a broken mapping file is one line naming it (the choices need the files)
        command = typer.main.get_command(app)
        # without standalone mode Typer returns the exit code of a typer.Exit instead of raising it
        code = command.main(args=argv, prog_name="nemoconv", standalone_mode=False, obj=options)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except Interrupted as exc:
        _one_line(INTERRUPTED_LINE)
        return exc.exit_code
    except BaseException as exc:
        if _SIGNALLED and not options.debug:
            # the signal surfaced as another error (it broke an import, or library code wrapped it): an interrupt
            _one_line(INTERRUPTED_LINE)
            return 128 + _SIGNALLED[0]
        return _report(exc, click, options)


def _report(exc: BaseException, click, options: CliOptions) -> int:
    """The exit code and one line for an exception that ended a command."""
    debug = options.debug
    try:
        raise exc
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _one_line("aborted")
        return 2
    except click.exceptions.NoArgsIsHelpError as exc:
        stdout_console(options).print(exc.format_message() if hasattr(exc, "format_message") else "", markup=False,
                                      highlight=False)
        return 0
    except click.ClickException as exc:  # usage errors: one line
        _one_line(f"error: {exc.format_message()}")
        return 2
    except VerificationFailed as exc:
        if debug:
            raise
        _one_line(f"FAIL: {exc}")
        return 1
    except NemoconvError as exc:
        if debug:
            raise
        _one_line(f"error: {exc}")
        return 2
    except KeyboardInterrupt:  # raised before our handler was installed, or by code that raises it itself
        _one_line(INTERRUPTED_LINE)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback unless --debug
        if debug:
            raise
        _one_line(f"error: {type(exc).__name__}: {exc} (run with --debug for a traceback)")
        return 2


# Outputs are written into a temporary directory that is removed on the way out, and verify writes its
# record only after a complete run: an interrupt leaves nothing behind.
INTERRUPTED_LINE = "interrupted: nothing written"
INTERRUPTED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
_SIGNALLED: list[int] = []  # the signals this process received while a command ran


@contextmanager
def _signals_unwind():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so the command unwinds through its
    `finally` blocks and atomic outputs (temporary directory removed) and main returns 130/143. A second
    signal during that cleanup is ignored, so the cleanup finishes. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        _SIGNALLED.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _click():
    """The click that Typer runs on (recent Typer versions vendor their own copy)."""
    try:
        from typer import _click as vendored

        return vendored
    except ImportError:
        import click

        return click


def _one_line(message: str) -> None:
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()


def run() -> None:
    code = main()
    if code in INTERRUPTED_CODES:
        # Cleanup is done; a worker thread still finishing a read or a hash must not hold the exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

