"""`quantize --analyze`: which linears carry the FP8 error, before anything is written.

For every linear any preset could quantize (Mamba in/out_proj, MLP up/down_proj, MoE routed and shared
expert projections):
  sqnr_db      the FP8 weight's signal-to-quantization-noise ratio (10·log10 ‖W‖² / ‖W − deq(q)‖²)
  kl           KL(ref‖q) of the final logits when ONLY that linear is FP8 (mean over positions)
  top1_change  the fraction of positions whose argmax changes then
measured on the first `probe_samples` calibration sequences.

How (the design and its cost): 1. a plain calibration (`run_calibration`, one pass over the layers on all
calibration tokens) gives every input_scale; 2. one sweep (`sweep.compare_variants`) runs the probe
tokens through the network once, and at layer i forks one stream per linear of layer i, computing the
layer's output with only that linear in FP8, then propagates every live stream through the remaining
layers. Each linear costs (layers after it) layer forwards on the probe tokens: about
n_linears / 2 × probe_tokens / calib_tokens calibration-equivalents in all (0.9 for trained-tiny/dense
at 16 × 128: 28 linears, a 128-token probe), plus an output-head GEMM and a float64 comparison per linear.
That propagation is the floor of an exact per-linear answer: the analysis costs at least about
1 + n_linears / 2 × probe / calibration tokens calibrations. Measured on CPU (one thread, CPU seconds,
benchmarks/bench_quant_analysis.py), 16 × 128: trained-tiny/dense 2.4× its plain calibration (2.9×
before streams were batched in place and the comparison shared); MoE models have many more linears
(every expert's), hence several times more. Memory: the streams are capped so that
probe_tokens × (1 + streams) ≤ 2 × calibration tokens (calibration's inputs and outputs); more linears
mean more sweeps (the layers are re-read), never more memory than calibration needs.
The cheaper alternative, measuring only each layer's output error, would miss how the error grows or
fades through the rest of the network, which is what decides the logits.

Two methods (`method`, --analyze-method):
  exact   the sweep above for every linear (the cost just described);
  fisher  (the default) a second-order estimate for every linear from one forward and S backward passes on
          the probe with S label samples, whatever the number of linears (quant/fisher.py: its theory,
          memory and cost), then the exact sweep for the `top_k` linears it ranks worst (--analyze-top).
          The rows say which numbers are measured: est_kl is the estimate (every linear), kl / kl_max /
          top1_change / cosine_mean are exact where "measured" is true and null elsewhere. The estimate's
          forward comes from calibration (it keeps the probe's hidden states) and the exact sweep takes its
          reference stream from the estimate's saved states, so the cost is about 1 calibration + (2 + 2·S)
          probe passes + top_k propagated streams. The default probe is 1/32 of the calibration sequences.
          Measured (benchmarks/bench_quant_analysis.py, one thread, CPU s, least of 2, shared 2-core box), S = 4,
          top_k = 4, the CLI's default 128 × 512 calibration (probe 4 × 512): trained-tiny/dense 1.15× its
          plain calibration, MoE 1.85× (estimates only: 1.05× and 1.54×). Rank agreement with the exact sweep
          there: Spearman 0.92 (dense, 28 linears) and 0.89 (MoE, 144 linears), 3 and 4 of the exact top 5 in
          the estimate's top 5, the exact worst linear first in the table. At a small 16 × 128 calibration
          (probe 1 × 128) fixed costs weigh more: dense 1.90×, MoE 2.63× (a plain calibration of the default
          preset runs 8 of that MoE's 10 layers and observes 8 linears; the analysis runs all 10 and observes
          144). The estimate gives Mamba in_proj 0.25–0.5× its exact KL, out_proj/down_proj within ~1.3×
          (in_proj's error passes the conv, SiLU, dt softplus and gated norm, where a first-order propagation is
          least accurate); the exact top_k puts the worst first. On a GPU (an 8B-shaped random bf16 model,
          64 × 512 calibration, H200, warm): plain calibration 3.44 s; analysis 5.31 s = 1.54× (estimate 1.7 s,
          exact top 4 0.23 s), with the layers kept on the GPU between passes (quant/layer_reads.py) and the
          FP8 weights quantized there.
"""

from __future__ import annotations

import math
import time

import torch

from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.model.device import resolve_device
from nemoconv.quant import fp8
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.fisher import LABEL_SAMPLES, estimate_kl
from nemoconv.quant.layer_reads import KeptLayers
from nemoconv.quant.sizes import check_calibration_sizes
from nemoconv.quant.sweep import Variant, compare_variants
from nemoconv.quant.targets import KIND_LABELS, PRESETS, network_modules
from nemoconv.stream.pipeline import stream_converted

PROBE_FRACTION = 32   # default probe: 1/32 of the calibration sequences (at least one); see the docstring
METHODS = ("fisher", "exact")
TOP_K = 4             # fisher: linears measured exactly after the estimate (each costs a stream)
MAX_TOP_K = 10_000


def max_streams(calib_tokens: int, probe_tokens: int) -> int:
    """Streams per sweep so that the reference and the streams, (1 + streams) probe hidden states, fit in
    what calibration holds: its inputs and outputs, 2 × calibration tokens (a sweep replaces its chunks in
    place, so only one batch of outputs exists beside them)."""
    return max(1, 2 * calib_tokens // max(1, probe_tokens) - 1)


def analyze_fp8(src, preset: str = "default", calib_file=None, calib_samples: int = 128, calib_seq_len: int = 512,
                probe_samples: int | None = None, device: str = "auto", dtype: torch.dtype | None = None,
                quiet: bool = True, calibrator: str = "auto", method: str = "fisher", top_k: int = TOP_K,
                label_samples: int = LABEL_SAMPLES) -> dict:
    """Per-linear FP8 sensitivity of SRC (see the module docstring). Returns a JSON-ready dict whose
    "modules" list is sorted by harm: measured rows by exact KL, then the others by estimate."""

    t0 = time.perf_counter()
    probe_samples = _check_arguments(preset, calib_samples, calib_seq_len, probe_samples, method, top_k,
                                     label_samples)
    dev = resolve_device(device)
    act_dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ck = open_checkpoint(src)
    modules = _analysable(ck)
    targets = [m.name for m in modules]

    data = calibration_tokens(ck, calib_file, calib_samples, calib_seq_len)
    kept_layers = KeptLayers(dev)   # what fits of the layers stays on the GPU for the passes after calibration
    try:
        return _analysis(src, ck, preset, data, modules, targets, probe_samples, dev, act_dtype, quiet, calibrator,
                         method, top_k, label_samples, kept_layers, t0)
    finally:
        kept_layers.clear()


def _analysis(src, ck, preset, data, modules, targets, probe_samples, dev, act_dtype, quiet, calibrator, method,
              top_k, label_samples, kept_layers, t0) -> dict:
    from nemoconv.progress import Progress

    with Progress("calibrate (layers)", quiet=quiet) as progress:
        calib = run_calibration(ck, targets, data.ids, dev, act_dtype, calibrator, progress,
                                keep_rows=probe_samples if method == "fisher" else 0, kept_layers=kept_layers)
    t_calib = time.perf_counter()

    probe = data.ids[:probe_samples]
    live = [m for m in targets if not (fp8.weight_scale_problem(calib.weight_amax.get(m, 0.0))
                                       or fp8.input_scale_problem(calib.amax.get(m, 0.0)))]
    sqnr: dict[str, float] = {}
    estimate, info = None, {"method": method}
    if method == "fisher":
        estimate, live = _estimate(ck, probe, modules, live, calib, dev, act_dtype, label_samples, top_k, sqnr, quiet,
                                   kept_layers)
        info.update(_estimate_info(estimate, top_k))
    t_estimate = time.perf_counter()
    variants = [Variant(m, frozenset([m])) for m in live]
    streams = max_streams(data.ids.numel(), probe.numel())
    with Progress("analyse (layers × sweeps)", quiet=quiet) as progress:
        stats = compare_variants(ck, probe, variants, calib.amax, dev, act_dtype, streams, progress, sqnr,
                                 estimate.hidden if estimate is not None else None, kept_layers) if variants else {}
    if estimate is not None:
        estimate.hidden = []   # the probe's states: no longer needed
    t_end = time.perf_counter()

    rows = _rows(modules, set(PRESETS[preset]), calib, stats, sqnr, estimate)
    calib_s, analyze_s = t_calib - t0, t_end - t_calib
    return {
        "source": str(src),
        "preset": preset,
        "device": str(dev), "dtype": str(act_dtype).removeprefix("torch."),
        "calibration": {**data.info, "samples": int(data.ids.shape[0]), "seq_len": int(data.ids.shape[1]),
                        "tokens": int(data.ids.numel()), "calibrator": calib.calibrator},
        "probe": {"samples": probe_samples, "tokens": int(probe.numel()), "streams_per_sweep": streams,
                  "sweeps": -(-len(variants) // streams) if variants else 0,
                  "what": "the first --analyze-samples calibration sequences"},
        "analysis": {**info, "bytes_kept_on_device": kept_layers.bytes},
        "modules": rows,
        "groups": _groups(rows, estimate),
        "timings_s": {"calibrate": round(calib_s, 3), "analyze": round(analyze_s, 3),
                      "estimate": round(t_estimate - t_calib, 3), "exact": round(t_end - t_estimate, 3),
                      "total": round(t_end - t0, 3), "ratio_to_calibration": round((calib_s + analyze_s) / calib_s, 3)
                      if calib_s > 0 else None},
    }


def _estimate(ck, probe, modules, live, calib, dev, act_dtype, label_samples, top_k, sqnr, quiet, kept_layers):
    """The Fisher estimate for every live linear and the top_k of them by it (to measure exactly)."""
    from nemoconv.progress import Progress

    with Progress("estimate (layers up and down)", quiet=quiet) as progress:
        estimate = estimate_kl(ck, probe, live, calib.amax, dev, act_dtype, {m.name: m.group for m in modules},
                               label_samples, progress=progress, sqnr=sqnr, kept=calib.kept, kept_layers=kept_layers)
    calib.kept = []   # the probe's hidden states: no longer needed
    return estimate, sorted(live, key=lambda m: estimate.kl[m], reverse=True)[:top_k]


def _estimate_info(estimate, top_k: int) -> dict:
    return {"label_samples": estimate.label_samples, "positions": estimate.positions, "exact_top_k": top_k,
            "saved_hidden_bytes": estimate.saved_bytes,
            "estimates": "est_kl (every linear; groups: all the mixer's linears FP8) is a second-order (Fisher) "
                         "estimate of the mean KL; kl, kl_max, top1_change, cosine_mean are exact, measured only "
                         "where measured is true (the exact_top_k linears with the largest est_kl)"}


def _check_arguments(preset: str, calib_samples, calib_seq_len, probe_samples, method, top_k, label_samples) -> int:
    """NemoconvError for a bad argument; the probe's sample count (default 1/PROBE_FRACTION)."""
    if preset not in PRESETS:
        raise NemoconvError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if method not in METHODS:
        raise NemoconvError(f"--analyze-method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_K:
        raise NemoconvError(f"--analyze-top must be an integer in [0, {MAX_TOP_K}], got {top_k!r}")
    if isinstance(label_samples, bool) or not isinstance(label_samples, int) or not 1 <= label_samples <= 1024:
        raise NemoconvError(f"label samples must be an integer in [1, 1024], got {label_samples!r}")
    check_calibration_sizes(calib_samples, calib_seq_len)
    if probe_samples is None:
        probe_samples = max(1, calib_samples // PROBE_FRACTION)
    if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or not 1 <= probe_samples <= calib_samples:
        raise NemoconvError(f"--analyze-samples must be an integer in [1, --calib-samples = {calib_samples}], "
                            f"got {probe_samples!r}")
    return probe_samples


def _analysable(ck) -> list:
    """The network's linears any preset could quantize (NemoconvError when the checkpoint cannot be analysed)."""
    if ck.quantization() is not None:
        raise NemoconvError(f"{ck.path} is already quantized; --analyze needs a bf16/fp32 checkpoint")
    hf_names = {item.name for item in stream_converted(ck, to="hf", meta=True)}
    modules = [m for m in network_modules(ck.spec, hf_names) if m.kind in KIND_LABELS]
    if not modules:
        raise NemoconvError(f"nothing to analyse: no quantizable linear in layers {ck.spec.layer_codes}")
    return modules


def _rows(modules: list, in_preset: set[str], calib, stats: dict, sqnr: dict, estimate) -> list[dict]:
    """One report row per linear, worst first, ranked."""
    rows = []
    for m in modules:
        row = {"module": m.name, "kind": m.kind, "layer": m.layer, "group": m.group, "in_preset": m.kind in in_preset,
               "weight_amax": calib.weight_amax.get(m.name), "input_amax": calib.amax.get(m.name),
               "calibration_tokens": calib.tokens.get(m.name, 0),
               "sqnr_db": _finite(sqnr[m.name]) if m.name in sqnr else None,
               "est_kl": estimate.kl.get(m.name) if estimate is not None else None, "measured": m.name in stats}
        if m.name in stats:
            s = stats[m.name].summary()
            row.update({"kl": s["kl_mean"], "kl_max": s["kl_max"], "top1_change": 1.0 - s["top1_agreement"],
                        "cosine_mean": s["cosine_mean"]})
        else:
            row.update({"kl": None, "kl_max": None, "top1_change": None, "cosine_mean": None})
        if m.name not in sqnr:
            row["note"] = "FP8 cannot scale it (see quantize's summary); quantize leaves it in bf16"
        rows.append(row)
    rows.sort(key=_harm, reverse=True)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _harm(row: dict) -> tuple:
    kl = row["kl"] if row["kl"] is not None else -1.0
    est = row["est_kl"] if row["est_kl"] is not None else -1.0
    return (row["measured"], kl, est, row["top1_change"] or 0.0, -(row["sqnr_db"] or 0.0))


def _groups(rows: list[dict], estimate) -> list[dict]:
    """Per mixer (the unit quantize keeps or drops together): the sum of its linears' exact KL (those measured)
    and, with the estimate, the estimated KL with all its linears FP8; worst first."""
    groups: dict[str, dict] = {}
    for row in rows:
        g = groups.setdefault(row["group"], {"group": row["group"], "kind": row["kind"], "layer": row["layer"],
                                             "linears": 0, "measured": 0, "kl_sum": 0.0, "worst": row["module"],
                                             "est_kl": estimate.group_kl.get(row["group"]) if estimate else None})
        g["linears"] += 1
        g["measured"] += row["measured"]
        g["kl_sum"] += row["kl"] or 0.0
    key = (lambda g: g["est_kl"] or 0.0) if estimate is not None else (lambda g: g["kl_sum"])
    return sorted(groups.values(), key=key, reverse=True)


def write_analysis(result: dict, path) -> None:
    """The JSON report, atomically (a temporary sibling, then a rename)."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NemoconvError(f"--report {path}: cannot write ({exc.strerror or exc})") from None


__all__ = ["analyze_fp8", "write_analysis"]
