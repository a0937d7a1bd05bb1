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

from nemoconv.checkpoint.local import MANIFEST_NAME, Checkpoint, open_checkpoint
from nemoconv.checkpoint.sidefiles import select_side_files, write_side_files
from nemoconv.errors import NemoconvError
from nemoconv.limits import MAX_CALIB_SAMPLES, MAX_CALIB_TOKENS, MAX_SEQ_LEN
from nemoconv.progress import Progress
from nemoconv.quant import fp8
from nemoconv.quant.budget import check_budget, fit_budget, verify_command
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.exclusions import compact_exclusions
from nemoconv.quant.targets import KIND_LABELS, PRESETS, WHY_NEVER, TargetPlan, exclude_unscalable, plan_targets
from nemoconv.schemes import get_scheme, quantize_outputs
from nemoconv.schemes.renamer import rename_modules
from nemoconv.schemes.scales import KV_SCALE_OF, KV_SCALES
from nemoconv.storage.config import ATTENTION
from nemoconv.storage.paths import check_output_location
from nemoconv.storage.safetensors_io import PlannedTensor, TensorReader, dtype_name
from nemoconv.stream.card import write_card
from nemoconv.stream.output import (
    BackgroundWriter,
    ShardedWriter,
    atomic_output,
    check_output_free,
    parse_size,
    write_json,
)
from nemoconv.stream.pipeline import FromHF, Item, Journal, stream_converted
from nemoconv.version import __version__

DEVICES = ("auto", "cpu", "cuda")


def quantize(src, out, preset: str = "default", exclude: Iterable[str] = (), calib_file=None,
             calib_samples: int = 128, calib_seq_len: int = 512, device: str = "auto", to: str = "hf",
             overwrite: bool = False, quiet: bool = True, max_shard_size: str | int = "5GB",
             dtype: torch.dtype | None = None, calibrator: str = "auto", max_kl: float | None = None,
             min_top1: float | None = None, kv_cache: str | None = None) -> dict:
    """Quantize SRC into OUT; returns the manifest written beside the tensors, plus `timings_s`.

    `dtype`: activations during calibration (default bfloat16 on CUDA, float32 on CPU).
    `calibrator`: "auto" (ModelOpt 0.47 when installed, else nemoconv's own hooks), "modelopt", "builtin".
    `max_kl` / `min_top1`: a quality budget on held-out prompts; the most harmful mixers stay in bf16 until
    it is met (quant.budget), else NemoconvError with the best reachable numbers.
    `kv_cache`: "fp8" adds k_scale/v_scale (calibrated amax of the keys/values / 448) to every attention
    layer, as ModelOpt does; None or "none" writes none.
    """
    t0 = time.perf_counter()
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if to not in quantize_outputs():
        raise NemoconvError(f"--to must be one of {', '.join(quantize_outputs())} for quantize, got {to!r}")
    if preset not in PRESETS:
        raise NemoconvError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    check_calibration_sizes(calib_samples, calib_seq_len)
    check_budget(max_kl, min_top1)
    if kv_cache not in (None, "none", "fp8"):
        raise NemoconvError(f"--kv-cache must be none or fp8, got {kv_cache!r}")
    kv = kv_cache == "fp8"
    shard_limit = parse_size(max_shard_size)
    dev = _device(device)
    act_dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ck = open_checkpoint(src)
    if ck.quantization() is not None:
        q = ck.quantization()
        raise NemoconvError(f"{ck.path} is already quantized ({q.get('algo') or 'FP8'}, {q['fp8_weights']} FP8 "
                            f"weights); quantize a bf16/fp32 checkpoint")
    out_path = Path(out).expanduser()
    check_output_location(out_path, [ck.path] + ([calib_file] if calib_file is not None else []), overwrite)
    check_output_free(out_path, overwrite)  # before spending time on calibration

    # 1. plan: names, shapes and every check, on meta tensors
    kv_scales = _kv_scales_planned(ck.spec) if kv else {}
    hf_names = [item.name for item in stream_converted(ck, to="hf", meta=True)]
    scheme = get_scheme(to)
    plan = plan_targets(ck.spec, set(hf_names), preset, exclude, scheme.rename_module)
    if not plan.quantized:
        kinds = ", ".join(KIND_LABELS[k] for k in PRESETS[preset])
        raise NemoconvError(f"nothing to quantize: the {preset} preset ({kinds}){' minus --exclude' if exclude else ''} "
                            f"selects no linear of this network (layers {ck.spec.layer_codes})")
    journal = Journal()
    planned = list(_stream(ck, to, plan, {}, meta=True, journal=journal, kv_scales=kv_scales))
    _check_accounted(ck, planned, journal)
    out_names = {i.name for i in planned}
    t_plan = time.perf_counter()

    # 2. calibrate
    data = calibration_tokens(ck, calib_file, calib_samples, calib_seq_len)
    with Progress("calibrate (layers)", quiet=quiet) as progress:
        calib = run_calibration(ck, plan.quantized, data.ids, dev, act_dtype, calibrator, progress, kv=kv)
    if kv and not calib.kv_amax:
        raise NemoconvError(f"--kv-cache fp8: the network has no attention layer (layers {ck.spec.layer_codes})")
    kv_scales = _kv_scales(calib.kv_amax) if kv else {}
    problems = _unscalable(plan, calib)
    if problems:  # re-plan without them: their weights stay in the source dtype, with no scales
        plan = exclude_unscalable(plan, problems)
        if not plan.quantized:
            module, why = next(iter(problems.items()))
            raise NemoconvError(f"cannot quantize {module}: {why}; no linear is left to quantize")
        journal = Journal()
        planned = list(_stream(ck, to, plan, {}, meta=True, journal=journal, kv_scales=kv_scales))
        _check_accounted(ck, planned, journal)
        out_names = {i.name for i in planned}
    t_calib = time.perf_counter()
    budget = None
    if max_kl is not None or min_top1 is not None:
        with Progress("fit the quality budget (layers)", quiet=quiet) as progress:
            plan, budget = fit_budget(ck, plan, calib, data.ids, dev, act_dtype, max_kl, min_top1, progress)
        budget["verify_command"] = verify_command(src, out_path, budget)
        journal = Journal()
        planned = list(_stream(ck, to, plan, {}, meta=True, journal=journal, kv_scales=kv_scales))
        _check_accounted(ck, planned, journal)
        out_names = {i.name for i in planned}
    t_budget = time.perf_counter()

    # 3. write
    hf = get_scheme("hf")
    unquantized = _exclusion_list(plan, hf, scheme, out_names)
    kv_written = bool(kv_scales) and not any(s["step"] == "drop" and s["tensor"].endswith(KV_SCALES)
                                             for s in journal.lossy)
    hf_quant = fp8.hf_quant_config(unquantized, "FP8" if kv_written else None)
    records: dict[str, dict] = {}
    carried, skipped = select_side_files(ck.path, ck.config)
    bytes_out = sum(_planned(i).nbytes for i in planned)
    with atomic_output(out_path, overwrite) as tmp:
        writer = BackgroundWriter(ShardedWriter(tmp, [_planned(i) for i in planned], shard_limit,
                                                {"format": "pt", "nemoconv_scheme": to}))
        done = 0
        try:
            with TensorReader() as reader, Progress(f"write FP8 → {to}", quiet=quiet, unit="bytes") as progress:
                stream = _stream(ck, to, plan, calib.amax, meta=False, journal=Journal(), reader=reader,
                                 device=dev, records=records, kv_scales=kv_scales)
                for item, want in zip(stream, planned):
                    if item.name != want.name:
                        raise RuntimeError(f"internal error: wrote {item.name}, planned {want.name}")
                    writer.write(item.name, item.tensor, item.entry)
                    done += _planned(item).nbytes
                    progress(done, bytes_out)
            writer.close()
        finally:
            writer.abort()
        write_side_files(tmp, carried)
        config = dict(ck.config)
        config["quantization_config"] = fp8.config_quantization(hf_quant)
        write_json(tmp / "config.json", config)
        write_json(tmp / "hf_quant_config.json", hf_quant)
        manifest = _manifest(src, ck, to, plan, planned, journal, data, calib, records, scheme, out_names,
                             carried, skipped, bytes_out)
        manifest["shards"] = writer.writer.names
        if budget is not None:
            manifest["quantization"]["budget"] = budget
        if kv:
            manifest["quantization"]["kv_cache"] = _kv_manifest(calib.kv_amax, kv_scales, kv_written, to)
        write_json(tmp / MANIFEST_NAME, manifest)
        write_card(tmp, ck.path, manifest, title=f"{Path(str(src)).name} (FP8, {to} scheme)",
                   quantization=manifest["quantization"])
    t_end = time.perf_counter()
    result = dict(manifest)
    result["output"] = str(out_path)
    result["timings_s"] = {"plan": round(t_plan - t0, 3), "calibrate": round(t_calib - t_plan, 3),
                           "budget": round(t_budget - t_calib, 3), "write": round(t_end - t_budget, 3),
                           "total": round(t_end - t0, 3)}
    return result


def _exclusion_list(plan: TargetPlan, hf, scheme, out_names: set[str]) -> list[str]:
    """exclude_modules: short patterns in HF names (quant.exclusions, what vLLM and TensorRT-LLM read);
    exact names for the max scheme (MAX reads FP8 from the weight_scale tensors, not from this list)."""
    if scheme.name == "hf":
        return compact_exclusions([m.name for m in plan.modules], plan.unquantized)
    return rename_modules(plan.unquantized, hf, scheme, out_names)


def check_calibration_sizes(calib_samples, calib_seq_len) -> None:
    for value, flag, most in ((calib_samples, "--calib-samples", MAX_CALIB_SAMPLES),
                              (calib_seq_len, "--calib-seq-len", MAX_SEQ_LEN)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise NemoconvError(f"{flag} must be an integer in [1, {most}], got {value!r}")
    if calib_samples * calib_seq_len > MAX_CALIB_TOKENS:
        raise NemoconvError(f"--calib-samples × --calib-seq-len = {calib_samples * calib_seq_len} tokens; at most "
                            f"{MAX_CALIB_TOKENS} are calibrated on")


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


def _device(device: str) -> torch.device:
    if device not in DEVICES:
        raise NemoconvError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise NemoconvError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


# ---- the tensor stream ---------------------------------------------------------------------------


def _stream(ck: Checkpoint, to: str, plan: TargetPlan, input_amax: dict[str, float], meta: bool,
            journal: Journal, reader: TensorReader | None = None, device: torch.device | None = None,
            records: dict | None = None, kv_scales: dict | None = None) -> Iterator[Item]:
    """The checkpoint in `hf` names with targets quantized (and KV-cache scales beside k_proj/v_proj),
    then renamed into `to` by the scheme rules."""
    items = stream_converted(ck, to="hf", meta=meta, journal=journal, reader=reader, lazy=True)
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


def _planned(item: Item) -> PlannedTensor:
    return PlannedTensor(item.name, item.tensor.dtype, tuple(item.tensor.shape))


def _check_accounted(ck: Checkpoint, planned: list[Item], journal: Journal) -> None:
    names = [i.name for i in planned]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise NemoconvError(f"internal mapping error: two tensors would be written as {dup!r}")
    consumed = {s for i in planned for s in i.sources}
    dropped = {s["tensor"] for s in journal.lossy if s["step"] == "drop"}
    rules = ck.scheme_rules
    left = [n for n in ck.entries if n not in consumed and rules.to_hf(rules.normalize(n)) not in dropped]
    if left:
        raise NemoconvError(f"internal error: source tensor {left[0]!r} was neither written nor dropped")


# ---- the manifest --------------------------------------------------------------------------------


def _manifest(src, ck: Checkpoint, to: str, plan: TargetPlan, planned: list[Item], journal: Journal, data,
              calib, records: dict, scheme, out_names: set[str], carried, skipped, bytes_out: int) -> dict:
    hf = get_scheme("hf")

    def out_name(hf_module: str) -> str:
        return rename_modules([hf_module], hf, scheme, out_names)[0]

    tensors = []
    for item in planned:
        entry = {"name": item.name, "dtype": dtype_name(item.tensor.dtype), "shape": list(item.tensor.shape),
                 "sources": list(item.sources)}
        if item.cast_from:
            entry["cast_from"] = item.cast_from
        if item.name.endswith(".input_scale"):
            entry["from"] = "calibration"
        tensors.append(entry)
    lossy = list(journal.lossy)
    for hf_module in plan.quantized:
        r = records[hf_module]
        lossy.append({"tensor": out_name(hf_module) + ".weight", "step": "quantize",
                      "detail": f"{r['source_dtype']} → float8_e4m3fn (FP8 per-tensor static, ModelOpt format)"})
    modules = {}
    for hf_module in plan.quantized:
        r = records[hf_module]
        entry = {"kind": plan.kind_of(hf_module), "input_amax": r["input_amax"], "input_scale": r["input_scale"],
                 "weight_amax": r["weight_amax"], "weight_scale": r["weight_scale"],
                 "calibration_tokens": calib.tokens.get(hf_module, 0)}
        if hf_module in calib.filled:
            entry["input_amax_filled"] = calib.filled[hf_module]
        modules[out_name(hf_module)] = entry
    notes = list(plan.glob_notes)
    from nemoconv.commands.inspect import mtp_warning

    if mtp_warning(ck):
        notes.append(mtp_warning(ck))
    mtp = [m.name for m in plan.modules if m.kind == "mtp"]
    if mtp:
        notes.append(f"the MTP layers ({len(mtp)} linears, mtp.*) are kept unquantized, in the source dtype")
    if data.info.get("cycled"):
        notes.append(f"the calibration data holds {data.info['distinct_tokens']} tokens; it was cycled (in seeded "
                     f"random orders) to fill {data.ids.shape[0]} × {data.ids.shape[1]} tokens")
    zero = [m for m in plan.quantized if records[m]["weight_amax"] == 0]
    if zero:
        notes.append(f"{len(zero)} module(s) had an all-zero weight (e.g. {out_name(zero[0])}); their "
                     f"weight_scale is {fp8.ZERO_AMAX_SCALE}")
    unscalable = [e for e in plan.excluded if e.reason == "unscalable"]
    if unscalable:
        notes.append(f"{len(unscalable)} linear(s) left unquantized because FP8 cannot scale them, with their "
                     f"mixer's partners (e.g. {out_name(unscalable[0].module)}: {unscalable[0].detail})")
    if calib.filled:
        notes.append(f"{len(calib.filled)} routed expert projection(s) received no calibration token; each took "
                     f"the largest input amax of its layer's experts")
    never = {m.name: m.kind for m in plan.modules if m.kind in WHY_NEVER}
    quantization = {
        "format": "FP8 E4M3 per-tensor static (nvidia-modelopt 0.47 HF export format)",
        "preset": plan.preset,
        "targets": [out_name(m) for m in plan.quantized],
        "excluded": [_exclusion(e, out_name) for e in plan.excluded],
        "never_quantized": {kind: sum(1 for k in never.values() if k == kind) for kind in WHY_NEVER
                            if kind in never.values()},
        "exclude_modules": len(_exclusion_list(plan, hf, scheme, out_names)),
        "calibration": {**data.info, "samples": int(data.ids.shape[0]), "seq_len": int(data.ids.shape[1]),
                        "tokens": int(data.ids.numel()), "device": calib.device, "dtype": calib.dtype,
                        "calibrator": calib.calibrator, "calibrator_used": getattr(calib, "calibrator_name", ""),
                        "micro_batch_sequences": calib.micro_batch},
        "modules": modules,
        "notes": notes,
    }
    return {
        "tool": "nemoconv",
        "version": __version__,
        "source": str(src),
        "scheme_from": ck.scheme,
        "scheme_to": to,
        "dtype": "keep",
        "lossless": False,
        "lossy_steps": lossy,
        "tensors_in": len(ck.entries),
        "tensors_out": len(planned),
        "bytes_in": ck.total_bytes,
        "bytes_out": bytes_out,
        "files_carried": [f.name for f in carried] + ["hf_quant_config.json"],
        "files_not_carried": skipped,
        "tensors": tensors,
        "quantization": quantization,
    }


def _kv_manifest(kv_amax: dict, kv_scales: dict, written: bool, to: str) -> dict:
    entry = {"algo": "FP8", "format": "k_scale / v_scale = amax of the keys / values over calibration / 448, "
                                      "float32 0-d, beside k_proj / v_proj (nvidia-modelopt 0.47 HF export)",
             "written": written,
             "scales": {name: {"amax": kv_amax[name.rsplit(".", 1)[0]], "scale": float(scale)}
                        for name, scale in kv_scales.items()}}
    if not written:
        entry["note"] = (f"the {to} scheme drops KV-cache scales (MAX does not read them): this checkpoint has "
                         f"none, and kv_cache_quant_algo is null")
    return entry


def _budget_text(budget: dict) -> str:
    return ", ".join(f"{flag} {budget[key]:g}" for flag, key in (("--max-kl", "max_kl"), ("--min-top1", "min_top1"))
                     if budget.get(key) is not None)


def _exclusion(e, out_name) -> dict:
    entry = {"module": out_name(e.module), "hf_module": e.module, "reason": e.reason, "detail": e.detail}
    if e.partner:
        entry["with"] = out_name(e.partner)
        entry["detail"] = f"kept with {entry['with']}: MAX reads a mixer's projections as FP8 together"
    return entry


# ---- progress and summary ------------------------------------------------------------------------


def _calibrator_hint(c: dict) -> str:
    """Say how to get ModelOpt's calibrator when auto fell back to the builtin one."""
    if c.get("calibrator_used") == "builtin" and "nvidia-modelopt" in c["calibrator"]:
        return " — the builtin observers give ModelOpt's amax values; pip install 'nemoconv[modelopt]' for ModelOpt's own"
    return ""


def render_summary(result: dict, console) -> None:
    """What quantize did, for people: targets, exclusions and why, calibration, size, notes."""
    from nemoconv.cli.render import human_bytes  # (render_summary is moving to cli/render_quantize.py)

    q = result["quantization"]
    c = q["calibration"]
    console.print(f"[bold]quantized[/bold] {len(q['targets'])} linears to FP8 E4M3 (per-tensor static, ModelOpt "
                  f"format), preset [cyan]{q['preset']}[/cyan], {result['scheme_from']} → {result['scheme_to']} "
                  f"scheme: {human_bytes(result['bytes_in'])} → {human_bytes(result['bytes_out'])}"
                  + (f" in {result['output']}" if result.get("output") else ""), highlight=False)
    kinds: dict[str, int] = {}
    for m in q["modules"].values():
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    console.print("  quantized: " + ", ".join(f"{n} {KIND_LABELS[k]}" for k, n in kinds.items()), highlight=False)
    reasons: dict[str, list[dict]] = {}
    for e in q["excluded"]:
        reasons.setdefault(e["reason"], []).append(e)
    lines = []
    user = reasons.get("--exclude", [])
    if user:
        lines.append(f"  excluded by --exclude: {len(user)}")
        lines += [f"    {e['module']}  ({e['detail']})" for e in user[:8]]
        if len(user) > 8:
            lines.append(f"    … and {len(user) - 8} more (see nemoconv-manifest.json)")
    pairs = reasons.get("pair", [])
    if pairs:
        lines.append(f"  excluded with their pair: {len(pairs)} (MAX reads a mixer's projections as FP8 together)")
        by_partner: dict[str, list[str]] = {}
        for e in pairs:
            by_partner.setdefault(e["with"], []).append(e["module"])
        for partner, members in by_partner.items():
            what = ", ".join(members) if len(members) <= 2 else f"{len(members)} projections of its mixer"
            lines.append(f"    {what}: kept with {partner}")
    unscalable = reasons.get("unscalable", [])
    if unscalable:
        lines.append(f"  excluded, no valid FP8 scale: {len(unscalable)}")
        lines += [f"    {e['module']}  ({e['detail']})" for e in unscalable[:8]]
    budget = q.get("budget")
    if budget:
        r, p0 = budget["result"], budget["preset_result"]
        held = budget["heldout"]
        lines.append(f"  quality budget ({_budget_text(budget)}) on {held['prompts']} held-out prompts × "
                     f"{held['seq_len']} tokens: the preset gives KL {p0['kl']:.3g}, top-1 {p0['top1_agreement']:.4f}; "
                     f"with {r['kept']} mixer(s) kept in bf16: KL {r['kl']:.3g}, top-1 {r['top1_agreement']:.4f}")
        for k in budget["kept_in_bf16"]:
            lines.append(f"    {k['mixer']}  (rank {k['rank']}: FP8 in it alone costs KL {k['kl_alone']:.3g})")
    preset = reasons.get("preset", [])
    if preset:
        lines.append(f"  left out by the preset: {len(preset)} ({preset[0]['detail']})")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    never = ", ".join(f"{n} {WHY_NEVER[k]}{'s' if n > 1 else ''}" for k, n in q["never_quantized"].items())
    console.print(f"  never quantized: {never}; exclude_modules names {q['exclude_modules']} modules", highlight=False)
    console.print(f"  calibration: {c['samples']} × {c['seq_len']} tokens of {c['source']}, on {c['device']} "
                  f"({c['dtype']})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  calibrator: {c['calibrator']}" + _calibrator_hint(c), markup=False, highlight=False,
                  soft_wrap=True)
    filled = [(name, m) for name, m in q["modules"].items() if "input_amax_filled" in m]
    if filled:
        console.print(f"  [yellow]{len(filled)} expert projection(s) got no calibration token[/yellow]; their "
                      f"input_scale is the max of their layer's experts (e.g. {filled[0][0]})", highlight=False)
    for note in q["notes"]:
        if "no calibration token" not in note:
            console.print(f"  [yellow]note[/yellow]: {note}", highlight=False)
    kv = q.get("kv_cache")
    if kv and kv["written"]:
        top = max(v["scale"] for v in kv["scales"].values())
        console.print(f"  KV cache: FP8 scales for {len(kv['scales']) // 2} attention layer(s) (k_scale/v_scale = "
                      f"amax / 448, largest {top:.3g}); kv_cache_quant_algo FP8", highlight=False)
    elif kv:
        console.print(f"  [yellow]KV cache[/yellow]: {kv['note']}", highlight=False)
    if budget:
        console.print(f"  check it with the same budget: {budget['verify_command']}", markup=False, highlight=False,
                      soft_wrap=True)
    t = result.get("timings_s")
    if t:
        console.print(f"  time: plan {t['plan']:.1f}s, calibrate {t['calibrate']:.1f}s, write {t['write']:.1f}s",
                      highlight=False)
