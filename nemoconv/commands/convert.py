"""`nemoconv convert`: plan on meta tensors, then stream shard by shard into an atomic output directory."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from nemoconv.checkpoint.local import MANIFEST_NAME, QUANT_CONFIG_NAME, Checkpoint, open_checkpoint
from nemoconv.checkpoint.sidefiles import SideFile, select_side_files, write_side_files
from nemoconv.errors import NemoconvError
from nemoconv.schemes import Scheme, get_scheme
from nemoconv.schemes.renamer import rename_modules
from nemoconv.storage.paths import check_output_location
from nemoconv.storage.safetensors_io import PlannedTensor, TensorReader, dtype_name
from nemoconv.stream.card import write_card
from nemoconv.stream.output import (
    BackgroundWriter,
    ShardedWriter,
    atomic_output,
    check_output_free,
    json_bytes,
    parse_size,
    write_json,
)
from nemoconv.stream.pipeline import Journal, stream_converted
from nemoconv.untrusted import parse_json, want_dict
from nemoconv.version import __version__

_DTYPE_OPTIONS = {"keep": None, "bfloat16": "bfloat16", "float32": "float32"}

Progress = Callable[[int, int], None]


def plan_conversion(ck: Checkpoint, to: str, dtype: str | None) -> tuple[list[dict], Journal]:
    """Run the whole stream on meta tensors: every check and every lossy step, no data read."""
    journal = Journal()
    tensors = []
    for item in stream_converted(ck, to=to, meta=True, dtype=dtype, journal=journal, host=True):
        entry = {"name": item.name, "dtype": dtype_name(item.tensor.dtype), "shape": list(item.tensor.shape),
                 "sources": list(item.sources)}
        if item.cast_from:
            entry["cast_from"] = item.cast_from
        tensors.append(entry)
    names = [t["name"] for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise NemoconvError(f"internal mapping error: two tensors would be written as {dup!r}")
    consumed = {s for t in tensors for s in t["sources"]}
    dropped = {s for step in journal.lossy if step["step"] == "drop" for s in [step["tensor"]]}
    unaccounted = [n for n in ck.entries if n not in consumed
                   and ck.scheme_rules.to_hf(ck.scheme_rules.normalize(n), ck.spec) not in dropped]
    if unaccounted:
        raise NemoconvError(f"internal error: source tensor {unaccounted[0]!r} was neither written nor dropped")
    return tensors, journal


def _rewrite_quant_side(carried: list[SideFile], config: dict, ck: Checkpoint, dst: Scheme,
                        out_names: set[str]) -> dict:
    """Rename the exclusion lists of config.json and of a carried hf_quant_config.json (in place)."""
    config = copy.deepcopy(config)
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict):
        for key in ("ignore", "exclude_modules"):
            if isinstance(qcfg.get(key), list):
                qcfg[key] = rename_modules(qcfg[key], ck.scheme_rules, dst, out_names)
    for i, f in enumerate(carried):
        if f.name != QUANT_CONFIG_NAME:
            continue
        data = want_dict(parse_json(f.data, QUANT_CONFIG_NAME), QUANT_CONFIG_NAME)  # checked when selected
        q = data.get("quantization") or {}
        if isinstance(q, dict) and isinstance(q.get("exclude_modules"), list):
            q["exclude_modules"] = rename_modules(q["exclude_modules"], ck.scheme_rules, dst, out_names)
            carried[i] = SideFile(f.name, json_bytes(data))
    return config


def convert(src, out, to: str, from_: str = "auto", dtype: str = "keep", max_shard_size: str | int = "5GB",
            overwrite: bool = False, dry_run: bool = False, progress: Progress | None = None,
            iteration: int | None = None, config_file: str | Path | None = None) -> dict:
    """Convert a checkpoint between naming schemes; returns the manifest (the plan with `dry_run`).
    `iteration`, `config_file`: for a Megatron source, which iter_* directory and its HF config."""
    get_scheme(to)
    if dtype not in _DTYPE_OPTIONS:
        raise NemoconvError(f"--dtype must be one of {', '.join(_DTYPE_OPTIONS)}, got {dtype!r}")
    shard_limit = parse_size(max_shard_size)
    ck = open_checkpoint(src, scheme=from_, iteration=iteration, config_file=config_file)
    tensors, journal = plan_conversion(ck, to, _DTYPE_OPTIONS[dtype])
    check_output_location(out, [ck.path], overwrite)
    carried, skipped = select_side_files(ck.path, ck.config)
    manifest = {
        "tool": "nemoconv",
        "version": __version__,
        "source": str(src),
        "scheme_from": ck.scheme,
        "scheme_to": to,
        "dtype": dtype,
        "lossless": not journal.lossy,
        "lossy_steps": journal.lossy,
        "tensors_in": len(ck.entries),
        "tensors_out": len(tensors),
        "bytes_in": ck.total_bytes,
        "bytes_out": sum(PlannedTensor(t["name"], t["dtype"], tuple(t["shape"])).nbytes for t in tensors),
        "files_carried": [f.name for f in carried],
        "files_not_carried": skipped,
        "tensors": tensors,
    }
    from nemoconv.commands.inspect import mtp_warning

    if mtp_warning(ck):
        manifest["warnings"] = [mtp_warning(ck)]
    if ck.not_read:
        manifest["keys_not_read"] = ck.not_read  # Megatron: optimizer state, Transformer Engine _extra_state
    if dry_run:
        check_output_free(Path(out).expanduser(), overwrite)
        return manifest
    planned = [PlannedTensor(t["name"], t["dtype"], tuple(t["shape"])) for t in tensors]
    with atomic_output(out, overwrite) as tmp:
        if get_scheme(to).container == "torch_dist":
            from nemoconv.storage.megatron.dcp import DcpWriter

            writer = BackgroundWriter(DcpWriter(tmp, planned, shard_limit))
        else:
            writer = BackgroundWriter(ShardedWriter(tmp, planned, shard_limit,
                                                    {"format": "pt", "nemoconv_scheme": to}))
        done = 0
        try:
            with TensorReader(host=True) as reader:  # numpy bits: convert never imports torch
                for item in stream_converted(ck, to=to, dtype=_DTYPE_OPTIONS[dtype], reader=reader, lazy=True):
                    writer.write(item.name, item.tensor, item.entry)
                    done += item.tensor.numel() * item.tensor.element_size()
                    if progress:
                        progress(done, manifest["bytes_out"])
            writer.close()
        finally:
            writer.abort()
        config = _rewrite_quant_side(carried, ck.config, ck, get_scheme(to), {t["name"] for t in tensors})
        write_side_files(tmp, carried)
        write_json(tmp / "config.json", config)
        manifest["shards"] = writer.writer.names
        write_json(tmp / MANIFEST_NAME, manifest)
        write_card(tmp, ck.path, manifest, title=f"{Path(str(src)).name} ({to} scheme)")
    return manifest
