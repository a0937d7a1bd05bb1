"""Where and in which dtype the built-in model runs: one reading of `--device` and `--dtype` for every command."""

from __future__ import annotations

import torch

from nemoconv.errors import NemoconvError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device) -> torch.device:
    """auto (or None): CUDA when available, else the CPU; cpu; cuda or cuda:N, which must exist."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" or str(device).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise NemoconvError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise NemoconvError(f"--device must be auto, cpu or cuda, got {device!r}")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """auto (or None): bfloat16 on CUDA, float32 on the CPU; otherwise one of COMPUTE_DTYPES (or its short name)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in COMPUTE_DTYPES.values():
            raise NemoconvError(f"unsupported compute dtype {dtype}")
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and _ALIASES.get(dtype, dtype) in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[_ALIASES.get(dtype, dtype)]
    raise NemoconvError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
