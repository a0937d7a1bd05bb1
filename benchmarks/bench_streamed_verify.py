"""`nemoconv verify` of a Nemotron-H-8B-shaped bf16 pair, whole model against layer streaming under a memory cap.

Builds (or reuses) the pair of bench_verify.py (random bf16 weights with the 8B layout, ~16 GB; the candidate
is its lossless `max` conversion), then runs verify twice on the same prompts: `--stream-layers off` (the
whole model) and with `--max-gpu-memory CAP` (default 6GB; auto then streams), and prints JSON with the
wall time, the verdict, torch's peak allocated CUDA memory and the streamed runs' own ledger peaks.

    python benchmarks/bench_streamed_verify.py [--dir DIR] [--cap 6GB] [--small] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_verify import build  # noqa: E402

import nemoconv  # noqa: E402


def run(ref: Path, cand: Path, args, **streaming) -> dict:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = nemoconv.verify(ref, cand, num_prompts=args.num_prompts, seq_len=args.seq_len,
                             max_new_tokens=args.max_new_tokens, device=args.device, record=False, **streaming)
    out = {"wall_s": round(time.perf_counter() - t0, 2), "passed": report.passed, "profile": report.profile,
           "failure": None if report.passed else report.failure_line(), "timings_s": report.timings,
           "overall": {k: report.overall[k] for k in ("max_abs_diff", "cosine_mean", "top1_agreement",
                                                      "greedy_identical_prompts", "prompts")},
           "reference_tokens": [p["reference_tokens"] for p in report.prompts]}
    if torch.cuda.is_available():
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    info = report.settings.get("stream_layers", {})
    out["stream_layers"] = {k: info.get(k) for k in ("streamed", "reason")}
    if info.get("memory"):
        out["stream_layers"]["memory"] = info["memory"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="Tiny dimensions (CPU smoke run).")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--cap", default="6GB")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--only", choices=["whole", "streamed", "both"], default="both")
    args = ap.parse_args()
    work = args.dir or Path(f"/tmp/nemoconv-bench-verify{'-small' if args.small else ''}")
    ref, cand = work / "ref-hf", work / "cand-max"
    out: dict = {"cap": args.cap}
    if not (ref / "config.json").is_file() or not (cand / "config.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        out["checkpoint_bytes"] = build(ref, args.small, "cuda" if torch.cuda.is_available() else "cpu")
        nemoconv.convert(ref, cand, to="max")
        out["build_and_convert_s"] = round(time.perf_counter() - t0, 2)
    if args.only in ("whole", "both"):
        out["whole"] = run(ref, cand, args, stream_layers="off")
        print(json.dumps(out["whole"]), flush=True)
    if args.only in ("streamed", "both"):
        out["streamed"] = run(ref, cand, args, stream_layers="auto", max_gpu_memory=args.cap)
    if "whole" in out and "streamed" in out:
        out["same_reference_tokens"] = out["whole"]["reference_tokens"] == out["streamed"]["reference_tokens"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
