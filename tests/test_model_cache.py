"""Hybrid cache and cache-driven generation: cached decoding reproduces the full forward, padding is inert."""

from __future__ import annotations

import pytest
import torch

from nemoconv.data.demo_checkpoint import random_tensors, tiny_config
from nemoconv.errors import NemoconvError
from nemoconv.model import HybridCache, build_model
from nemoconv.storage.config import ATTENTION, MAMBA, parse_config

KINDS = ["dense", "moe", "latent"]
_models: dict = {}


def tiny_model(kind: str, dtype=torch.float32, **overrides):
    key = (kind, dtype, tuple(sorted(overrides.items())))
    if key not in _models:
        spec = parse_config(tiny_config(kind, **overrides))
        _models[key] = build_model(spec, random_tensors(spec, seed=7).items(), dtype=dtype)
    return _models[key]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_every_cached_decode_step_matches_the_full_forward(kind):
    model = tiny_model(kind)
    ids = random_ids(2, 40)
    full = model(ids)                                                     # [2, 40, vocab]
    cache = model.new_cache(2, 40)
    prefill = model.prefill(ids[:, :9], cache)
    assert rel_err(prefill, full[:, :9]) <= 1e-5
    for t in range(9, 40):
        step = model.decode_step(ids[:, t], cache)                        # [2, vocab]
        assert rel_err(step, full[:, t]) <= 1e-5, t
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_in_odd_sized_chunks_matches_the_full_forward(kind):
    model = tiny_model(kind)   # chunk_size 16: pieces straddle scan-chunk boundaries
    ids = random_ids(3, 45, seed=1)
    full = model(ids)
    cache = model.new_cache(3, 48)
    pieces, start = [], 0
    for size in (1, 7, 3, 17, 5, 12):
        pieces.append(model.prefill(ids[:, start:start + size], cache))
        start += size
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-5
    # and decoding continues from the chunked prefill
    nxt = random_ids(3, 1, seed=2)
    cont = model(torch.cat([ids, nxt], dim=1))[:, -1]
    assert rel_err(model.decode_step(nxt, cache), cont) <= 1e-5


def padded_batch(ids: torch.Tensor, pads: list[int]):
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_rows_match_the_same_rows_unpadded(kind):
    model = tiny_model(kind)
    ids, mask = padded_batch(random_ids(3, 33, seed=3), [0, 5, 21])      # 21 > chunk_size and > conv width
    logits = model(ids, attention_mask=mask)
    for row, n in enumerate([0, 5, 21]):
        alone = model(ids[row:row + 1, n:])
        assert rel_err(logits[row, n:], alone[0]) <= 1e-5


def test_padded_generation_matches_unpadded_generation_row_by_row():
    model = tiny_model("moe")
    pads = [4, 0, 13]
    ids, mask = padded_batch(random_ids(3, 24, seed=4), pads)
    out = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    assert out.shape == (3, 34)
    for row, n in enumerate(pads):
        alone = model.generate(ids[row:row + 1, n:], max_new_tokens=10)
        assert torch.equal(out[row, n:], alone[0])


def test_padded_chunked_prefill_then_decode_matches_unpadded():
    model = tiny_model("dense")
    ids, mask = padded_batch(random_ids(2, 30, seed=5), [0, 11])
    cache = model.new_cache(2, 31)
    model.prefill(ids[:, :8], cache, attention_mask=mask[:, :8])         # row 1: all padding
    model.prefill(ids[:, 8:], cache, attention_mask=mask[:, 8:])
    nxt = random_ids(2, 1, seed=6)
    step = model.decode_step(nxt, cache)
    for row, n in enumerate([0, 11]):
        alone = model(torch.cat([ids[row:row + 1, n:], nxt[row:row + 1]], dim=1))[0, -1]
        assert rel_err(step[row], alone) <= 1e-5


def test_reorder_cache_permutes_rows_exactly():
    model = tiny_model("dense")
    ids = random_ids(3, 12, seed=8)
    cache = model.new_cache(3, 16)
    model.prefill(ids, cache)
    before = {k: getattr(cache, k).clone() for k in ("kv", "conv", "ssm", "valid")}
    beam = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam)
    assert torch.equal(cache.kv, before["kv"][:, :, beam])
    assert torch.equal(cache.conv, before["conv"][:, beam])
    assert torch.equal(cache.ssm, before["ssm"][:, beam])
    assert torch.equal(cache.valid, before["valid"][beam])
    # decoding from the reordered cache is decoding the reordered prompts
    nxt = random_ids(3, 1, seed=9)
    expected = model(torch.cat([ids[beam], nxt], dim=1))[:, -1]
    assert rel_err(model.decode_step(nxt, cache), expected) <= 1e-5


def test_cache_holds_kv_only_for_attention_and_state_only_for_mamba_layers():
    model = tiny_model("moe", dtype=torch.bfloat16)                      # ME*EME
    spec = model.spec
    cache = model.new_cache(batch_size=2, max_length=50)
    per_layer = cache.layer_memory_bytes()
    for i, code in enumerate(spec.layer_codes):
        if code == ATTENTION:
            kv = 2 * 2 * spec.num_key_value_heads * 50 * spec.head_dim * 2          # k+v, bf16
            assert per_layer[i] == {"kv": kv}
        elif code == MAMBA:
            conv = 2 * spec.conv_dim * (spec.conv_kernel - 1) * 2                    # bf16
            ssm = 2 * spec.mamba_num_heads * spec.mamba_head_dim * spec.ssm_state_size * 4   # fp32
            assert per_layer[i] == {"conv": conv, "ssm": ssm}
        else:
            assert i not in per_layer                                                # MLP / MoE: nothing
    totals = cache.memory_bytes()
    assert totals["kv"] == sum(v.get("kv", 0) for v in per_layer.values())
    assert totals["ssm"] == sum(v.get("ssm", 0) for v in per_layer.values())
    assert totals["total"] == totals["kv"] + totals["conv"] + totals["ssm"] + totals["mask"]
    assert cache.ssm.dtype == torch.float32 and cache.kv.dtype == torch.bfloat16
    assert HybridCache(spec, 1, 8, ssm_dtype=torch.bfloat16).ssm.dtype == torch.bfloat16


def test_decoding_never_reallocates_the_cache():
    model = tiny_model("moe")
    cache = model.new_cache(2, 20)
    pointers = {k: getattr(cache, k).data_ptr() for k in ("kv", "conv", "ssm", "valid")}
    model.prefill(random_ids(2, 6), cache)
    for t in range(14):
        model.decode_step(random_ids(2, 1, seed=t), cache)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert {k: getattr(cache, k).data_ptr() for k in pointers} == pointers
    with pytest.raises(NemoconvError, match="at most 20 positions"):
        model.decode_step(random_ids(2, 1), cache)


def test_generate_stops_rows_at_eos_and_pads_them():
    model = tiny_model("dense")
    ids = random_ids(2, 10, seed=10)
    greedy = model.generate(ids, max_new_tokens=8)
    eos = int(greedy[0, 12])                                              # row 0's third new token
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out.shape == (2, 18)
    first = (greedy[0, 10:] == eos).nonzero()[0].item()
    assert torch.equal(out[0, :11 + first], greedy[0, :11 + first])
    assert torch.all(out[0, 11 + first:] == 0)
    stop = (greedy[1, 10:] == eos).nonzero()
    upto = 10 + (stop[0].item() + 1 if len(stop) else 8)
    assert torch.equal(out[1, :upto], greedy[1, :upto])


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = tiny_model("latent")
    ids = random_ids(2, 8, seed=11)
    a = model.generate(ids, 6, temperature=0.8, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, 6, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(ids, 6, temperature=1.0, top_k=1), model.generate(ids, 6))
