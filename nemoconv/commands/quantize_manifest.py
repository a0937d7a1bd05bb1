"""The manifest of `nemoconv quantize`: the shared head (stream.plan) with the quantize step of every target,
and a "quantization" section (targets, exclusions and why, calibration, per-module amax and scales, notes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemoconv.checkpoint.local import QUANT_CONFIG_NAME, Checkpoint
from nemoconv.quant import fp8
from nemoconv.quant.exclusions import compact_exclusions
from nemoconv.quant.targets import WHY_NEVER, TargetPlan
from nemoconv.schemes import get_scheme
from nemoconv.schemes.renamer import rename_modules
from nemoconv.stream.plan import TensorPlan, manifest_head, mtp_warning


@dataclass
class QuantizeRun:
    """One quantize run: its settings, and what each step found for the next."""

    src: object
    out: Path
    to: str
    kv: bool
    device: torch.device
    act_dtype: torch.dtype
    quiet: bool
    ck: Checkpoint | None = None
    tensors: TensorPlan | None = None  # the output tensors of the current target plan
    data: object = None  # the calibration tokens
    calib: object = None  # the calibration result
    kv_scales: dict = field(default_factory=dict)
    budget: dict | None = None
    fresh: bool = False  # discard the partial output of an interrupted run (--no-resume)
    options: dict = field(default_factory=dict)  # every option that changes the output (for resuming)
    inputs: list = field(default_factory=list)  # the files read besides the source directory's own


def exclusion_list(plan: TargetPlan, hf, scheme, out_names: set[str]) -> list[str]:
    """exclude_modules: short patterns in HF names (quant.exclusions, what vLLM and TensorRT-LLM read);
    exact names for the max scheme (MAX reads FP8 from the weight_scale tensors, not from this list)."""
    if scheme.name == "hf":
        return compact_exclusions([m.name for m in plan.modules], plan.unquantized)
    return rename_modules(plan.unquantized, hf, scheme, out_names)


# ---- the manifest --------------------------------------------------------------------------------


def quantize_manifest(run: QuantizeRun, plan: TargetPlan, records: dict, carried, skipped) -> dict:
    """The shared manifest head with the quantize step of every target, and a "quantization" section."""
    tensors = run.tensors
    entries = tensors.entries()
    for entry in entries:
        if entry["name"].endswith(".input_scale"):
            entry["from"] = "calibration"
    out_name = _out_namer(run)
    lossy = list(tensors.journal.lossy)
    for hf_module in plan.quantized:
        lossy.append({"tensor": out_name(hf_module) + ".weight", "step": "quantize",
                      "detail": f"{records[hf_module]['source_dtype']} → float8_e4m3fn (FP8 per-tensor static, "
                                f"ModelOpt format)"})
    manifest = manifest_head(run.src, run.ck, run.to, "keep", tensors, lossy,
                             [f.name for f in carried] + [QUANT_CONFIG_NAME], skipped, entries)
    manifest["quantization"] = _quantization(run, plan, records, out_name)
    return manifest


def _out_namer(run: QuantizeRun):
    hf, scheme, out_names = get_scheme("hf"), get_scheme(run.to), set(run.tensors.names)

    def out_name(hf_module: str) -> str:
        return rename_modules([hf_module], hf, scheme, out_names)[0]
    return out_name


def _quantization(run: QuantizeRun, plan: TargetPlan, records: dict, out_name) -> dict:
    calib, data = run.calib, run.data
    never = {m.name: m.kind for m in plan.modules if m.kind in WHY_NEVER}
    return {
        "format": "FP8 E4M3 per-tensor static (nvidia-modelopt 0.47 HF export format)",
        "preset": plan.preset,
        "targets": [out_name(m) for m in plan.quantized],
        "excluded": [_exclusion(e, out_name) for e in plan.excluded],
        "never_quantized": {kind: sum(1 for k in never.values() if k == kind) for kind in WHY_NEVER
                            if kind in never.values()},
        "exclude_modules": len(exclusion_list(plan, get_scheme("hf"), get_scheme(run.to), set(run.tensors.names))),
        "calibration": {**data.info, "samples": int(data.ids.shape[0]), "seq_len": int(data.ids.shape[1]),
                        "tokens": int(data.ids.numel()), "device": calib.device, "dtype": calib.dtype,
                        "calibrator": calib.calibrator, "calibrator_used": getattr(calib, "calibrator_name", ""),
                        "micro_batch_sequences": calib.micro_batch},
        "modules": _modules(plan, calib, records, out_name),
        "notes": _notes(run, plan, records, out_name),
    }


def _modules(plan: TargetPlan, calib, records: dict, out_name) -> dict:
    modules = {}
    for hf_module in plan.quantized:
        r = records[hf_module]
        entry = {"kind": plan.kind_of(hf_module), "input_amax": r["input_amax"], "input_scale": r["input_scale"],
                 "weight_amax": r["weight_amax"], "weight_scale": r["weight_scale"],
                 "calibration_tokens": calib.tokens.get(hf_module, 0)}
        if hf_module in calib.filled:
            entry["input_amax_filled"] = calib.filled[hf_module]
        modules[out_name(hf_module)] = entry
    return modules


def _notes(run: QuantizeRun, plan: TargetPlan, records: dict, out_name) -> list[str]:
    calib, data = run.calib, run.data
    notes = list(plan.glob_notes)
    if mtp_warning(run.ck):
        notes.append(mtp_warning(run.ck))
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
    return notes


def kv_manifest(kv_amax: dict, kv_scales: dict, written: bool, to: str) -> dict:
    entry = {"algo": "FP8", "format": "k_scale / v_scale = amax of the keys / values over calibration / 448, "
                                      "float32 0-d, beside k_proj / v_proj (nvidia-modelopt 0.47 HF export)",
             "written": written,
             "scales": {name: {"amax": kv_amax[name.rsplit(".", 1)[0]], "scale": float(scale)}
                        for name, scale in kv_scales.items()}}
    if not written:
        entry["note"] = (f"the {to} scheme drops KV-cache scales (MAX does not read them): this checkpoint has "
                         f"none, and kv_cache_quant_algo is null")
    return entry


def _exclusion(e, out_name) -> dict:
    entry = {"module": out_name(e.module), "hf_module": e.module, "reason": e.reason, "detail": e.detail}
    if e.partner:
        entry["with"] = out_name(e.partner)
        entry["detail"] = f"kept with {entry['with']}: MAX reads a mixer's projections as FP8 together"
    return entry
