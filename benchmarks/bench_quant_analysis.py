"""Benchmark: `quantize --analyze` time against a plain calibration, and what --max-kl budgets give.

For each checkpoint: (1) a plain calibration of the default preset's targets; (2) the analysis (its own
calibration of every quantizable linear + the Fisher estimate + the exact sweep of the --analyze-top worst;
one run per comma-separated value; with --exact also the exact sweep of every linear, and the estimate's
agreement with it: top-5 overlap, Spearman), each one's ratio to (1) (goal ≤ 2×);
(3) for each budget (the preset alone, then fractions of the KL the preset reaches on the held-out verify
prompts) the quantized checkpoint's held-out perplexity (the fixture's heldout_tokens, never calibrated on)
and KL against the unquantized model (and with --decode N, greedy decode tokens/s at batch 1).
Prints one JSON document. Times are wall seconds; on CPU also the process's CPU seconds (less sensitive to a
shared machine's load). --make-8b DIR writes a random bf16 checkpoint with the Nemotron-H-8B layout (as
bench_quantize.py; ~16 GB, drawn on the GPU) and benchmarks it too (analysis time only: it has no held-out
tokens).

    PYTHONPATH=$PWD python benchmarks/bench_quant_analysis.py ../shared/fixtures/trained-tiny/dense \
        --calib-samples 16 --calib-seq-len 256 --budgets 0.5,0.25
    PYTHONPATH=$PWD python benchmarks/bench_quant_analysis.py ../shared/fixtures/trained-tiny/{dense,moe} \
        --calib-samples 16 --calib-seq-len 128 --threads 1 --skip-budgets --exact --analyze-top 0,4,8
    python benchmarks/bench_quant_analysis.py --device cuda --make-8b /tmp/qa8b --skip-budgets
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import nemoconv  # noqa: E402
from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.fisher import LABEL_SAMPLES, spearman
from nemoconv.quant.targets import plan_targets
from nemoconv.stream.pipeline import stream_converted
from nemoconv.verification.metrics import LogitStats


def plain_calibration_s(src, samples, seq_len, device: torch.device, repeat: int = 1) -> tuple[float, float]:
    """(wall s, process CPU s) of a plain calibration of the default preset's targets."""
    ck = open_checkpoint(src)
    names = {i.name for i in stream_converted(ck, to="hf", meta=True)}
    plan = plan_targets(ck.spec, names, "default", [], lambda m: m)
    data = calibration_tokens(ck, None, samples, seq_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return timed(lambda: run_calibration(ck, plan.quantized, data.ids, device, dtype, "builtin"), device, repeat)[:2]


def timed(fn, device: torch.device, repeat: int = 1):
    """(wall s, process CPU s, result) of fn(), device-synchronized; the least of `repeat` runs of each (a shared
    machine's load only ever adds time)."""
    walls, cpus = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def decode_tok_s(path, device: torch.device, new: int) -> float:
    model = nemoconv.load_model(path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    ids = torch.arange(1, 33, device=device)[None]
    model.generate(ids, max_new_tokens=new)   # warm-up
    one = timed(lambda: model.generate(ids, max_new_tokens=1), device)[0]
    full = timed(lambda: model.generate(ids, max_new_tokens=new), device)[0]
    return round((new - 1) / max(full - one, 1e-9), 1)


def make_8b(directory: Path) -> Path:
    """A random bf16 Nemotron-H-8B-shaped checkpoint (bench_quantize.py's), written once."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_quantize import write_source

    src = directory / "src"
    if not (src / "config.json").exists():
        write_source(src, False, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return src


def heldout(path: Path, rows: int, seq_len: int) -> torch.Tensor:
    tokens = load_file(str(path))["tokens"].long()
    return tokens[: rows * seq_len].view(rows, seq_len)


def quality(ref_logits: torch.Tensor, ckpt, ids: torch.Tensor, device: torch.device) -> dict:
    logits = nemoconv.load_model(ckpt, device=device)(ids).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    kl = LogitStats().add(ref_logits.reshape(-1, logits.shape[-1]), logits.reshape(-1, logits.shape[-1])).summary()
    return {"perplexity": math.exp(float(nll)), "kl_mean": kl["kl_mean"], "top1_agreement": kl["top1_agreement"]}


def analysis_entry(src: Path, args, device: torch.device) -> dict:
    entry = {"checkpoint": str(src), "preset": args.preset,
             "calibration": {"samples": args.calib_samples, "seq_len": args.calib_seq_len}}
    wall, cpu = plain_calibration_s(src, args.calib_samples, args.calib_seq_len, device, args.repeat)
    entry["plain_calibration_s"], entry["plain_calibration_cpu_s"] = round(wall, 2), round(cpu, 2)
    runs = [("fisher", int(k)) for k in args.analyze_top.split(",")] + ([("exact", None)] if args.exact else [])
    results = {}
    for method, top in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        label = method if top is None else f"{method}-top{top}"
        wall, cpu, a = timed(lambda: nemoconv.analyze_fp8(
            src, preset=args.preset, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
            probe_samples=args.analyze_samples, device=device.type, calibrator="builtin", method=method,
            **({} if top is None else {"top_k": top, "label_samples": args.label_samples})), device,
            1 if method == "exact" else args.repeat)
        results[label] = a
        entry[label] = {"timings_s": a["timings_s"], "probe": a["probe"], "analysis": a["analysis"],
                        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                        "ratio_to_plain_calibration": round(wall / entry["plain_calibration_s"], 2),
                        "cpu_ratio_to_plain_calibration": round(cpu / max(entry["plain_calibration_cpu_s"], 1e-9), 2),
                        "top5": [{k: r[k] for k in ("module", "est_kl", "kl", "top1_change", "sqnr_db")}
                                 for r in a["modules"][:5]]}
        if device.type == "cuda":
            entry[label]["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    if "exact" in results:
        entry["agreement_with_exact"] = {label: agreement(a, results["exact"]) for label, a in results.items()
                                         if label != "exact"}
    return entry


def agreement(fisher: dict, exact: dict) -> dict:
    """How the estimate ranks the linears against the exact sweep: Spearman over every measured linear, and the
    overlap of the top 5 (the estimate's top 5 against the exact top 5; then the final table's top 5)."""
    est = {r["module"]: r["est_kl"] for r in fisher["modules"] if r["est_kl"] is not None}
    kl = {r["module"]: r["kl"] for r in exact["modules"] if r["kl"] is not None}
    names = sorted(set(est) & set(kl))
    top = (lambda d: set(sorted(names, key=lambda n: d[n], reverse=True)[:5]))
    table_top = {r["module"] for r in fisher["modules"][:5]}
    return {"linears": len(names), "spearman_est_vs_exact": round(spearman([est[n] for n in names],
                                                                           [kl[n] for n in names]), 3),
            "top5_overlap_est_vs_exact": len(top(est) & top(kl)),
            "top5_overlap_table_vs_exact": len(table_top & top(kl)),
            "table_first_is_exact_worst": fisher["modules"][0]["module"] == max(names, key=lambda n: kl[n])}


def budget_runs(src: Path, args, device: torch.device) -> tuple[float, list[dict]]:
    ids = heldout(src.parent / "heldout_tokens.safetensors", args.heldout_rows, args.calib_seq_len).to(device)
    ref = nemoconv.load_model(src, device=device)(ids).float()
    nll = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        preset_kl = None
        for label, fraction in [("preset", None)] + [(f"{f}×preset", float(f)) for f in args.budgets.split(",")]:
            max_kl = 10.0 if fraction is None else preset_kl * fraction
            dst = Path(tmp) / label
            t0 = time.perf_counter()
            try:
                r = nemoconv.quantize(src, dst, preset=args.preset, calib_samples=args.calib_samples,
                                      calib_seq_len=args.calib_seq_len, device=device.type, max_kl=max_kl,
                                      calibrator="builtin")
            except nemoconv.NemoconvError as exc:
                runs.append({"budget": label, "max_kl": max_kl, "error": str(exc)})
                continue
            b = r["quantization"]["budget"]
            if preset_kl is None:
                preset_kl = b["preset_result"]["kl"]
            run = {"budget": label, "max_kl": max_kl if fraction is not None else None,
                   "quantize_s": round(time.perf_counter() - t0, 1), "timings_s": r["timings_s"],
                   "kept_in_bf16": [k["mixer"] for k in b["kept_in_bf16"]],
                   "heldout_verify_prompts": b["result"], **quality(ref, dst, ids, device)}
            if args.decode:
                run["decode_b1_tok_s"] = decode_tok_s(dst, device, args.decode)
            runs.append(run)
    return math.exp(float(nll)), runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--analyze-samples", type=int, default=None)
    ap.add_argument("--analyze-top", default="4", help="fisher runs: comma-separated --analyze-top values")
    ap.add_argument("--label-samples", type=int, default=LABEL_SAMPLES, help="fisher: label sets per probe sequence")
    ap.add_argument("--repeat", type=int, default=1, help="time each calibration and fisher run this many times, "
                                                           "report the least (a loaded machine only adds time)")
    ap.add_argument("--exact", action="store_true", help="also the exact sweep of every linear, and how the "
                                                          "estimate agrees with it (top-5 overlap, Spearman)")
    ap.add_argument("--budgets", default="0.5,0.25", help="fractions of the preset's held-out KL")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--heldout-rows", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--make-8b", type=Path, default=None, help="write (once) and benchmark an 8B-shaped model here")
    ap.add_argument("--skip-budgets", action="store_true", help="analysis time only")
    ap.add_argument("--decode", type=int, default=0, help="also decode tokens/s of each budget's output (N new)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "load_before": os.getloadavg(), "results": []}
    sources = [Path(c) for c in args.checkpoints] + ([make_8b(args.make_8b)] if args.make_8b else [])
    for src in sources:
        if not (src / "config.json").is_file():   # e.g. ../shared/fixtures absent
            out.setdefault("skipped", []).append(f"{src}: no checkpoint there")
            continue
        entry = analysis_entry(src, args, device)
        if not args.skip_budgets and (src.parent / "heldout_tokens.safetensors").exists():
            entry["reference_perplexity"], entry["budgets"] = budget_runs(src, args, device)
        out["results"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
