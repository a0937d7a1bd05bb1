"""`nemoconv inspect`: what a checkpoint is, from its config and headers alone (no tensor data read)."""

from __future__ import annotations

import math

from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.schemes.scales import SCALE_SUFFIXES
from nemoconv.stream.plan import mtp_warning, plan_conversion


def inspect_checkpoint(source, scheme: str = "auto") -> dict:
    """What the checkpoint is, and `check`: whether every tensor fits config.json and none is missing or left
    over (the checks convert and verify make before they read a byte of data)."""
    ck = open_checkpoint(source, scheme=scheme)
    try:
        plan_conversion(ck, "hf", None)
        check = {"ok": True, "error": None}
    except NemoconvError as exc:
        check = {"ok": False, "error": str(exc)}
    spec = ck.spec
    params = sum(math.prod(e.shape) for n, e in ck.entries.items() if n.rpartition(".")[2] not in SCALE_SUFFIXES)
    mtp_params = sum(math.prod(e.shape) for n, e in ck.entries.items() if n.startswith("mtp."))
    return {
        "path": str(ck.path),
        "scheme": ck.scheme,
        "model": spec.to_dict(),
        "parameters": params,
        "mtp_parameters": mtp_params,
        "tensors": len(ck.entries),
        "dtypes": ck.dtype_counts(),
        "quantization": ck.quantization(),
        "shards": {"count": len(ck.shard_files), "bytes": ck.total_bytes,
                   "files": [f.name for f in ck.shard_files]},
        "converted_by_nemoconv": bool(ck.manifest),
        "check": check,
        "warnings": [w for w in (mtp_warning(ck),) if w],
    }
