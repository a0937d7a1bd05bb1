"""`nemoconv convert`: plan on meta tensors, then stream shard by shard into an atomic output directory."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

from nemoconv.checkpoint.local import QUANT_CONFIG_NAME, Checkpoint, open_checkpoint
from nemoconv.checkpoint.sidefiles import SideFile, select_side_files
from nemoconv.errors import NemoconvError
from nemoconv.schemes import Scheme, get_scheme
from nemoconv.schemes.renamer import rename_modules
from nemoconv.storage.paths import check_output_location
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.stream.output import check_output_free
from nemoconv.stream.pipeline import stream_converted
from nemoconv.stream.plan import TensorPlan, manifest_head, mtp_warning, plan_conversion
from nemoconv.stream.resume import ResumeKey, source_fingerprint
from nemoconv.stream.shards import json_bytes, parse_size
from nemoconv.stream.writer import Beside, Layout, Resume, write_checkpoint
from nemoconv.untrusted import parse_json, want_dict
from nemoconv.version import __version__

_DTYPE_OPTIONS = {"keep": None, "bfloat16": "bfloat16", "float32": "float32"}

Progress = Callable[[int, int], None]


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
            iteration: int | None = None, config_file: str | Path | None = None, resume: bool = True) -> dict:
    """Convert a checkpoint between naming schemes; returns the manifest (the plan with `dry_run`).
    `iteration`, `config_file`: for a Megatron source, which iter_* directory and its HF config.
    `resume`: continue the partial output of an interrupted run of this same conversion (stream.resume);
    False discards it and starts over."""
    get_scheme(to)
    if dtype not in _DTYPE_OPTIONS:
        raise NemoconvError(f"--dtype must be one of {', '.join(_DTYPE_OPTIONS)}, got {dtype!r}")
    shard_limit = parse_size(max_shard_size)
    ck = open_checkpoint(src, scheme=from_, iteration=iteration, config_file=config_file)
    plan = plan_conversion(ck, to, _DTYPE_OPTIONS[dtype])
    check_output_location(out, [ck.path], overwrite)
    carried, skipped = select_side_files(ck.path, ck.config)
    manifest = _manifest(src, ck, to, dtype, plan, carried, skipped)
    if dry_run:
        check_output_free(Path(out).expanduser(), overwrite)
        return manifest
    layout = Layout(plan.planned(), to, shard_limit, get_scheme(to).container, [i.sources for i in plan.items])

    def beside() -> Beside:
        config = _rewrite_quant_side(carried, ck.config, ck, get_scheme(to), set(plan.names))
        return Beside(config, carried, manifest, card_title=f"{Path(str(src)).name} ({to} scheme)")

    key = ResumeKey("convert", source_fingerprint(ck.path, [*ck.shard_files, config_file]),
                    {"SRC": str(src), "--from": ck.scheme, "--to": to, "--dtype": dtype,
                     "--max-shard-size": shard_limit, "--iteration": iteration, "nemoconv": __version__})
    with TensorReader(host=True) as reader:  # numpy bits: convert never imports torch
        return write_checkpoint(
            out, overwrite, layout,
            lambda skip: stream_converted(ck, to=to, dtype=_DTYPE_OPTIONS[dtype], reader=reader, lazy=True, skip=skip),
            beside, ck.path, progress, Resume(key, fresh=not resume))


def _manifest(src, ck: Checkpoint, to: str, dtype: str, plan: TensorPlan, carried: list[SideFile],
              skipped: dict) -> dict:
    manifest = manifest_head(src, ck, to, dtype, plan, plan.journal.lossy, [f.name for f in carried], skipped,
                             plan.entries())
    if mtp_warning(ck):
        manifest["warnings"] = [mtp_warning(ck)]
    if ck.not_read:
        manifest["keys_not_read"] = ck.not_read  # Megatron: optimizer state, Transformer Engine _extra_state
    return manifest
