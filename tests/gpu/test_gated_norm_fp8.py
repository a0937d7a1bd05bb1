"""The Mamba output norm written by our own kernel (`triton_ops.gated_rmsnorm`), alone and fused with out_proj's FP8
quantization, bit for bit against what it replaced: mamba-ssm's layer_norm_fwd (RMS, gate before the norm), then
`fp8.quantize_fp8`. Also the zero padding rows of the FP8 outputs of RMSNorm, relu² and the standalone quantize, and an
FP8 model's prefill + greedy decode (graphs and eager) with the fusion against the same model running the old path.
Skips without CUDA or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
from cuda_cases import DEVICE, PROMPT, build_case, skip_reason

from nemoconv.model import fp8
from nemoconv.model.cuda import kernels

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

EPS = 1e-5
SHAPES = {"8b": (8192, 8), "tiny": (1024, 4)}       # (inner = heads · head_dim, n_groups)


def fused():
    return kernels.triton_kernels().fused


def mamba_ssm_norm(y, z, weight, eps, group_size):
    """What kernels.gated_rmsnorm ran before: mamba-ssm's layer_norm_fwd on [rows, n] views of y and z."""
    kernels.triton_kernels()                                  # registers mamba_ssm past its CUDA-only root
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd

    n = y.shape[-1]
    y2, z2 = y.reshape(-1, n), z.reshape(-1, n)
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    out, _, _ = _layer_norm_fwd(y2, weight.contiguous(), None, eps, z=z2, group_size=group_size,
                                norm_before_gate=False, is_rms_norm=True)
    return out.reshape(y.shape)


def mamba_ssm_norm_fp8(y2, z2, weight, eps, group_size, input_scale, rows):
    """The old decode path's two launches: mamba-ssm's norm, then the padded quantize of fp8_linear_cuda."""
    return fp8._quantize_padded(mamba_ssm_norm(y2, z2, weight, eps, group_size), input_scale, rows)


def norm_inputs(lead: tuple[int, ...], inner: int, dtype: torch.dtype, seed: int):
    """y [*lead, inner], z the first inner columns of an in_proj-like output [*lead, 2·inner + 2·… + 37] (a
    strided slice, as the model passes it), weight [inner]."""
    g = torch.Generator().manual_seed(seed)
    zx = (torch.randn(*lead, 2 * inner + 1024 + 37, generator=g) * 2).to(DEVICE, dtype)
    y = torch.randn(*lead, inner, generator=g).to(DEVICE, dtype)
    weight = (1 + torch.randn(inner, generator=g) / 5).to(DEVICE, dtype)
    return y, zx[..., :inner], weight


def dirty_allocator(nbytes: int) -> None:
    """Leave non-zero bytes in the caching allocator's free blocks, so that zero padding must really be written."""
    for size in (nbytes, nbytes * 2):
        junk = torch.full((size,), 0x7E, dtype=torch.uint8, device=DEVICE)
        del junk


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3, 8, 64])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gated_norm_is_bitwise_mamba_ssms(shape, batch, dtype):
    inner, groups = SHAPES[shape]
    y, z, w = norm_inputs((batch,), inner, dtype, seed=batch)
    assert z.stride(0) != inner                               # really a strided slice
    want = mamba_ssm_norm(y, z, w, EPS, inner // groups)
    got = fused().gated_rmsnorm(y, z, w, EPS, inner // groups)
    assert got.dtype == dtype and got.shape == y.shape
    assert torch.equal(bits(got), bits(want)), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3, 8, 64])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gated_norm_fp8_is_bitwise_the_norm_then_quantize(shape, batch, dtype):
    inner, groups = SHAPES[shape]
    y, z, w = norm_inputs((batch,), inner, dtype, seed=100 + batch)
    y[:, 0], z[:, 0] = 1e-7, 1.0                              # a nonzero value that rounds to FP8 zero, in every row
    normed = mamba_ssm_norm(y, z, w, EPS, inner // groups)
    scale = (normed.float().abs().max() / 600).reshape(())   # the largest values saturate at ±448
    rows = fp8.padded_rows(batch)
    dirty_allocator(rows * inner)
    got = fused().gated_rmsnorm(y, z, w, EPS, inner // groups, quant=(scale, rows))
    want = fp8.quantize_fp8(normed, scale)
    assert got.dtype == fp8.FP8_DTYPE and got.shape == (rows, inner)
    assert torch.equal(bits(got[:batch]), bits(want))
    assert not bits(got[batch:]).any()                        # the padding rows are zeros
    assert (want.float().abs() == 448).any() and (want.float() == 0).any()   # clamp and underflow were exercised


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_norm_of_a_sequence_is_bitwise_mamba_ssms(dtype):
    """The prefill's shape: y [b, s, n], z a slice of [b, s, …], rows = b·s; alone and fused."""
    inner, groups = SHAPES["8b"]
    y, z, w = norm_inputs((2, 300), inner, dtype, seed=7)
    want = mamba_ssm_norm(y, z, w, EPS, inner // groups)
    assert torch.equal(bits(fused().gated_rmsnorm(y, z, w, EPS, inner // groups)), bits(want))
    scale = (want.float().abs().max() / 600).reshape(())
    got = fused().gated_rmsnorm(y.reshape(600, inner), z.reshape(600, inner), w, EPS, inner // groups,
                                quant=(scale, fp8.padded_rows(600)))
    assert torch.equal(bits(got[:600]), bits(fp8.quantize_fp8(want.reshape(600, inner), scale)))
    assert not bits(got[600:]).any()


@pytest.mark.parametrize("batch", [1, 3, 16, 17])
def test_fp8_outputs_of_the_norm_relu2_and_quantize_kernels_are_exact_with_zero_padding(batch):
    """rmsnorm (+ residual add) with quant, relu2_fp8 and quantize_fp8: real rows bitwise fp8.quantize_fp8 of what the
    unquantized kernels return, the rows past them zeros (the padding programs only store zeros)."""
    g = torch.Generator().manual_seed(batch)
    x, d = (torch.randn(2, batch, 4096, generator=g) * 3).to(DEVICE, torch.bfloat16)
    w = (1 + torch.randn(4096, generator=g) / 10).to(DEVICE, torch.bfloat16)
    scale = torch.tensor(0.004, device=DEVICE)                # some of the normed values saturate
    rows = fp8.padded_rows(batch)
    t = fused()
    r, y = t.rmsnorm(x, w, EPS, delta=d)
    outputs = {}
    dirty_allocator(rows * 4096)
    r_q, y_q, outputs["add_rmsnorm"] = t.rmsnorm(x, w, EPS, delta=d, quant=(scale, rows))
    assert torch.equal(bits(r_q), bits(r)) and torch.equal(bits(y_q), bits(y))
    dirty_allocator(rows * 4096)
    y1, outputs["rmsnorm"] = t.rmsnorm(x, w, EPS, quant=(scale, rows))
    dirty_allocator(rows * 4096)
    outputs["quantize"] = t.quantize_fp8(x, scale, rows)
    dirty_allocator(rows * 4096)
    outputs["relu2"] = t.relu2_fp8(x, scale, rows)
    wants = {"add_rmsnorm": fp8.quantize_fp8(y, scale), "rmsnorm": fp8.quantize_fp8(t.rmsnorm(x, w, EPS), scale),
             "quantize": fp8.quantize_fp8(x, scale), "relu2": fp8.quantize_fp8(t.relu2(x), scale)}
    assert torch.equal(bits(y1), bits(t.rmsnorm(x, w, EPS)))
    for name, got in outputs.items():
        assert got.shape == (rows, 4096), name
        assert torch.equal(bits(got[:batch]), bits(wants[name])), name
        assert not bits(got[batch:]).any(), name
    assert (wants["add_rmsnorm"].float().abs() == 448).any()


# ---- the model: the fusion changes no logit -------------------------------------------------------------------
STEPS = 10


def prompts(b: int, pad: int):
    ids = torch.randint(3, 1024, (b, PROMPT), generator=torch.Generator().manual_seed(b)).to(DEVICE)
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def greedy_trace(model, b: int, pad: int, graphs: bool) -> torch.Tensor:
    """Prefill (fused prefill path), then STEPS greedy decode steps → logits [STEPS + 1, b, vocab]."""
    model.cuda_graphs = graphs
    ids, mask = prompts(b, pad)
    cache = model.new_cache(b, PROMPT + STEPS + 1)
    logits = [model.prefill(ids, cache, mask if pad else None, last_only=True)]
    for _ in range(STEPS):
        logits.append(model.decode_step(logits[-1].argmax(-1), cache))
    model.cuda_graphs = True
    return torch.stack(logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,pad", [(1, 0), (3, 17)])
def test_fp8_model_logits_are_bitwise_the_unfused_norm_path(dtype, b, pad, monkeypatch):
    model = build_case("dense", dtype, fp8=True)
    calls = []
    real = kernels.gated_rmsnorm_fp8

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(kernels, "gated_rmsnorm_fp8", counting)
    new = {graphs: greedy_trace(model, b, pad, graphs) for graphs in (True, False)}
    assert b in calls and len(calls) > STEPS             # the fused norm ran in decode (eager: every step) and prefill
    monkeypatch.setattr(kernels, "gated_rmsnorm", mamba_ssm_norm)
    monkeypatch.setattr(kernels, "gated_rmsnorm_fp8", mamba_ssm_norm_fp8)
    old = {graphs: greedy_trace(model, b, pad, graphs) for graphs in (True, False)}
    for graphs in (True, False):
        assert torch.equal(new[graphs], old[graphs]), (graphs, (new[graphs] - old[graphs]).abs().max())
    # and with every fused path off (modules one by one): the same greedy tokens
    monkeypatch.undo()
    monkeypatch.setattr(model.runner, "fused_ok", lambda: False)
    unfused = greedy_trace(model, b, pad, graphs=False)
    assert torch.equal(unfused.argmax(-1), new[True].argmax(-1))
    cosine = torch.nn.functional.cosine_similarity(unfused.double().flatten(), new[True].double().flatten(), dim=0)
    assert cosine > 0.9999, cosine
