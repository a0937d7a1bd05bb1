"""Prefix caching in the built-in engine: shared KV blocks (memory mode), Mamba state checkpoints (state
mode), and the pitfalls that make real systems cache nothing or the wrong thing."""

from __future__ import annotations

import pytest
import torch

from nemoconv.data.demo_checkpoint import random_tensors, tiny_config
from nemoconv.errors import NemoconvError
from nemoconv.model import build_model
from nemoconv.serving.engine import PrefixCachingEngine
from nemoconv.serving.prefix_cache import StateStore, chain_hashes
from nemoconv.storage.config import parse_config
from nemoconv.verification.prefix_check import check_prefix_caching

B = 16          # block size used throughout (= the tiny models' SSM chunk size)
_models: dict = {}


def tiny_model(kind: str = "dense"):
    if kind not in _models:
        spec = parse_config(tiny_config(kind))
        _models[kind] = build_model(spec, random_tensors(spec, seed=7).items(), dtype=torch.float32)
    return _models[kind]


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, mode, **kw):
    kw.setdefault("block_size", B)
    kw.setdefault("prefill_chunk", B)                 # checkpoints at every block boundary, unless a test says
    kw.setdefault("max_tokens", 4096)
    kw.setdefault("max_batch", 4)
    return PrefixCachingEngine(model, mode=mode, **kw)


def shared_prompts(prefix_len=70, suffixes=(5, 17, 33, 1)) -> list[list[int]]:
    prefix = ids(prefix_len, 0)
    return [prefix + ids(n, 100 + i) for i, n in enumerate(suffixes)]


def same_logits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


# ---- outputs identical to no caching --------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "moe", "latent"])
@pytest.mark.parametrize("chunk", [B, 3 * B])
def test_every_mode_gives_bit_identical_logits(kind, chunk):
    model = tiny_model(kind)
    prompts = shared_prompts()
    prompts.append(prompts[1])                        # an exact repeat
    runs = {m: engine(model, m, max_batch=3, prefill_chunk=chunk).generate(prompts, 8, return_logits=True)
            for m in ("off", "memory", "state")}
    assert runs["state"].stats.tokens_skipped > 0 and runs["memory"].stats.kv_blocks_shared > 0
    for mode in ("memory", "state"):
        assert runs[mode].tokens == runs["off"].tokens
        assert same_logits(runs[mode], runs["off"]), mode


@pytest.mark.parametrize("kind", ["dense", "moe", "latent"])
def test_caching_off_is_the_plain_model(kind):
    """The engine's segmented prefill over paged blocks gives the tokens of generate() on a contiguous
    cache, row by row, and logits within float32 rounding of it."""
    model = tiny_model(kind)
    prompts = shared_prompts()
    off = engine(model, "off", prefill_chunk=2 * B).generate(prompts, 12, return_logits=True)
    plain = [model.generate(torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist() for p in prompts]
    assert off.tokens == plain
    for p, got in zip(prompts, off.logits):
        whole = model.prefill(torch.tensor([p]), model.new_cache(1, len(p) + 1), last_only=True)[0]
        assert ((got[0] - whole).abs().max() / whole.abs().max()).item() <= 1e-5


def test_states_are_saved_only_at_multiples_of_the_prefill_chunk():
    model = tiny_model("dense")
    prompts = shared_prompts(prefix_len=70)           # the prompts branch after 4 blocks (64 tokens)
    got = engine(model, "state", prefill_chunk=3 * B).generate(prompts, 4, return_logits=True)
    s = got.stats
    assert s.states_restored == 3 and s.tokens_skipped == 3 * 48     # the checkpoint below 64: 48
    assert s.kv_blocks_shared == 3 * 3 and not s.warnings            # whole chunks only
    off = engine(model, "off", prefill_chunk=3 * B).generate(prompts, 4, return_logits=True)
    assert got.tokens == off.tokens and same_logits(got, off)


def test_prefix_shorter_than_the_prefill_chunk_is_reported_not_skipped():
    """vLLM's other pitfall: checkpoints so far apart that nothing is cached, silently."""
    model = tiny_model("dense")
    prompts = shared_prompts(prefix_len=40)           # 2 full blocks shared, checkpoints every 4
    got = engine(model, "state", prefill_chunk=4 * B).generate(prompts, 4)
    assert got.stats.tokens_skipped == 0 and got.stats.kv_blocks_shared == 0
    assert any("shorter than prefill_chunk (64 tokens)" in w for w in got.stats.warnings)
    assert got.tokens == engine(model, "off", prefill_chunk=4 * B).generate(prompts, 4).tokens


def test_restored_state_is_a_bit_copy_of_a_segmented_prefill():
    """Skipping to a boundary gives exactly what prefilling the prefix, then the rest, gives (the rest at
    its own length, as model.prefill runs it: a padded tail rounds softplus differently on the CPU, see
    test_prefix_tails)."""
    model = tiny_model("dense")
    prompt = ids(64, 0) + ids(15, 1)
    eng = engine(model, "state", prefill_chunk=64, pad_tails=False)    # one segment to 64, one after it
    eng.generate([prompt[:64]], 2)                    # one 64-token segment: KV blocks and the state at 64
    got = eng.generate([prompt], 1, return_logits=True)
    assert got.stats.tokens_skipped == 64
    cache = model.new_cache(1, 128)
    model.prefill(torch.tensor([prompt[:64]]), cache)
    expected = model.prefill(torch.tensor([prompt[64:]]), cache, last_only=True)[0]
    assert torch.equal(got.logits[0][0], expected)


# ---- memory mode ------------------------------------------------------------------------------
def test_memory_mode_shares_blocks_instead_of_allocating_and_recomputes_every_token():
    model = tiny_model("dense")
    prompts = shared_prompts(prefix_len=70)           # 4 full shared blocks
    off = engine(model, "off").generate(prompts, 4)
    eng = engine(model, "memory")
    got = eng.generate(prompts, 4)
    s = got.stats.as_dict()
    assert s["kv_blocks_shared"] == 3 * 4             # requests 2-4 each share the 4 prefix blocks
    assert s["kv_blocks_allocated"] == off.stats.kv_blocks_allocated - 12
    assert s["peak_kv_blocks_in_use"] == off.stats.peak_kv_blocks_in_use - 12
    assert s["kv_bytes_saved"] == 12 * eng.pool.block_bytes
    assert s["tokens_skipped"] == 0                   # memory mode runs every prompt token
    assert s["hits"] == 3 and s["request_hit_rate"] == 0.75
    assert s["token_hit_rate"] == round(12 * B / sum(map(len, prompts)), 4)
    assert not any(eng.pool.refs)                     # every reference released after the call
    assert len(eng.pool.index) > 0                    # …and the prefix blocks stay indexed for later calls


def test_shared_blocks_are_never_written_again():
    model = tiny_model("dense")
    prompts = shared_prompts()
    eng = engine(model, "memory")
    eng.generate(prompts[:1], 2)
    block = eng.pool.lookup(chain_hashes(prompts[0], B)[0])
    before = eng.pool.k[:, block].clone()
    eng.pool.k[:, block] += 1000.0                     # poison the cached block: a rewrite would heal it
    poisoned = eng.pool.k[:, block].clone()
    eng.generate(prompts[1:2], 2)
    assert torch.equal(eng.pool.k[:, block], poisoned)
    eng.pool.k[:, block] = before


# ---- state mode -------------------------------------------------------------------------------
def test_state_mode_skips_the_prefix_at_branch_points_within_one_call():
    model = tiny_model("moe")
    prompts = shared_prompts(prefix_len=70)
    got = engine(model, "state").generate(prompts, 4)
    s = got.stats
    # the first request saves the state where the prompts branch (64 tokens); the other three skip them
    assert s.states_restored == 3 and s.tokens_skipped == 3 * 64
    assert s.hits == 3


def test_state_lands_where_requests_share_tokens_across_calls():
    """vLLM's pitfall: a state saved only at a prompt's end lies in its unique tokens and never hits.
    Here the second request learns the branch point from the indexed KV blocks and saves there."""
    model = tiny_model("dense")
    prefix = ids(70, 0)
    eng = engine(model, "state")
    first = eng.generate([prefix + ids(40, 1)], 2).stats
    second = eng.generate([prefix + ids(40, 2)], 2).stats
    third = eng.generate([prefix + ids(40, 3)], 2).stats
    assert first.tokens_skipped == 0 and second.tokens_skipped == 0     # nothing saved at 64 yet
    assert second.kv_blocks_shared == 4 and second.states_saved >= 1
    assert third.tokens_skipped == 64 and third.states_restored == 1


def test_exact_repeat_runs_at_least_one_token():
    model = tiny_model("dense")
    prompt = ids(4 * B, 5)                            # a whole number of blocks
    eng = engine(model, "state")
    base = engine(model, "off").generate([prompt], 3, return_logits=True)
    eng.generate([prompt], 3)                         # saves at its end (64): a repeat cannot use it
    second = eng.generate([prompt], 3)                # matched in full: saves at 48 for the next repeat
    again = eng.generate([prompt], 3, return_logits=True)
    assert second.stats.tokens_skipped == 0
    assert again.stats.tokens_skipped == 3 * B         # the last block runs: its last token gives the logits
    assert again.tokens == base.tokens == second.tokens


def test_follow_up_turn_extends_a_cached_conversation():
    model = tiny_model("latent")
    turn1 = ids(50, 1)
    eng = engine(model, "state")
    out = eng.generate([turn1], 6).tokens[0]
    turn2 = turn1 + out + ids(30, 2)
    got = eng.generate([turn2], 4)
    assert got.stats.tokens_skipped == 48               # the state saved at turn 1's last full block
    assert got.tokens == engine(model, "off").generate([turn2], 4).tokens


# ---- the pitfalls -----------------------------------------------------------------------------
def test_prefix_shorter_than_one_block_gets_no_hit():
    model = tiny_model("dense")
    prefix = ids(10, 0)                               # < B shared tokens
    prompts = [prefix + ids(30, 1), prefix + ids(30, 2)]
    for mode in ("memory", "state"):
        got = engine(model, mode).generate(prompts, 4)
        s = got.stats.as_dict()
        assert s["hits"] == 0 and s["request_hit_rate"] == 0.0 and s["token_hit_rate"] == 0.0
        assert s["kv_blocks_shared"] == 0 and s["tokens_skipped"] == 0
        assert got.tokens == engine(model, "off").generate(prompts, 4).tokens


def test_no_prompt_filling_a_block_is_reported():
    model = tiny_model("dense")
    got = engine(model, "state", block_size=64, prefill_chunk=64).generate([ids(20, 0), ids(20, 0)], 2)
    assert any("nothing can be shared" in w for w in got.stats.warnings)


def test_divergence_inside_a_block_shares_only_the_full_blocks_before_it():
    model = tiny_model("dense")
    prefix = ids(40, 0)                               # 2.5 blocks shared
    prompts = [prefix + ids(30, 1), prefix + ids(30, 2)]
    for mode, skipped in (("memory", 0), ("state", 32)):
        got = engine(model, mode).generate(prompts, 6)
        assert got.stats.kv_blocks_shared == 2 and got.stats.tokens_skipped == skipped
        assert got.tokens == engine(model, "off").generate(prompts, 6).tokens


def test_state_eviction_is_least_recently_used_and_stays_correct():
    model = tiny_model("dense")
    eng = engine(model, "state")
    one_state = eng.slots.state_bytes
    eng = engine(model, "state", state_budget_bytes=2 * one_state)
    p, q = ids(40, 10), ids(40, 11)
    seq = [p + ids(9, 1), q + ids(9, 2), p + ids(9, 3), q + ids(9, 4), p + ids(9, 5)]
    outs = [eng.generate([x], 3) for x in seq]
    evicted = sum(o.stats.states_evicted for o in outs)
    assert evicted > 0
    assert eng.states.bytes <= 2 * one_state
    assert [o.tokens for o in outs] == [engine(model, "off").generate([x], 3).tokens for x in seq]


def test_store_evicts_the_least_recently_used_entry():
    store = StateStore(budget_bytes=3 * 16)
    state = lambda: (torch.zeros(2), torch.zeros(2))      # noqa: E731  16 bytes each
    for key in (b"a", b"b", b"c"):
        store.put(key, state())
    store.get(b"a")                                       # a is now the most recently used
    store.put(b"d", state())
    assert b"b" not in store and b"a" in store and store.evicted == 1


def test_state_larger_than_the_budget_is_refused_and_reported():
    model = tiny_model("dense")
    prompts = shared_prompts()
    got = engine(model, "state", state_budget_bytes=1).generate(prompts, 4)
    assert got.stats.states_rejected > 0 and got.stats.tokens_skipped == 0
    assert any("state mode cannot skip" in w for w in got.stats.warnings)
    assert got.tokens == engine(model, "off").generate(prompts, 4).tokens


def test_unreferenced_blocks_are_evicted_oldest_first_when_the_pool_is_full():
    model = tiny_model("dense")
    eng = engine(model, "memory", max_tokens=8 * B)   # 8 blocks in all
    a, b = ids(3 * B, 1), ids(3 * B, 2)
    eng.generate([a], 2)                              # a's 3 full blocks stay indexed
    eng.generate([b], 2)                              # b's too: 6 indexed, evictable
    c = ids(5 * B, 3)
    eng.generate([c], B)                              # needs 6 blocks: evicts a's, then some of b's
    assert eng.pool.lookup(chain_hashes(a, B)[0]) is None
    again = eng.generate([a + ids(5, 4)], 2)
    assert again.stats.kv_blocks_shared == 0           # an evicted block is never matched
    assert again.tokens == engine(model, "off").generate([a + ids(5, 4)], 2).tokens


def test_exhausted_pool_is_a_clear_error():
    model = tiny_model("dense")
    with pytest.raises(NemoconvError, match="KV block pool is exhausted"):
        engine(model, "memory", max_tokens=2 * B).generate([ids(3 * B, 0)], 2)


def test_bad_arguments_are_clear_errors():
    model = tiny_model("dense")
    with pytest.raises(NemoconvError, match="unknown prefix-cache mode"):
        PrefixCachingEngine(model, mode="radix")
    with pytest.raises(NemoconvError, match="at least one token"):
        engine(model, "state").generate([[]], 2)
    with pytest.raises(NemoconvError, match="multiple of block_size"):
        engine(model, "state", prefill_chunk=B + 1)


def test_eos_stops_a_row():
    model = tiny_model("dense")
    prompt = ids(30, 0)
    free = engine(model, "state").generate([prompt], 6).tokens[0]
    stopped = engine(model, "state").generate([prompt], 6, eos_token_id=free[2]).tokens[0]
    assert stopped == free[:free.index(free[2]) + 1]


# ---- the verify gate --------------------------------------------------------------------------
def test_check_prefix_caching_passes_and_catches_a_broken_restore(monkeypatch):
    model = tiny_model("moe")
    prompts = shared_prompts(prefix_len=150)
    good = check_prefix_caching(model, prompts, 8, block_size=B, prefill_chunk=4 * B)
    assert good["passed"] and good["modes"]["state"]["stats"]["tokens_skipped"] > 0
    assert all(m["first_logits_bitwise"] and m["logits_bitwise"] for m in good["modes"].values())

    from nemoconv.serving import paged

    def broken(self, slot, state):                    # restores the conv state only: a plausible bug
        self.conv[:, slot].copy_(state[0])
        self.ssm[:, slot].zero_()
    monkeypatch.setattr(paged.SlotPool, "restore", broken)
    bad = check_prefix_caching(model, prompts, 8, block_size=B, prefill_chunk=4 * B)
    assert not bad["passed"] and "state" in bad["failure"]


def test_verify_prefix_cache_flag_gates_and_reports(tiny_dir, tmp_path, capsys, monkeypatch):
    from helpers import read_json, run_cli

    import nemoconv

    src = tiny_dir("moe")
    nemoconv.convert(src, tmp_path / "max", to="max")
    report = tmp_path / "r.json"
    fast = ["--num-prompts", "2", "--seq-len", "24", "--max-new-tokens", "4"]
    code, out, err = run_cli(["verify", src, tmp_path / "max", *fast, "--prefix-cache", "--report", report], capsys)
    assert code == 0, (out, err)
    data = read_json(report)
    pc = data["prefix_cache"]
    assert pc["passed"] and set(pc["modes"]) == {"memory", "state"}
    assert pc["modes"]["state"]["stats"]["tokens_skipped"] > 0 and pc["modes"]["memory"]["stats"]["kv_blocks_shared"] > 0
    assert any(c["metric"] == "prefix_cache_identical" and c["passed"] for c in data["checks"])
    assert "prefix cache state" in out

    from nemoconv.serving import paged
    monkeypatch.setattr(paged.SlotPool, "restore", lambda self, slot, state: self.reset(slot))
    code, out, err = run_cli(["verify", src, tmp_path / "max", *fast, "--prefix-cache"], capsys)
    assert code == 1 and "prefix cache (state)" in err


def test_check_prefix_caching_sizes_its_pool_for_partial_blocks():
    """Prompts that end inside a block need a whole block each: the check must not run out of blocks."""
    model = tiny_model("dense")
    prompts = [ids(65, 0) + ids(3 + i, 1 + i) for i in range(5)]
    assert check_prefix_caching(model, prompts, 16, block_size=64, prefill_chunk=64)["passed"]


def test_paged_decode_attention_reads_each_rows_blocks_up_to_its_position():
    """The paged decode attention (CPU path: gathered blocks) against plain attention per row."""
    from nemoconv.model.cuda import kernels

    g = torch.Generator().manual_seed(1)
    blocks, bs, hk, hq, d = 12, 4, 2, 4, 8
    keys, values = torch.randn(blocks * bs, hk, d, generator=g), torch.randn(blocks * bs, hk, d, generator=g)
    q = torch.randn(2, hq, d, generator=g)
    table = torch.tensor([[5, 2, 9, 0], [11, 7, 3, 1]])
    pos = torch.tensor([6, 13])
    got = kernels.paged_decode_attention(q, keys, values, table, pos, bs)
    for row in range(2):
        p = torch.arange(int(pos[row]) + 1)
        flat = table[row, p // bs] * bs + p % bs
        k = keys[flat].repeat_interleave(hq // hk, dim=1)
        v = values[flat].repeat_interleave(hq // hk, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[row], k) * d ** -0.5, dim=-1)
        assert torch.allclose(got[row], torch.einsum("hn,nhd->hd", w, v), atol=1e-5)


def test_the_engine_reaches_the_model_only_through_public_names():
    """The engine runs the model through `model.run`, `model.logits` and `model.runner`'s public interface."""
    import ast
    from pathlib import Path

    from nemoconv.serving import engine as engine_module

    def names_model(node) -> bool:
        return (isinstance(node, ast.Name) and node.id in ("model", "runner")) or \
            (isinstance(node, ast.Attribute) and node.attr in ("model", "runner"))

    tree = ast.parse(Path(engine_module.__file__).read_text())
    private = sorted({n.attr for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and names_model(n.value) and n.attr.startswith("_")})
    assert private == []
