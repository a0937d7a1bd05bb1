"""A checkpoint's identity in the report: its files' hashes (the whole files, hashed in the background by
`record.hash_checkpoint`, or this module's streamed `fingerprint`) and what it holds (scheme, dtypes,
quantization, manifest)."""

from __future__ import annotations

import hashlib
import threading
import time

from nemoconv.checkpoint.local import Checkpoint

FULL_HASH_LIMIT = 2 << 30      # checkpoints up to 2 GiB are hashed whole, larger ones sampled
SAMPLE_STRIDE, SAMPLE_BLOCK = 64 << 20, 1 << 20


def fingerprint(ck: Checkpoint, full_limit: int = FULL_HASH_LIMIT, stop: threading.Event | None = None) -> dict:
    """sha256 over sorted (name, dtype, shape) and the safetensors files' bytes, streamed.

    Checkpoints above `full_limit` bytes hash each file's header plus 1 MiB every 64 MiB (and the file
    size): the field is then `sha256_sampled`, so nobody mistakes it for a whole-file hash.
    """
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for name in sorted(ck.entries):
        e = ck.entries[name]
        h.update(f"{name}\t{str(e.dtype).removeprefix('torch.')}\t{list(e.shape)}\n".encode())
    files = sorted(ck.shard_files, key=lambda p: p.name)
    total = sum(f.stat().st_size for f in files)
    sampled = total > full_limit
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for f in files:
        if stop is not None and stop.is_set():
            return {"cancelled": True}
        h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
        with open(f, "rb", buffering=0) as fh:
            if not sampled:
                while (n := fh.readinto(view)) and not (stop is not None and stop.is_set()):
                    h.update(view[:n])
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(header_len))
            size = f.stat().st_size
            for offset in range(8 + header_len, size, SAMPLE_STRIDE):
                fh.seek(offset)
                h.update(fh.read(SAMPLE_BLOCK))
    key = "sha256_sampled" if sampled else "sha256_full"
    out = {key: h.hexdigest(), "bytes": total, "files": [f.name for f in files],
           "seconds": round(time.perf_counter() - t0, 3)}
    if sampled:
        out["sample"] = (f"tensor names/dtypes/shapes, each file's size and header, and {SAMPLE_BLOCK >> 20} MiB "
                         f"every {SAMPLE_STRIDE >> 20} MiB of data (checkpoint above {full_limit >> 30} GiB)")
    return out


def fingerprint_of(ck: Checkpoint, hashes: dict) -> dict:
    """The report's short identity of a checkpoint: one sha256 over its bound files' full hashes."""
    return {"sha256_full": hashes["digest"], "bytes": sum(e["bytes"] for e in hashes["weights"].values()),
            "files": sorted(hashes["weights"]), "seconds": hashes["seconds"]}


def describe_checkpoint(ck: Checkpoint, fp: dict) -> dict:
    """The report's `reference` or `candidate`: where it is, its scheme and dtypes, quantization, manifest."""
    q = ck.quantization()
    kv = sum(1 for n in ck.tensor_names() if n.endswith((".k_scale", ".v_scale")))
    return {"path": str(ck.path), "scheme": ck.scheme, "fingerprint": fp, "dtypes": ck.dtype_counts(),
            "quantization": q, "kv_cache_scales": kv, "manifest": None if ck.manifest is None else {
                k: ck.manifest.get(k) for k in ("source", "scheme_from", "scheme_to", "lossless", "dtype")}}
