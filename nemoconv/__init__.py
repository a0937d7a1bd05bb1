"""nemoconv: convert, quantize and verify NVIDIA Nemotron-H hybrid checkpoints.

Python API (mirrors the CLI, DESIGN.md §4):
    ck = nemoconv.open_checkpoint(path_or_repo_id)
    nemoconv.convert(src, out, to="nemo")
    model = nemoconv.load_model(path, device="cpu", dtype=torch.float32)
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import NemoconvError, VerificationFailed  # noqa: E402
# Imported eagerly: the submodules share the functions' names, and a lazy import would rebind
# `nemoconv.verify` from the function to the module.
from .quantize import quantize  # noqa: E402
from .verify import verify  # noqa: E402


def load_model(path, device="cpu", dtype=None, **kwargs):
    """The built-in hybrid model for a checkpoint of any scheme (see nemoconv.model)."""
    from .model import load_model as _load_model

    return _load_model(path, device=device, dtype=dtype, **kwargs)


__all__ = ["Checkpoint", "NemoconvError", "VerificationFailed", "convert", "load_model", "open_checkpoint",
           "quantize", "verify", "__version__"]
