"""Benchmark: `quantize --analyze` time against a plain calibration, and what --max-kl budgets give.

For each checkpoint: (1) a plain calibration of the default preset's targets; (2) the analysis (its own
calibration of every quantizable linear + the layer-by-layer sweep), the ratio of the two (goal ≤ 2×);
(3) for each budget (the preset alone, then fractions of the KL the preset reaches on the held-out verify
prompts) the quantized checkpoint's held-out perplexity (the fixture's heldout_tokens, never calibrated on)
and KL against the unquantized model. Prints one JSON document.

    PYTHONPATH=$PWD python benchmarks/bench_quant_analysis.py ../shared/fixtures/trained-tiny/dense \
        --calib-samples 16 --calib-seq-len 256 --budgets 0.5,0.25
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import nemoconv
from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.targets import plan_targets
from nemoconv.stream.pipeline import stream_converted
from nemoconv.verification.metrics import LogitStats


def plain_calibration_s(src, samples, seq_len) -> float:
    ck = open_checkpoint(src)
    names = {i.name for i in stream_converted(ck, to="hf", meta=True)}
    plan = plan_targets(ck.spec, names, "default", [], lambda m: m)
    data = calibration_tokens(ck, None, samples, seq_len)
    t0 = time.perf_counter()
    run_calibration(ck, plan.quantized, data.ids, torch.device("cpu"), torch.float32, "builtin")
    return time.perf_counter() - t0


def heldout(path: Path, rows: int, seq_len: int) -> torch.Tensor:
    tokens = load_file(str(path))["tokens"].long()
    return tokens[: rows * seq_len].view(rows, seq_len)


def quality(ref_logits: torch.Tensor, ckpt, ids: torch.Tensor) -> dict:
    logits = nemoconv.load_model(ckpt)(ids)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    kl = LogitStats().add(ref_logits.reshape(-1, logits.shape[-1]), logits.reshape(-1, logits.shape[-1])).summary()
    return {"perplexity": math.exp(float(nll)), "kl_mean": kl["kl_mean"], "top1_agreement": kl["top1_agreement"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--analyze-samples", type=int, default=None)
    ap.add_argument("--budgets", default="0.5,0.25", help="fractions of the preset's held-out KL")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--heldout-rows", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {"device": "cpu", "threads": torch.get_num_threads(), "results": []}
    for src in args.checkpoints:
        src = Path(src)
        entry = {"checkpoint": str(src), "preset": args.preset,
                 "calibration": {"samples": args.calib_samples, "seq_len": args.calib_seq_len}}
        entry["plain_calibration_s"] = round(plain_calibration_s(src, args.calib_samples, args.calib_seq_len), 2)
        a = nemoconv.analyze_fp8(src, preset=args.preset, calib_samples=args.calib_samples,
                                 calib_seq_len=args.calib_seq_len, probe_samples=args.analyze_samples, device="cpu",
                                 calibrator="builtin")
        ratio = round(a["timings_s"]["total"] / entry["plain_calibration_s"], 2)
        entry["analysis"] = {"timings_s": a["timings_s"], "probe": a["probe"], "ratio_to_plain_calibration": ratio,
                             "top5": [{k: r[k] for k in ("module", "kl", "top1_change", "sqnr_db")}
                                      for r in a["modules"][:5]]}
        ids = heldout(src.parent / "heldout_tokens.safetensors", args.heldout_rows, args.calib_seq_len)
        ref = nemoconv.load_model(src)(ids)
        nll = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
        entry["reference_perplexity"] = math.exp(float(nll))
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            preset_kl = None
            for label, fraction in [("preset", None)] + [(f"{f}×preset", float(f)) for f in args.budgets.split(",")]:
                max_kl = 10.0 if fraction is None else preset_kl * fraction
                dst = Path(tmp) / label
                t0 = time.perf_counter()
                try:
                    r = nemoconv.quantize(src, dst, preset=args.preset, calib_samples=args.calib_samples,
                                          calib_seq_len=args.calib_seq_len, device="cpu", max_kl=max_kl,
                                          calibrator="builtin")
                except nemoconv.NemoconvError as exc:
                    runs.append({"budget": label, "max_kl": max_kl, "error": str(exc)})
                    continue
                b = r["quantization"]["budget"]
                if preset_kl is None:
                    preset_kl = b["preset_result"]["kl"]
                runs.append({"budget": label, "max_kl": max_kl if fraction is not None else None,
                             "quantize_s": round(time.perf_counter() - t0, 1), "timings_s": r["timings_s"],
                             "kept_in_bf16": [k["mixer"] for k in b["kept_in_bf16"]],
                             "heldout_verify_prompts": b["result"], **quality(ref, dst, ids)})
        entry["budgets"] = runs
        out["results"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
