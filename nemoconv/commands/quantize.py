"""`nemoconv quantize`: a bf16/fp32 checkpoint → per-tensor static FP8 in ModelOpt's format (docs/DESIGN.md §7).

    1. plan    the whole tensor stream on meta tensors: every check and every output name, nothing read;
               the preset, --exclude globs and mixer groups decide the targets (quant.targets)
    2. calibrate  input amax of every target, running the built-in model layer by layer (quant.calibrate)
    3. write   the stream again, each target weight replaced by (E4M3 weight, weight_scale, input_scale)
               (quant.fp8), renamed into the output scheme by the same rules as convert, into an atomic,
               sharded output with config.json's quantization_config, hf_quant_config.json and
               nemoconv-manifest.json (with a "quantization" section)

    result = nemoconv.quantize(src, out, preset="default")   # the manifest (+ "timings_s")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from nemoconv.checkpoint.local import QUANT_CONFIG_NAME, Checkpoint, open_checkpoint
from nemoconv.checkpoint.sidefiles import select_side_files
from nemoconv.commands.quantize_manifest import QuantizeRun, exclusion_list, kv_manifest, quantize_manifest
from nemoconv.errors import NemoconvError
from nemoconv.model.device import resolve_device
from nemoconv.progress import Progress
from nemoconv.quant import fp8
from nemoconv.quant.budget import check_budget, fit_budget, verify_command
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.sizes import check_calibration_sizes
from nemoconv.quant.targets import KIND_LABELS, PRESETS, TargetPlan, exclude_unscalable, plan_targets
from nemoconv.schemes import get_scheme, quantize_outputs
from nemoconv.schemes.scales import KV_SCALE_OF, KV_SCALES
from nemoconv.storage.config import ATTENTION
from nemoconv.storage.paths import check_output_location
from nemoconv.storage.safetensors_io import TensorReader, dtype_name
from nemoconv.stream.items import Item, Journal
from nemoconv.stream.output import check_output_free
from nemoconv.stream.pipeline import FromHF, stream_converted
from nemoconv.stream.plan import TensorPlan, accounted_plan
from nemoconv.stream.resume import ResumeKey, digest_of, source_fingerprint
from nemoconv.stream.shards import parse_size
from nemoconv.stream.writer import Beside, Layout, Resume, write_checkpoint
from nemoconv.version import __version__

DEVICES = ("auto", "cpu", "cuda")


def quantize(src, out, preset: str = "default", exclude: Iterable[str] = (), calib_file=None,
             calib_samples: int = 128, calib_seq_len: int = 512, device: str = "auto", to: str = "hf",
             overwrite: bool = False, quiet: bool = True, max_shard_size: str | int = "5GB",
             dtype: torch.dtype | None = None, calibrator: str = "auto", max_kl: float | None = None,
             min_top1: float | None = None, kv_cache: str | None = None, resume: bool = True) -> dict:
    """Quantize SRC into OUT; returns the manifest written beside the tensors, plus `timings_s`.

    `dtype`: activations during calibration (default bfloat16 on CUDA, float32 on CPU).
    `calibrator`: "auto" (ModelOpt 0.47 when installed, else nemoconv's own hooks), "modelopt", "builtin".
    `max_kl` / `min_top1`: a quality budget on held-out prompts; the most harmful mixers stay in bf16 until
    it is met (quant.budget), else NemoconvError with the best reachable numbers.
    `kv_cache`: "fp8" adds k_scale/v_scale (calibrated amax of the keys/values / 448) to every attention
    layer, as ModelOpt does; None or "none" writes none.
    `resume`: continue the partial output of an interrupted run of this same command (stream.resume; the
    calibration is run again and must give the same values); False discards it and starts over.
    """
    t0 = time.perf_counter()
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    _check_options(to, preset, calib_samples, calib_seq_len, max_kl, min_top1, kv_cache)
    shard_limit = parse_size(max_shard_size)
    dev = resolve_device(device)
    run = QuantizeRun(src, Path(out).expanduser(), to, kv_cache == "fp8", dev,
                      dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32), quiet, fresh=not resume)
    run.options = {"SRC": str(src), "--preset": preset, "--exclude": exclude,
                   "--calib-file": calib_file and str(calib_file),
                   "--calib-samples": calib_samples, "--calib-seq-len": calib_seq_len, "--device": dev.type,
                   "activations": str(run.act_dtype), "--to": to, "--max-shard-size": shard_limit,
                   "--calibrator": calibrator, "--max-kl": max_kl, "--min-top1": min_top1, "--kv-cache": kv_cache,
                   "nemoconv": __version__}
    ck = run.ck = _open_source(src)
    check_output_location(run.out, [ck.path] + ([calib_file] if calib_file is not None else []), overwrite)
    check_output_free(run.out, overwrite)  # before spending time on calibration
    run.inputs = [*ck.shard_files, calib_file]

    plan = _plan(run, preset, exclude)  # 1. names, shapes and every check, on meta tensors
    t_plan = time.perf_counter()
    run.data = calibration_tokens(ck, calib_file, calib_samples, calib_seq_len)  # 2. calibrate
    plan = _calibrate(run, plan, calibrator)
    t_calib = time.perf_counter()
    if max_kl is not None or min_top1 is not None:
        with Progress("fit the quality budget (layers)", quiet=quiet) as progress:
            plan, run.budget = fit_budget(ck, plan, run.calib, run.data.ids, dev, run.act_dtype, max_kl, min_top1,
                                          progress)
        run.budget["verify_command"] = verify_command(src, run.out, run.budget)
        run.tensors = _plan_stream(run, plan)
    t_budget = time.perf_counter()
    manifest = _write(run, plan, shard_limit, overwrite)  # 3. write
    t_end = time.perf_counter()
    result = dict(manifest)
    result["output"] = str(run.out)
    result["timings_s"] = {"plan": round(t_plan - t0, 3), "calibrate": round(t_calib - t_plan, 3),
                           "budget": round(t_budget - t_calib, 3), "write": round(t_end - t_budget, 3),
                           "total": round(t_end - t0, 3)}
    return result


def _check_options(to, preset, calib_samples, calib_seq_len, max_kl, min_top1, kv_cache) -> None:
    if to not in quantize_outputs():
        raise NemoconvError(f"--to must be one of {', '.join(quantize_outputs())} for quantize, got {to!r}")
    if preset not in PRESETS:
        raise NemoconvError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    check_calibration_sizes(calib_samples, calib_seq_len)
    check_budget(max_kl, min_top1)
    if kv_cache not in (None, "none", "fp8"):
        raise NemoconvError(f"--kv-cache must be none or fp8, got {kv_cache!r}")


def _open_source(src) -> Checkpoint:
    ck = open_checkpoint(src)
    if ck.quantization() is not None:
        q = ck.quantization()
        raise NemoconvError(f"{ck.path} is already quantized ({q.get('algo') or 'FP8'}, {q['fp8_weights']} FP8 "
                            f"weights); quantize a bf16/fp32 checkpoint")
    return ck


def _plan(run: QuantizeRun, preset: str, exclude: list[str]) -> TargetPlan:
    """The targets of the preset and --exclude, and the output tensors they give."""
    ck = run.ck
    run.kv_scales = _kv_scales_planned(ck.spec) if run.kv else {}
    hf_names = [item.name for item in stream_converted(ck, to="hf", meta=True)]
    plan = plan_targets(ck.spec, set(hf_names), preset, exclude, get_scheme(run.to).rename_module)
    if not plan.quantized:
        kinds = ", ".join(KIND_LABELS[k] for k in PRESETS[preset])
        raise NemoconvError(f"nothing to quantize: the {preset} preset ({kinds}){' minus --exclude' if exclude else ''} "
                            f"selects no linear of this network (layers {ck.spec.layer_codes})")
    run.tensors = _plan_stream(run, plan)
    return plan


def _calibrate(run: QuantizeRun, plan: TargetPlan, calibrator: str) -> TargetPlan:
    """Input amax of every target; targets FP8 cannot scale are re-planned out (their weights stay in the
    source dtype, with no scales)."""
    ck = run.ck
    with Progress("calibrate (layers)", quiet=run.quiet) as progress:
        run.calib = run_calibration(ck, plan.quantized, run.data.ids, run.device, run.act_dtype, calibrator,
                                    progress, kv=run.kv)
    if run.kv and not run.calib.kv_amax:
        raise NemoconvError(f"--kv-cache fp8: the network has no attention layer (layers {ck.spec.layer_codes})")
    run.kv_scales = _kv_scales(run.calib.kv_amax) if run.kv else {}
    problems = _unscalable(plan, run.calib)
    if problems:
        plan = exclude_unscalable(plan, problems)
        if not plan.quantized:
            module, why = next(iter(problems.items()))
            raise NemoconvError(f"cannot quantize {module}: {why}; no linear is left to quantize")
        run.tensors = _plan_stream(run, plan)
    return plan


def _plan_stream(run: QuantizeRun, plan: TargetPlan) -> TensorPlan:
    journal = Journal()
    return accounted_plan(run.ck, _stream(run.ck, run.to, plan, {}, meta=True, journal=journal,
                                          kv_scales=run.kv_scales), journal)


def _write(run: QuantizeRun, plan: TargetPlan, shard_limit: int, overwrite: bool) -> dict:
    """The FP8 checkpoint, with config.json's quantization_config, hf_quant_config.json and the manifest."""
    ck, tensors, scheme = run.ck, run.tensors, get_scheme(run.to)
    unquantized = exclusion_list(plan, get_scheme("hf"), scheme, set(tensors.names))
    kv_written = bool(run.kv_scales) and not any(s["step"] == "drop" and s["tensor"].endswith(KV_SCALES)
                                                 for s in tensors.journal.lossy)
    hf_quant = fp8.hf_quant_config(unquantized, "FP8" if kv_written else None)
    records: dict[str, dict] = {}
    carried, skipped = select_side_files(ck.path, ck.config)

    def beside() -> Beside:
        config = dict(ck.config)
        config["quantization_config"] = fp8.config_quantization(hf_quant)
        manifest = quantize_manifest(run, plan, records, carried, skipped)
        if run.budget is not None:
            manifest["quantization"]["budget"] = run.budget
        if run.kv:
            manifest["quantization"]["kv_cache"] = kv_manifest(run.calib.kv_amax, run.kv_scales, kv_written, run.to)
        return Beside(config, carried, manifest, card_title=f"{Path(str(run.src)).name} (FP8, {run.to} scheme)",
                      extra_json={QUANT_CONFIG_NAME: hf_quant})

    def stream(skip: frozenset):
        return _stream(ck, run.to, plan, run.calib.amax, meta=False, journal=Journal(), reader=reader,
                       device=run.device, records=records, kv_scales=run.kv_scales, skip=skip)

    layout = Layout(tensors.planned(), run.to, shard_limit, sources=[i.sources for i in tensors.items])
    key = ResumeKey("quantize", source_fingerprint(ck.path, run.inputs), run.options,
                    content=digest_of({"calibration": vars(run.calib), "budget": run.budget}))
    resume = Resume(key, fresh=run.fresh, state=lambda: dict(records), restore=records.update)
    with TensorReader() as reader, Progress(f"write FP8 → {run.to}", quiet=run.quiet, unit="bytes") as progress:
        return write_checkpoint(run.out, overwrite, layout, stream, beside, ck.path, progress, resume)




def _unscalable(plan: TargetPlan, calib) -> dict[str, str]:
    """Targets FP8 cannot represent (HF module → why): a weight or input amax whose scale would be zero or
    subnormal, or an input that calibration never saw non-zero. They are excluded, never written."""
    problems = {}
    for module in plan.quantized:
        why = fp8.weight_scale_problem(calib.weight_amax.get(module, 0.0)) or \
            fp8.input_scale_problem(calib.amax[module])
        if why:
            problems[module] = why
    return problems




# ---- the tensor stream ---------------------------------------------------------------------------


def _stream(ck: Checkpoint, to: str, plan: TargetPlan, input_amax: dict[str, float], meta: bool,
            journal: Journal, reader: TensorReader | None = None, device: torch.device | None = None,
            records: dict | None = None, kv_scales: dict | None = None, skip: frozenset = frozenset()
            ) -> Iterator[Item]:
    """The checkpoint in `hf` names with targets quantized (and KV-cache scales beside k_proj/v_proj),
    then renamed into `to` by the scheme rules."""
    items = stream_converted(ck, to="hf", meta=meta, journal=journal, reader=reader, lazy=True, skip=skip)
    items = _quantized(items, set(plan.quantized), input_amax, device, records)
    if kv_scales:
        items = _with_kv_scales(items, kv_scales, meta)
    if to != "hf":
        items = FromHF(get_scheme(to), ck.spec, journal, None)(items)
    return items


def _quantized(items: Iterable[Item], targets: set[str], input_amax: dict[str, float],
               device: torch.device | None, records: dict | None) -> Iterator[Item]:
    for item in items:
        module, _, leaf = item.name.rpartition(".")
        if leaf != "weight" or module not in targets:
            yield item
            continue
        source_dtype = dtype_name(item.tensor.dtype)
        q, weight_scale, weight_amax = fp8.quantize_weight(item.data(), f"weight {item.sources[0]}", device)
        if q.is_meta:
            input_scale = torch.empty((), dtype=torch.float32, device="meta")
        else:
            input_scale = fp8.check_scale(fp8.scale_from_amax(input_amax[module]), f"input of {module}")
            if records is not None:
                records[module] = {"weight_amax": weight_amax, "weight_scale": float(weight_scale),
                                   "input_amax": input_amax[module], "input_scale": float(input_scale),
                                   "source_dtype": source_dtype}
        yield Item(item.name, q, item.sources, cast_from={"dtype": source_dtype, "by": "quantize"})
        yield Item(f"{module}.weight_scale", weight_scale, item.sources)
        yield Item(f"{module}.input_scale", input_scale, ())  # from calibration, not from a tensor


def _kv_scales_planned(spec) -> dict[str, None]:
    """The KV-cache scale names of every attention layer (values come from calibration)."""
    attention = [i for i, code in enumerate(spec.layer_codes) if code == ATTENTION]
    return {f"backbone.layers.{i}.mixer.{p}.{leaf}": None for i in attention for p, leaf in KV_SCALE_OF.items()}


def _kv_scales(kv_amax: dict[str, float]) -> dict[str, torch.Tensor]:
    """HF `<attn>.k_proj.k_scale` / `<attn>.v_proj.v_scale` → float32 0-d amax / 448 (ModelOpt's formula)."""
    out = {}
    for module, amax in kv_amax.items():
        name = f"{module}.{KV_SCALE_OF[module.rsplit('.', 1)[1]]}"
        out[name] = fp8.check_scale(fp8.scale_from_amax(amax), f"{name} (keys/values amax {amax:.3g})")
    return out


def _with_kv_scales(items: Iterable[Item], kv_scales: dict[str, torch.Tensor], meta: bool) -> Iterator[Item]:
    for item in items:
        yield item
        module, _, leaf = item.name.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in KV_SCALE_OF:
            name = f"{module}.{KV_SCALE_OF[module.rsplit('.', 1)[-1]]}"
            if name in kv_scales:
                scale = torch.empty((), dtype=torch.float32, device="meta") if meta else kv_scales[name]
                yield Item(name, scale, ())  # from calibration, not from a tensor


