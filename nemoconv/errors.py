"""Errors that the CLI turns into exit codes (docs/DESIGN.md §3)."""


class NemoconvError(Exception):
    """Bad input, bad usage or an I/O failure: the CLI prints one line and exits 2."""

    exit_code = 2


class VerificationFailed(Exception):
    """A checkpoint pair failed the parity gate: exit 1."""

    exit_code = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised in the main thread so that every `finally` and atomic output
    cleans up on the way out; the CLI exits 128 + the signal number. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
