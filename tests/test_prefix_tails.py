"""The engine's padded prefill tails: a prompt's last, shorter segment is padded on the right to a bucket
length and masked, so that one CUDA graph per bucket serves every real length in it.

What must hold: the real positions compute what the unpadded tail computes (logits at the last real
position, Mamba conv and SSM states, keys/values), pads leave no trace (their content changes nothing,
their keys/values never land in a block a request owns), the length reaches the pass only as a device
tensor (a replayed graph serves other lengths), and every mode still gives the bits of caching off.

On the CPU the padded tail is not bitwise the unpadded one: torch's CPU softplus (the Mamba step size)
runs full vector lanes through a vectorized exp/log and the remainder through the scalar one, so the
same element can round differently (by 1 float32 ulp) when the tensor is longer, and a GEMM of 1 row
may take another path than one of 16. The masking itself is
exact: tested bitwise on the conv and the scan, and by changing the pads' content. The end-to-end
comparison allows 1e-5 of the largest logit (and of the largest state).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_prefix_cache import B, engine, ids, tiny_model

from nemoconv.model.common import Pass
from nemoconv.model.cuda import kernels
from nemoconv.model.mamba import last_inputs
from nemoconv.serving.prefix_cache import tail_bucket

CHUNK = 8 * B                                     # buckets 16, 32, … 128 (a step of one block)
TAILS = (1, B, B + 1, CHUNK - 1)                  # one token, a bucket edge, one past it, a chunk less one


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * max(float(b.abs().max()), 1.0))


# ---- the bucket ---------------------------------------------------------------------------------
def test_tail_buckets_are_block_multiples_of_at_least_an_eighth_chunk():
    assert [tail_bucket(n, 128, 1024) for n in (1, 128, 129, 256, 257, 1023)] == [128, 128, 256, 256, 384, 1024]
    assert [tail_bucket(n, 16, 1024) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]   # step 1024/8
    assert [tail_bucket(n, 16, 16) for n in (1, 15, 16)] == [16, 16, 16]
    assert [tail_bucket(n, 16, 48) for n in (1, 17, 33, 47)] == [16, 32, 48, 48]
    for chunk, block in ((1024, 128), (1024, 16), (256, 64), (48, 16)):
        buckets = {tail_bucket(n, block, chunk) for n in range(1, chunk + 1)}
        assert len(buckets) <= 8 and all(b % block == 0 and b <= chunk for b in buckets)
        assert all(tail_bucket(n, block, chunk) - n < max(block, chunk // 8) for n in range(1, chunk + 1))


# ---- the masking, exactly ---------------------------------------------------------------------
@pytest.mark.parametrize("real", [1, 2, 3, 11, 16])
def test_conv_context_is_the_last_real_inputs(real):
    """After a padded segment the conv context is the last k-1 REAL inputs (reaching back into the old
    context when there are fewer), bit for bit what the unpadded conv leaves."""
    g = torch.Generator().manual_seed(real)
    c, k, s = 24, 4, 16
    x = torch.randn(2, s, c, generator=g)
    weight, bias = torch.randn(c, k, generator=g), torch.randn(c, generator=g)
    context = torch.randn(2, c, k - 1, generator=g)
    lengths = torch.tensor([real, s])
    got = last_inputs(context, x, lengths)
    for row in range(2):
        want = context[row:row + 1].clone()
        kernels.causal_conv1d_silu(x[row:row + 1, :int(lengths[row])], weight, bias, want)
        assert torch.equal(got[row:row + 1], want)


@pytest.mark.parametrize("real", [1, 7, 16, 17, 30])
def test_padding_with_zero_step_x_and_b_leaves_the_scan_state_unchanged(real):
    """dt = 0 (decay exp(0·A) = 1) and x = B = 0 (nothing added) at the pads: the scan's final state and
    the real positions' outputs are bit for bit those of the unpadded scan."""
    g = torch.Generator().manual_seed(real)
    b, s, h, p, n = 1, 32, 4, 8, 16
    x, B_, C = (torch.randn(b, s, *shape, generator=g) for shape in ((h, p), (1, n), (1, n)))
    dt, A, D = torch.rand(b, s, h, generator=g), -torch.rand(h, generator=g), torch.randn(h, generator=g)
    init = torch.randn(b, h, p, n, generator=g)
    pad = (torch.arange(s) >= real)[None, :, None]
    y_pad, state_pad = kernels.ssd_chunk_scan(x.masked_fill(pad[..., None], 0.0), dt.masked_fill(pad, 0.0), A,
                                              B_.masked_fill(pad[..., None], 0.0), C, D, 16, init, True)
    y, state = kernels.ssd_chunk_scan(x[:, :real], dt[:, :real], A, B_[:, :real], C[:, :real], D, 16, init, True)
    assert torch.equal(state_pad, state) and torch.equal(y_pad[:, :real], y)


def mamba_pass(mixer, hidden, lengths, conv, ssm):
    cache = SimpleNamespace(layer_mamba=lambda i: (conv, ssm))
    ctx = Pass(cache=cache, start=32, pad_mask=None, attn_mask=None, causal=False, decode=False, lengths=lengths)
    return mixer(hidden, ctx)


def test_pad_content_never_reaches_a_real_output_or_the_state():
    """Two padded passes whose pads differ (one garbage, one huge) give bit-identical real outputs, conv
    and SSM states; the unpadded pass agrees within float32 rounding (softplus, see the docstring)."""
    model = tiny_model("dense")
    mixer = model.backbone.layers[0].mixer
    spec, real, width = model.spec, 11, 16
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, width, spec.hidden_size, generator=g)
    conv0 = torch.randn(1, spec.conv_dim, spec.conv_kernel - 1, generator=g)
    ssm0 = torch.randn(1, spec.mamba_num_heads, spec.mamba_head_dim, spec.ssm_state_size, generator=g)
    outs = []
    garbage = torch.randn(1, width - real, spec.hidden_size, generator=g)
    for pads in (garbage, torch.full_like(garbage, 1e4)):
        conv, ssm = conv0.clone(), ssm0.clone()
        y = mamba_pass(mixer, torch.cat([hidden[:, :real], pads], 1), torch.tensor([real]), conv, ssm)
        outs.append((y[:, :real], conv, ssm))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    conv, ssm = conv0.clone(), ssm0.clone()
    y = mamba_pass(mixer, hidden[:, :real], None, conv, ssm)
    # (in_proj over 11 rows or 16 may round differently too: a CPU GEMM's blocking depends on the row count)
    assert close(outs[0][0], y) and close(outs[0][1], conv) and close(outs[0][2], ssm)


# ---- the engine ---------------------------------------------------------------------------------
def tail_prompts(tails=TAILS) -> list[list[int]]:
    prefix = ids(CHUNK, 0)                        # one shared chunk, then tails of each length
    return [prefix + ids(n, 50 + n) for n in tails] + [ids(n, 80 + n) for n in (5, CHUNK - 1)]


def slot_states(eng, count):
    return [eng.slots.snapshot(slot) for slot in range(count)]


def test_padded_tail_is_the_unpadded_computation():
    """Logits at the last real position, the Mamba states after the prompt, the keys/values of every real
    position: padded tails against exact-length ones; then the same greedy tokens."""
    model, prompts = tiny_model("dense"), tail_prompts()
    runs, states, kv = {}, {}, {}
    for pad in (True, False):
        eng = engine(model, "off", prefill_chunk=CHUNK, max_batch=len(prompts), pad_tails=pad)
        runs[pad] = eng.generate(prompts, 1, return_logits=True)     # prefill only: the states are the prompts'
        states[pad] = slot_states(eng, len(prompts))
        kv[pad] = (eng.pool.k[:, :eng.pool.num_blocks].clone(), eng.pool.v[:, :eng.pool.num_blocks].clone())
    for a, b in zip(runs[True].logits, runs[False].logits):
        assert close(a[0], b[0])
    for (conv_a, ssm_a), (conv_b, ssm_b) in zip(states[True], states[False]):
        assert close(conv_a, conv_b) and close(ssm_a, ssm_b)
    # both engines handed out the same blocks (allocation does not depend on padding): the real positions
    # agree, and positions past each prompt hold the pool's zeros in both (no pad was written there)
    for a, b in zip(kv[True], kv[False]):
        assert close(a, b)
    new = {pad: engine(model, "off", prefill_chunk=CHUNK, max_batch=len(prompts), pad_tails=pad).generate(prompts, 6)
           for pad in (True, False)}
    assert new[True].tokens == new[False].tokens


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_every_mode_is_bit_identical_to_off_with_padded_tails(kind):
    model, prompts = tiny_model(kind), tail_prompts()
    prompts.append(prompts[2])                    # a repeat: state mode skips to the chunk, then one padded tail
    runs = {m: engine(model, m, prefill_chunk=CHUNK, max_batch=3).generate(prompts, 5, return_logits=True)
            for m in ("off", "memory", "state")}
    assert runs["state"].stats.tokens_skipped >= 3 * CHUNK and runs["memory"].stats.kv_blocks_shared > 0
    for mode in ("memory", "state"):
        assert runs[mode].tokens == runs["off"].tokens
        assert all(torch.equal(a, b) for a, b in zip(runs[mode].logits, runs["off"].logits)), mode


def test_pads_never_write_into_a_requests_blocks():
    """A pool sized exactly to two requests whose tails pad past their reserved blocks (a bucket step of
    two blocks): no position outside a request's prompt is written, and the first request's blocks are
    not disturbed by the second's pads (with block 0 behind a short table, they would be)."""
    model = tiny_model("dense")
    chunk = 16 * B                                # step 2 blocks: a 1-token tail pads to 32 positions
    prompts = [ids(chunk + 1, 1), ids(chunk + 3, 2)]
    need = [-(-len(p) // B) for p in prompts]     # max_new_tokens = 1: no decode position reserved
    eng = engine(model, "off", prefill_chunk=chunk, max_batch=2, max_tokens=sum(need) * B)
    assert eng.pool.num_blocks == sum(need) and tail_bucket(1, B, chunk) == 2 * B
    eng.pool.k.fill_(1234.0)
    eng.pool.v.fill_(1234.0)
    got = eng.generate(prompts, 1, return_logits=True)
    first = 0
    for p, n in zip(prompts, need):               # blocks are handed out in order: 0, 1, …
        k = eng.pool.k[:, first:first + n].flatten(1, 2)                     # [layers, positions, hk, d]
        assert not (k[:, :len(p)] == 1234.0).any() and (k[:, len(p):] == 1234.0).all()
        first += n
    assert not (eng.pool.k[:, eng.pool.sink] == 1234.0).all()              # the pads went to the sink
    plain = engine(model, "off", prefill_chunk=chunk, max_batch=2, pad_tails=False).generate(prompts, 1,
                                                                                             return_logits=True)
    assert got.tokens == plain.tokens and all(close(a, b) for a, b in zip(got.logits, plain.logits))


class ReplayingGraphs:
    """What a CUDA graph does, on the CPU: the first call of a key records its function; every later call
    of that key runs the RECORDED function on the new inputs (anything else it used is baked in)."""

    def __init__(self):
        self.entries, self.keys = {}, []

    def run(self, key, run, *inputs, compiled=False):
        self.keys.append(key)
        return self.entries.setdefault(key, run)(*inputs), True


def test_one_tail_graph_serves_every_length_in_its_bucket():
    """Tails of 17, 20 and 32 tokens (bucket 32) after the same chunk, in one slot: one key, replayed
    with each tail's inputs, gives the logits and tokens of running each eagerly."""
    model = tiny_model("dense")
    prefix = ids(CHUNK, 0)
    prompts = [prefix + ids(n, 60 + n) for n in (17, 20, 32)]
    eng = engine(model, "off", prefill_chunk=CHUNK, max_batch=1)
    eng._graphs = ReplayingGraphs()
    eng._graph_key = lambda ids, fused: ("model state",)
    got = eng.generate(prompts, 4, return_logits=True)
    tail_keys = {k for k in eng._graphs.keys if k[1][2] == 2 * B}
    assert len(tail_keys) == 1 and len(eng._graphs.keys) == 6                # 3 × (chunk, tail)
    eager = engine(model, "off", prefill_chunk=CHUNK, max_batch=1).generate(prompts, 4, return_logits=True)
    assert got.tokens == eager.tokens
    assert all(torch.equal(a, b) for a, b in zip(got.logits, eager.logits))
