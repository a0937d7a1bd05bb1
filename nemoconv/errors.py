"""Errors that the CLI turns into exit codes (DESIGN.md §3)."""


class NemoconvError(Exception):
    """Bad input, bad usage or an I/O failure: the CLI prints one line and exits 2."""

    exit_code = 2


class VerificationFailed(Exception):
    """A checkpoint pair failed the parity gate: exit 1."""

    exit_code = 1
