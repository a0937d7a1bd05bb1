"""The choices the command line offers for its options (typer shows them in --help and checks them)."""

from __future__ import annotations

from enum import Enum

from nemoconv.errors import NemoconvError
from nemoconv.schemes import quantize_outputs, scheme_names


def _scheme_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The schemes are the files in mappings/ (a new file is a new choice). A broken file leaves no choice here:
    `app._run` loads the schemes before it builds the command line and reports the file and line (exit 2)."""
    try:
        return tuple(scheme_names()), tuple(quantize_outputs())
    except NemoconvError:
        return (), ()


_SCHEMES, _QUANT_OUTPUTS = _scheme_choices()
Scheme = Enum("Scheme", {name: name for name in _SCHEMES}, type=str)                          # convert --to
FromScheme = Enum("FromScheme", {name: name for name in ("auto", *_SCHEMES)}, type=str)      # --from
QuantScheme = Enum("QuantScheme", {name: name for name in _QUANT_OUTPUTS}, type=str)         # quantize --to


class DType(str, Enum):
    keep = "keep"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Preset(str, Enum):
    default = "default"
    conservative = "conservative"
    aggressive = "aggressive"


class AnalyzeMethod(str, Enum):
    fisher = "fisher"
    exact = "exact"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Calibrator(str, Enum):
    auto = "auto"
    modelopt = "modelopt"
    builtin = "builtin"


class KVCache(str, Enum):
    none = "none"
    fp8 = "fp8"


class StreamLayers(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Profile(str, Enum):
    auto = "auto"
    exact = "exact"
    bf16 = "bf16"
    fp8 = "fp8"


class VDType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
