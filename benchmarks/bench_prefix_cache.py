"""Time to first token with and without prefix caching, for requests sharing a long prefix.

A random bf16 model with the Nemotron-H-8B layout (as in bench_generate) serves N requests that share
a `--prefix`-token prefix (4096 by default) followed by `--suffix` unique tokens each, with the
engine (nemoconv.serving.engine) in each mode on a fresh engine:
  off      every request prefills its whole prompt
  memory   KV blocks of the prefix are shared (no new blocks), every token still runs
  state    the first request saves the Mamba state where the prompts branch; the others restore it
           and prefill only their suffix
TTFT = one request's prefill, from the start to the first token's logits (device-synchronized);
decode_step_ms = the rest of the call (the wave's greedy decode, all rows together) per step.
Each mode runs twice untimed first (kernel compilation, CUDA graph capture), then its caches are
cleared and the same call is timed. Also reported: whether every mode gave the tokens and the
logits (bit for bit) of off, the prefix-cache metrics, a sweep of the prefill chunk (TTFT off and
state), and the default chunk with CUDA graphs off. Prints one JSON object.

    python benchmarks/bench_prefix_cache.py [--prefix 4096 --suffix 256 --requests 4 --out r.json]
    python benchmarks/bench_prefix_cache.py --small     # tiny shapes on the CPU: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import build_ours, config  # noqa: E402

from nemoconv.serving.engine import PrefixCachingEngine
from nemoconv.storage.config import parse_config
from nemoconv.verification.metrics import first_divergence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--suffix", type=int, default=256)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=None, help="the engine's (default: its default)")
    ap.add_argument("--chunks", type=lambda v: [int(x) for x in v.split(",") if x], default=None,
                    help="prefill chunks to sweep (default: 1, 4, 16 and 32 blocks)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if args.small:
        args.prefix, args.suffix, args.new = min(args.prefix, 200), min(args.suffix, 24), min(args.new, 4)
    cfg = config(args.small)
    spec = parse_config(cfg)
    block = args.block_size or max(16, spec.chunk_size)
    if args.chunks is None:
        args.chunks = [block * k for k in (1, 4, 16, 32)]
    model = build_ours(spec, device)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, spec.vocab_size, (args.prefix,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, spec.vocab_size, (args.suffix,), generator=g).tolist()
               for _ in range(args.requests)]
    per_request = -(-(args.prefix + args.suffix + args.new) // block) * block       # whole blocks
    kw = dict(block_size=args.block_size, prefill_chunk=args.prefill_chunk, max_tokens=args.requests * per_request,
              max_batch=args.requests)

    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "small": args.small,
                 "shapes": {k: cfg[k] for k in ("hybrid_override_pattern", "hidden_size", "vocab_size")},
                 "prefix_tokens": args.prefix, "suffix_tokens": args.suffix, "requests": args.requests,
                 "new_tokens": args.new, "modes": {}}
    runs = {}
    def timed(mode: str, **extra):
        """Two warm-up calls (the first compiles kernels and runs each chunk shape eagerly once, the
        second captures the remaining (slot, chunk) CUDA graphs), then the caches are cleared and the
        same call is timed."""
        eng = PrefixCachingEngine(model, mode=mode, **{**kw, **extra})
        for _ in range(2):
            eng.generate(prompts, args.new)
            eng.clear()
        t0 = time.perf_counter()
        run = eng.generate(prompts, args.new, return_logits=True)
        run.wall_s = time.perf_counter() - t0
        return eng, run

    for mode in ("off", "memory", "state"):
        eng, run = timed(mode)
        runs[mode] = run
        ttft = run.ttft_s
        res["modes"][mode] = {
            "ttft_ms": [round(t * 1e3, 2) for t in ttft],
            "ttft_first_ms": round(ttft[0] * 1e3, 2),
            "ttft_rest_median_ms": round(statistics.median(ttft[1:]) * 1e3, 2) if len(ttft) > 1 else None,
            "block_size": eng.block_size,
            "prefill_chunk": eng.prefill_chunk,
            "state_bytes_each": eng.slots.state_bytes,
            "stats": run.stats.as_dict(),
            "graphs": eng.graph_counts(),
            # the wave's decode: the call's time less its prefills, per step (all rows together)
            "decode_step_ms": round((run.wall_s - sum(ttft)) / max(1, args.new - 1) * 1e3, 2),
        }
        if device.type == "cuda":
            res["modes"][mode]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del eng
    off = runs["off"]
    for mode in ("memory", "state"):
        r = res["modes"][mode]
        r["same_tokens_as_off"] = runs[mode].tokens == off.tokens
        r["first_divergence_vs_off"] = [first_divergence(a, b) for a, b in zip(runs[mode].tokens, off.tokens)]
        # the first token's logits: the prefill's output, which carries everything the cache reused
        r["max_abs_first_logit_diff_vs_off"] = max(float((a[0] - b[0]).abs().max())
                                                   for a, b in zip(runs[mode].logits, off.logits))
        r["first_logits_bitwise_vs_off"] = all(torch.equal(a[0], b[0]) for a, b in zip(runs[mode].logits, off.logits))
        r["all_logits_bitwise_vs_off"] = all(torch.equal(a, b) for a, b in zip(runs[mode].logits, off.logits))
    res["max_abs_first_logit"] = max(float(a[0].abs().max()) for a in off.logits)
    # is the model itself repeatable? caching off, twice, on fresh engines
    again = PrefixCachingEngine(model, mode="off", **kw).generate(prompts, args.new, return_logits=True)
    res["off_repeat"] = {"same_tokens": again.tokens == off.tokens,
                         "bit_identical": all(torch.equal(a, b) for a, b in zip(again.logits, off.logits)),
                         "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(again.logits, off.logits))}
    # the prefill chunk: checkpoints (and cuts in every mode) every `chunk` tokens. Shorter chunks cache
    # shorter prefixes but prefill in more segments.
    res["prefill_chunk_sweep"] = {}
    for chunk in args.chunks:
        runs_c = {m: timed(m, prefill_chunk=chunk)[1] for m in ("off", "state")}
        res["prefill_chunk_sweep"][chunk] = {
            "ttft_off_ms": [round(t * 1e3, 2) for t in runs_c["off"].ttft_s],
            "ttft_state_ms": [round(t * 1e3, 2) for t in runs_c["state"].ttft_s],
            "tokens_skipped": runs_c["state"].stats.tokens_skipped,
            "state_same_tokens": runs_c["state"].tokens == runs_c["off"].tokens,
            "state_first_logits_bitwise": all(torch.equal(a[0], b[0]) for a, b in zip(runs_c["state"].logits,
                                                                                     runs_c["off"].logits))}
    # the same without CUDA graphs: every segment's launches issued from the host
    if device.type == "cuda":
        model.cuda_graphs = False
        res["graphs_off"] = {m: [round(t * 1e3, 2) for t in timed(m)[1].ttft_s] for m in ("off", "state")}
        model.cuda_graphs = True
    rest = lambda m: res["modes"][m]["ttft_rest_median_ms"]  # noqa: E731
    if rest("off") and rest("state"):
        res["ttft_speedup_state_vs_off"] = round(rest("off") / rest("state"), 2)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
