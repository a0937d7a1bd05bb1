"""nemoconv: convert, quantize and verify NVIDIA Nemotron-H hybrid checkpoints.

Python API (mirrors the CLI, DESIGN.md §4):
    ck = nemoconv.open_checkpoint(path_or_repo_id)
    nemoconv.convert(src, out, to="nemo")
    model = nemoconv.load_model(path, device="cpu", dtype=torch.float32)
"""

__version__ = "0.1.0"

import sys as _sys
import types as _types

from .checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import NemoconvError, VerificationFailed  # noqa: E402

# `quantize` and `verify` (torch, transformers) are imported on first use, so `nemoconv convert` and
# `inspect` start without torch. The submodules share the functions' names: the package keeps the function
# when the import system binds the submodule of the same name to it.
_LAZY = {"quantize": ".quantize", "verify": ".verify", "analyze_fp8": ".quant.analyze"}
_FUNCTIONS = {"convert", "quantize", "verify"}


class _Package(_types.ModuleType):
    def __getattr__(self, name):
        if name in _LAZY:
            import importlib

            value = getattr(importlib.import_module(_LAZY[name], __name__), name)
            self.__dict__[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _FUNCTIONS and isinstance(value, _types.ModuleType):
            return  # a submodule being bound to the package: `nemoconv.<name>` stays the function
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def load_model(path, device="cpu", dtype=None, **kwargs):
    """The built-in hybrid model for a checkpoint of any scheme (see nemoconv.model)."""
    from .model import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype, **kwargs)


__all__ = ["Checkpoint", "NemoconvError", "VerificationFailed", "analyze_fp8", "convert", "load_model", "open_checkpoint",
           "quantize", "verify", "__version__"]
