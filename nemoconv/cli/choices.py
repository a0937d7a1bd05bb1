"""The choices the command line offers for its options (typer shows them in --help and checks them)."""

from __future__ import annotations

from enum import Enum


class Scheme(str, Enum):
    hf = "hf"
    nemo = "nemo"
    max = "max"
    megatron = "megatron"


class FromScheme(str, Enum):
    auto = "auto"
    hf = "hf"
    nemo = "nemo"
    max = "max"
    megatron = "megatron"


class DType(str, Enum):
    keep = "keep"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Preset(str, Enum):
    default = "default"
    conservative = "conservative"
    aggressive = "aggressive"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Calibrator(str, Enum):
    auto = "auto"
    modelopt = "modelopt"
    builtin = "builtin"


class QuantScheme(str, Enum):
    hf = "hf"
    max = "max"


class KVCache(str, Enum):
    none = "none"
    fp8 = "fp8"


class Profile(str, Enum):
    auto = "auto"
    exact = "exact"
    bf16 = "bf16"
    fp8 = "fp8"


class VDType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
