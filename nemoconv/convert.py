"""`nemoconv convert`: plan on meta tensors, then stream shard by shard into an atomic output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from . import __version__
from .card import write_card
from .checkpoint import INDEX_NAME, MANIFEST_NAME, Checkpoint, open_checkpoint
from .errors import NemoconvError
from .mapping import Scheme, get_scheme
from .output import BackgroundWriter, ShardedWriter, atomic_output, check_output_free, parse_size, write_json
from .pipeline import Journal, stream_converted
from .safetensors_io import PlannedTensor, TensorReader, dtype_name

_DTYPE_OPTIONS = {"keep": None, "bfloat16": "bfloat16", "float32": "float32"}
# Never read or carried: pickled weights can execute code on load.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".distcp")
# Written anew: the index and manifest describe the new tensors, config.json gets renamed exclusion lists,
# README.md becomes our model card (the source's card is kept inside it), a verify report is for the source.
_REWRITTEN = {INDEX_NAME, MANIFEST_NAME, "config.json", "README.md", "nemoconv-verify.json", "metadata.json"}

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


def side_files(src: Path) -> tuple[list[Path], list[str]]:
    """Files carried over beside the tensors, and files deliberately not carried (reported)."""
    carried, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name.endswith(".safetensors") or p.name in _REWRITTEN or p.name.startswith("."):
            continue
        if not p.is_file() or p.name.endswith(_PICKLE_SUFFIXES):
            skipped.append(p.name)
            continue
        carried.append(p)
    return carried, skipped


def rename_modules(modules: list[str], src: Scheme, dst: Scheme, out_names: set[str]) -> list[str]:
    """Rename quantization exclusion entries into the target scheme (the same rules as the tensors)."""
    renamed: list[str] = []
    for module in modules:
        hf = src.to_hf(src.normalize(module + ".weight"))
        if hf is None or not hf.endswith(".weight"):
            renamed.append(module)  # a pattern or a non-tensor name: kept as written
            continue
        hf_modules = [hf[: -len(".weight")]]
        for fuse in src.fuses:  # a fused source module stands for its members
            fields = fuse.to.match(hf)
            if fields is not None:
                hf_modules = [t.format(fields)[: -len(".weight")] for t in fuse.hf]
        for hf_module in hf_modules:
            target = None
            for fuse in dst.fuses:
                for tpl in fuse.hf:
                    fields = tpl.match(hf_module + ".weight")
                    fused = dst.to_scheme(fuse.to.format(fields)) if fields is not None else None
                    if fused is not None and fused in out_names:
                        target = fused[: -len(".weight")]
            if target is None:
                target = dst.rename_module(hf_module)
            if target not in renamed:
                renamed.append(target)
    return renamed


def _rewrite_quant_side(out_dir: Path, config: dict, ck: Checkpoint, dst: Scheme, out_names: set[str]) -> dict:
    config = json.loads(json.dumps(config))
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict):
        for key in ("ignore", "exclude_modules"):
            if isinstance(qcfg.get(key), list):
                qcfg[key] = rename_modules(qcfg[key], ck.scheme_rules, dst, out_names)
    quant_path = out_dir / "hf_quant_config.json"
    if quant_path.is_file():
        data = json.loads(quant_path.read_text())
        q = data.get("quantization") or {}
        if isinstance(q.get("exclude_modules"), list):
            q["exclude_modules"] = rename_modules(q["exclude_modules"], ck.scheme_rules, dst, out_names)
            write_json(quant_path, data)
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
    carried, skipped = side_files(ck.path)
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
        "files_carried": [p.name for p in carried],
        "files_not_carried": skipped,
        "tensors": tensors,
    }
    if ck.not_read:
        manifest["keys_not_read"] = ck.not_read  # Megatron: optimizer state, Transformer Engine _extra_state
    if dry_run:
        check_output_free(Path(out).expanduser(), overwrite)
        return manifest
    if Path(out).expanduser().absolute() == ck.path.absolute():
        raise NemoconvError(f"{out}: output is the source directory")
    planned = [PlannedTensor(t["name"], t["dtype"], tuple(t["shape"])) for t in tensors]
    with atomic_output(out, overwrite) as tmp:
        if get_scheme(to).container == "torch_dist":
            from .megatron.dcp import DcpWriter

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
        for p in carried:
            shutil.copyfile(p, tmp / p.name)
        config = _rewrite_quant_side(tmp, ck.config, ck, get_scheme(to), {t["name"] for t in tensors})
        write_json(tmp / "config.json", config)
        manifest["shards"] = writer.writer.names
        write_json(tmp / MANIFEST_NAME, manifest)
        write_card(tmp, ck.path, manifest, title=f"{Path(str(src)).name} ({to} scheme)")
    return manifest
