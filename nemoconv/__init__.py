"""nemoconv: convert, quantize and verify NVIDIA Nemotron-H hybrid checkpoints.

Python API (mirrors the CLI, docs/DESIGN.md §4):
    ck = nemoconv.open_checkpoint(path_or_repo_id)
    nemoconv.convert(src, out, to="nemo")
    model = nemoconv.load_model(path, device="cpu", dtype=torch.float32)
"""

from nemoconv.checkpoint.local import Checkpoint, open_checkpoint
from nemoconv.commands.convert import convert
from nemoconv.errors import NemoconvError, VerificationFailed
from nemoconv.version import __version__

# `quantize`, `verify` and `analyze_fp8` (torch, transformers) are imported on first use, so `nemoconv convert`
# and `inspect` start without torch.
_LAZY = {"quantize": "nemoconv.commands.quantize", "verify": "nemoconv.commands.verify",
         "analyze_fp8": "nemoconv.quant.analyze"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_model(path, device="cpu", dtype=None, **kwargs):
    """The built-in hybrid model for a checkpoint of any scheme (see nemoconv.model)."""
    from nemoconv.model import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype, **kwargs)


__all__ = ["Checkpoint", "NemoconvError", "VerificationFailed", "analyze_fp8", "convert", "load_model", "open_checkpoint",
           "quantize", "verify", "__version__"]
