"""The `NEMOCONV_*` environment switches, read in one place, once.

    from nemoconv import settings
    settings.current().kernels                  # "auto" or "reference"
    with settings.override(kernels="reference"):  # tests, the CLI: in force for the block only
        ...

`current()` reads the environment the first time it is called and keeps the result (a frozen `Settings`):
the hot paths (one kernel dispatch per operation) read an attribute, not the environment. An `override`
replaces fields for the duration of a `with` block (nested blocks stack); `reload()` reads the environment
again, for code that changed it on purpose. README.md's table "Environment switches" lists the same names.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

from nemoconv.errors import NemoconvError


@dataclass(frozen=True)
class Settings:
    """Every switch, with its default (the environment variable is NEMOCONV_ + the field name, upper case)."""

    kernels: str = "auto"              # "reference": plain torch ops everywhere, on a GPU too (attention included)
    cuda_graphs: bool = True           # False (=0): decode and prefill run eagerly on CUDA
    skinny: bool = True                # False (=0): products of ≤ 16 rows on cuBLAS, not the skinny Triton kernel
    gemm: bool = True                  # False (=0): the prefill's products on cuBLAS, not our Hopper TMA GEMM
    pdl: bool = True                   # False (=0): no programmatic dependent launch of our Triton kernels (sm90+)
    autotune: str = "table"            # "full": ignore the recorded sm90 autotune choices (time every config)
    autotune_table: str | None = None  # a JSON file of your own autotune choices (kernels.autotune_choices())
    warmup: bool = True                # False (=0): no background kernel compilation while verify loads
    sdpa_masked: str = "efficient"     # "auto": let torch pick the masked-attention kernel
    no_writeback: bool = False         # True (=1): do not ask the OS to start writing shards early
    calibrator: str = "auto"           # "builtin" or "modelopt": the calibrator behind quantize's "auto"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings an environment gives (unset or empty variables keep the defaults)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            raw = environ.get("NEMOCONV_" + field.name.upper())
            if raw:
                values[field.name] = raw
        return cls().replace(**values)

    def replace(self, **changes) -> "Settings":
        """A copy with `changes` (strings as the environment spells them, or values of the field's type)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise NemoconvError(f"unknown setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{k: _parse(k, v) for k, v in changes.items()})


_CHOICES = {"kernels": ("auto", "reference"), "autotune": ("table", "full"), "sdpa_masked": ("efficient", "auto")}
# the value that flips the default
_FLAGS = {"cuda_graphs": "0", "skinny": "0", "gemm": "0", "pdl": "0", "warmup": "0", "no_writeback": "1"}


def _parse(name: str, value):
    if name in _FLAGS and isinstance(value, str):
        # as before this module: only the documented value flips the switch; anything else keeps the default
        default = getattr(Settings, name)
        return (not default) if value == _FLAGS[name] else default
    if name in _CHOICES and value not in _CHOICES[name]:
        raise NemoconvError(f"NEMOCONV_{name.upper()}={value!r}: use one of {', '.join(_CHOICES[name])}")
    return value


_lock = threading.Lock()
_environment: Settings | None = None      # read at the first current()
_overrides: list[Settings] = []           # innermost last


def current() -> Settings:
    """The settings in force: the innermost `override`'s, else the environment's (read once)."""
    if _overrides:
        return _overrides[-1]
    global _environment
    if _environment is None:
        with _lock:
            if _environment is None:
                _environment = Settings.from_environ()
    return _environment


def reload() -> Settings:
    """Read the environment again (overrides in force stay in force)."""
    global _environment
    with _lock:
        _environment = Settings.from_environ()
    return _environment


@contextmanager
def override(**changes) -> Iterator[Settings]:
    """The current settings with `changes`, in force inside the `with` block (process-wide: threads started
    by nemoconv, such as the kernel warm-up, see them too)."""
    new = current().replace(**changes)
    _overrides.append(new)
    try:
        yield new
    finally:
        # by identity: an equal Settings pushed by another block is not this one
        del _overrides[max(i for i, s in enumerate(_overrides) if s is new)]
