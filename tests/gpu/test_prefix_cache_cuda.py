"""Prefix caching on the CUDA path (Triton scan and state update, SDPA over gathered KV blocks).

Run with pytest (skips without CUDA or without mamba-ssm's Triton kernels), or directly:
    python tests/gpu/test_prefix_cache_cuda.py      # prints a JSON summary
Model: the small real-shaped hybrid of test_cuda_model (chunk 64, GQA, grouped-routing MoE), in
bfloat16 and float32. Prompts share a 300-token prefix that ends inside a block.
  aligned prefill   memory and state modes give bit-identical logits to caching off
  default prefill   the same greedy tokens; bfloat16 logits within verify's exact profile (2 ulps at
                    the largest |logit|), float32 within 1e-5 of the largest |logit| (the scan and
                    GEMMs group their sums differently over segments: a few float32 ulps)
  the engine with caching off gives the tokens of model.generate on a contiguous cache
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_model import build, skip_reason  # noqa: E402
from nemoconv.model.engine import PrefixCachingEngine  # noqa: E402

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
NEW = 12


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, vocab, (300,), generator=g).tolist()
    out = [prefix + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (40, 77, 5)]
    return out + [out[0]]


def run_modes(model, batch, aligned: bool) -> dict:
    kw = dict(block_size=64, max_tokens=4096, max_batch=4, aligned_prefill=aligned)
    return {m: PrefixCachingEngine(model, mode=m, **kw).generate(batch, NEW, return_logits=True)
            for m in ("off", "memory", "state")}


def ulps(largest: float, dtype) -> float:
    mantissa = {torch.bfloat16: 7, torch.float32: 23}[dtype]
    return 2 * 2.0 ** (math.floor(math.log2(largest)) - mantissa)


def measure(dtype) -> dict:
    model = build("cuda", dtype)
    batch = prompts(model.spec.vocab_size)
    out = {}
    for aligned in (True, False):
        runs = run_modes(model, batch, aligned)
        off = runs["off"]
        largest = max(float(x.abs().max()) for x in off.logits)
        for mode in ("memory", "state"):
            got = runs[mode]
            out[f"{'aligned' if aligned else 'default'}_{mode}"] = {
                "same_tokens": got.tokens == off.tokens,
                "bit_identical": all(torch.equal(a, b) for a, b in zip(got.logits, off.logits)),
                "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(got.logits, off.logits)),
                "allowed": ulps(largest, dtype) if dtype == torch.bfloat16 else 1e-5 * largest,
                "tokens_skipped": got.stats.tokens_skipped, "kv_blocks_shared": got.stats.kv_blocks_shared}
    plain = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW)[0, len(p):].tolist() for p in batch]
    out["off_equals_generate"] = runs["off"].tokens == plain
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefix_cache_on_cuda(dtype):
    r = measure(dtype)
    for mode in ("memory", "state"):
        assert r[f"aligned_{mode}"]["bit_identical"], r
        d = r[f"default_{mode}"]
        assert d["same_tokens"] and d["max_abs_diff"] <= d["allowed"], r
    assert r["aligned_state"]["tokens_skipped"] > 0 and r["default_memory"]["kv_blocks_shared"] > 0
    assert r["off_equals_generate"], r


if __name__ == "__main__":
    if skip_reason():
        print(json.dumps({"skipped": skip_reason()}))
        sys.exit(0)
    print(json.dumps({str(dt): measure(dt) for dt in (torch.bfloat16, torch.float32)}, indent=1))
