"""End-to-end `nemoconv verify` timing on a Nemotron-H-8B-shaped bf16 pair (target: ≤ 60 s on one H100).

Builds a random bf16 checkpoint with the 8B layout (52 layers M-M-M-M*-…, hidden 4096, 32 heads / 8 kv
of 128, MLP 21504, Mamba 128 heads of 64, 8 groups, state 128, vocab 131072; ~16 GB), written shard by
shard with nemoconv's streaming writer (values drawn on the GPU when there is one), converts it to the
`max` scheme for the candidate (lossless, so `auto` picks the `exact` profile), then times
`nemoconv.verify` end to end, loads included, and prints JSON.

    python benchmarks/bench_verify.py [--dir /tmp/nemoconv-bench-verify] [--keep] [--device auto]
    python benchmarks/bench_verify.py --small      # same 52-layer pattern, tiny dimensions: a CPU smoke run

The pair is reused when --dir already holds it (--rebuild to force). Right after building, the shards
sit in the page cache; `page_cache` in the output says so (a cold run reads 2 x 16 GB from disk).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import nemoconv  # noqa: E402
from nemoconv.data.demo_checkpoint import tiny_config
from nemoconv.storage.config import parse_config
from nemoconv.storage.safetensors_io import PlannedTensor
from nemoconv.stream.output import ShardedWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PATTERN_8B, SHAPE_8B, SHAPE_SMALL  # noqa: E402


def config(small: bool) -> dict:
    cfg = tiny_config("dense", hybrid_override_pattern=PATTERN_8B, **(SHAPE_SMALL if small else SHAPE_8B))
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """Magnitudes like nemoconv.data.demo_checkpoint.random_tensors (non-degenerate logits), drawn on `device`."""
    kw = {"generator": g, "device": device, "dtype": torch.float32}
    uniform = lambda lo, hi: torch.empty(shape, device=device).uniform_(lo, hi, generator=g)  # noqa: E731
    if name.endswith("A_log"):
        t = torch.log(uniform(1.0, 16.0))
    elif name.endswith(".D"):
        t = uniform(0.5, 1.5)
    elif name.endswith("dt_bias"):
        dt = torch.exp(uniform(-6.9, -2.3))
        t = dt + torch.log(-torch.expm1(-dt))
    elif "norm" in name:
        t = 1.0 + 0.1 * torch.randn(shape, **kw)
    elif name.endswith("bias"):
        t = 0.02 * torch.randn(shape, **kw)
    elif name.endswith("embeddings.weight"):
        t = torch.randn(shape, **kw)
    else:
        t = torch.randn(shape, **kw) / math.sqrt(shape[-1])
    return t.to(torch.bfloat16).cpu()


def build(directory: Path, small: bool, device: str) -> int:
    cfg = config(small)
    spec = parse_config(cfg)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    planned = [PlannedTensor(n, torch.bfloat16, s) for n, s in spec.hf_shapes().items()]
    writer = ShardedWriter(directory, planned, 5_000_000_000, {"format": "pt"})
    g = torch.Generator(device=device).manual_seed(0)
    for p in planned:
        writer.write(p.name, random_tensor(p.name, p.shape, g, device))
    writer.close()
    return sum(p.nbytes for p in planned)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="Tiny dimensions (CPU smoke run).")
    ap.add_argument("--dir", type=Path, default=None, help="Work directory (reused when it holds the pair).")
    ap.add_argument("--rebuild", action="store_true", help="Rebuild the pair even if --dir holds one.")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoints afterwards.")
    ap.add_argument("--device", default="auto", help="Where verify runs: auto, cpu or cuda.")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--prefix-cache", action="store_true", help="Also run verify's prefix-cache check.")
    args = ap.parse_args()
    work = args.dir or Path(f"/tmp/nemoconv-bench-verify{'-small' if args.small else ''}")
    ref, cand = work / "ref-hf", work / "cand-max"
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"

    out: dict = {"shape": "small" if args.small else "nemotron-h-8b", "pattern": PATTERN_8B}
    fresh = args.rebuild or not (ref / "config.json").is_file() or not (cand / "config.json").is_file()
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        out["checkpoint_bytes"] = build(ref, args.small, gen_device)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        manifest = nemoconv.convert(ref, cand, to="max")
        out["convert_to_max_s"] = round(time.perf_counter() - t0, 2)
        assert manifest["lossless"], manifest["lossy_steps"][:3]
    else:
        out["checkpoint_bytes"] = nemoconv.open_checkpoint(ref).total_bytes
    out["page_cache"] = "warm (just written)" if fresh else "whatever the last run left"
    out["parameters"] = out["checkpoint_bytes"] // 2

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    report = nemoconv.verify(ref, cand, num_prompts=args.num_prompts, seq_len=args.seq_len,
                             max_new_tokens=args.max_new_tokens, device=args.device, report_path=work / "report.json",
                             prefix_cache=args.prefix_cache)
    wall = time.perf_counter() - t0
    out.update({
        "verify_wall_s": round(wall, 2),
        "target_s": 60 if not args.small else None,
        "target_met": (wall <= 60) if not args.small else None,
        "passed": report.passed,
        "failure": None if report.passed else report.failure_line(),
        "profile": report.profile,
        "device": report.device,
        "dtype": report.dtype,
        "timings_s": report.timings,
        "overall": {k: report.overall[k] for k in ("max_abs_diff", "cosine_mean", "top1_agreement", "kl_mean",
                                                   "greedy_identical_prompts", "prompts")},
        "cache_relative": {"candidate": report.cache["candidate"]["relative_max"],
                           "reference": report.cache["reference"]["relative_max"],
                           "tolerance": report.cache["tolerance_relative"]},
        "fingerprint_mode": sorted(k for k in report.candidate["fingerprint"] if k.startswith("sha256")),
        "report": str(work / "report.json"),
    })
    from nemoconv.model.cuda import kernels, warmup
    out["kernel_warmup"] = warmup.last.as_dict() if warmup.last is not None else None
    out["autotune_seeding"] = dict(kernels._autotune_state) or None
    if report.prefix_cache is not None:
        pc = report.prefix_cache
        out["prefix_cache"] = {"passed": pc["passed"], "failure": pc["failure"], "max_abs_allowed": pc["max_abs_allowed"],
                               "prefill_chunk": pc["prefill_chunk"], "prompt_tokens": pc["prompt_tokens"],
                               **{m: {k: v[k] for k in ("identical", "first_logits_bitwise", "logits_bitwise",
                                                        "first_divergence", "max_abs_diff", "ttft_s")}
                                  | {"tokens_skipped": v["stats"]["tokens_skipped"]} for m, v in pc["modes"].items()}}
    out["autotune_choices"] = kernels.autotune_choices() if torch.cuda.is_available() else {}
    if torch.cuda.is_available():
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out, indent=2))
    if not args.keep and args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
