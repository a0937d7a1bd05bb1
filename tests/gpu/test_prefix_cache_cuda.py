"""Prefix caching on the CUDA path (Triton scan and state update, SDPA over gathered KV blocks).

Skips without CUDA or without mamba-ssm's Triton kernels.
Model: the small real-shaped hybrid of test_cuda_model (cuda_cases.build) (chunk 64, GQA, grouped-routing MoE), in
bfloat16 and float32. Prompts share a 300-token prefix that ends inside a block (block 64).
  prefill chunk 64 and 256: memory and state modes give the tokens of caching off and bit-identical
                    first-token logits (every mode cuts its prefill at the same multiples of the chunk,
                    so each segment is the same computation); decode logits are reported
  the engine with caching off gives the tokens of model.generate on a contiguous cache
  CUDA graphs (test_fast_path's dense model, bf16 and FP8): whole prefill chunks and decode steps
                    replayed from graphs give the bits of the eager engine, in every mode
  paged decode attention (Triton, static shapes) matches gathered-block attention on rows at
                    different positions
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_cases import build, skip_reason
from cuda_cases import build_case as build_dense

from nemoconv.serving.engine import PrefixCachingEngine

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
NEW = 12


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, vocab, (300,), generator=g).tolist()
    out = [prefix + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (40, 77, 5)]
    return out + [out[0]]


def run_modes(model, batch, chunk: int) -> dict:
    kw = dict(block_size=64, max_tokens=4096, max_batch=4, prefill_chunk=chunk)
    return {m: PrefixCachingEngine(model, mode=m, **kw).generate(batch, NEW, return_logits=True)
            for m in ("off", "memory", "state")}


def ulps(largest: float, dtype) -> float:
    mantissa = {torch.bfloat16: 7, torch.float32: 23}[dtype]
    return 2 * 2.0 ** (math.floor(math.log2(largest)) - mantissa)


def measure(dtype) -> dict:
    model = build("cuda", dtype)
    batch = prompts(model.spec.vocab_size)
    out = {}
    for chunk in (64, 256):
        runs = run_modes(model, batch, chunk)
        off = runs["off"]
        largest = max(float(x.abs().max()) for x in off.logits)
        for mode in ("memory", "state"):
            got = runs[mode]
            out[f"chunk{chunk}_{mode}"] = {
                "same_tokens": got.tokens == off.tokens,
                "first_bitwise": all(torch.equal(a[0], b[0]) for a, b in zip(got.logits, off.logits)),
                "bit_identical": all(torch.equal(a, b) for a, b in zip(got.logits, off.logits)),
                "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(got.logits, off.logits)),
                "allowed": ulps(largest, dtype) if dtype == torch.bfloat16 else 1e-5 * largest,
                "tokens_skipped": got.stats.tokens_skipped, "kv_blocks_shared": got.stats.kv_blocks_shared}
    plain = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW)[0, len(p):].tolist() for p in batch]
    out["off_equals_generate"] = runs["off"].tokens == plain
    return out


def graphs_vs_eager(fp8: bool) -> dict:
    model = build_dense("dense", torch.bfloat16, fp8)
    batch = prompts(model.spec.vocab_size)
    kw = dict(block_size=64, max_tokens=8192, max_batch=4, prefill_chunk=64)
    out = {}
    model.cuda_graphs = False
    eager = PrefixCachingEngine(model, mode="off", **kw).generate(batch, NEW, return_logits=True)
    model.cuda_graphs = True
    for mode in ("off", "memory", "state"):
        eng = PrefixCachingEngine(model, mode=mode, **kw)
        eng.generate(batch, NEW)                      # slot 0 runs each chunk eagerly, the others capture
        eng.clear()
        got = eng.generate(batch, NEW, return_logits=True)
        out[mode] = {"same_tokens": got.tokens == eager.tokens,
                     "bit_identical": all(torch.equal(a, b) for a, b in zip(got.logits, eager.logits)),
                     "graphs": eng.graph_counts()}
    return out


def paged_attention_check(dtype) -> dict:
    """The Triton paged decode attention against attention over each row's gathered keys (float64)."""
    from nemoconv.model.cuda import kernels

    g = torch.Generator(device="cuda").manual_seed(5)
    blocks, B, hk, hq, d = 40, 16, 2, 8, 64
    keys = torch.randn(blocks * B, hk, d, device="cuda", generator=g).to(dtype)
    values = torch.randn(blocks * B, hk, d, device="cuda", generator=g).to(dtype)
    q = torch.randn(3, hq, d, device="cuda", generator=g).to(dtype)
    perm = torch.randperm(blocks, device="cuda", generator=g)
    table = torch.stack([perm[:13], perm[13:26], perm[26:39]])                     # [3, 13] shuffled blocks
    pos = torch.tensor([0, 100, 13 * B - 1], device="cuda")                        # rows at their own positions
    got = kernels.paged_decode_attention(q, keys, values, table, pos, B).double()
    worst = 0.0
    for row in range(3):
        n = int(pos[row]) + 1
        p = torch.arange(n, device="cuda")
        flat = table[row, p // B] * B + p % B
        k = keys[flat].double().repeat_interleave(hq // hk, dim=1)                 # [n, hq, d]
        v = values[flat].double().repeat_interleave(hq // hk, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[row].double(), k) * d ** -0.5, dim=-1)
        want = torch.einsum("hn,nhd->hd", w, v)
        worst = max(worst, float((got[row] - want).abs().max()))
    return {"max_abs_err": worst, "allowed": 2e-2 if dtype == torch.bfloat16 else 1e-5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_decode_attention_matches_gathered_blocks(dtype):
    r = paged_attention_check(dtype)
    assert r["max_abs_err"] <= r["allowed"], r


@pytest.mark.parametrize("fp8", [False, True])
def test_prefill_chunk_graphs_give_the_eager_bits(fp8):
    r = graphs_vs_eager(fp8)
    for mode, d in r.items():
        assert d["same_tokens"] and d["bit_identical"], r
        for kind in ("prefill", "decode"):
            assert d["graphs"][kind]["replays"] > 0 and not d["graphs"][kind]["error"], r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefix_cache_on_cuda(dtype):
    r = measure(dtype)
    for chunk in (64, 256):
        for mode in ("memory", "state"):
            d = r[f"chunk{chunk}_{mode}"]
            assert d["same_tokens"] and d["first_bitwise"] and d["max_abs_diff"] <= d["allowed"], r
        assert r[f"chunk{chunk}_state"]["tokens_skipped"] > 0 and r[f"chunk{chunk}_memory"]["kv_blocks_shared"] > 0
    assert r["off_equals_generate"], r
