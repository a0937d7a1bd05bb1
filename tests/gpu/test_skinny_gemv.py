"""The skinny product of decode steps (`triton_gemv.skinny_linear`, `kernels.linear`): at most 16 rows against a
weight read once, in bf16/fp16/fp32 and in FP8 with per-tensor scales, with relu² and FP8 quantization of the
result in its epilogue; the model's decode on it against cuBLAS (the model routes bf16/fp16/fp32 weights to it;
FP8 weights stay on cuBLASLt, see `fp8.fp8_matmul_quantized`); an FP8 MLP of skinny products against cuBLASLt's; and
every FP8 product of a decode step of the FP8 test model, on its own input, against cuBLASLt's.

Covers what the kernel branches on: one row (multiply-adds) and several (tensor-core tiles), a reduction that is
and is not a multiple of the tile, an output width that is not a multiple of the block, bias. Skips without CUDA
or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_cases import DEVICE, build_case, skip_reason

from nemoconv import settings
from nemoconv.model import fp8
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import Linear

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

SHAPES = [(1000, 4096), (96, 240), (4096, 1536)]        # (out, in): 240 is not a multiple of any tile's BK
TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4),
       torch.float32: dict(rtol=2e-5, atol=1e-5)}


def operands(rows, n, k, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, k, generator=g, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g, device=DEVICE).to(dtype)
    return x, w, b


def skinny(*args, **kw):
    return kernels.triton_kernels().fused.skinny_linear(*args, **kw)


@pytest.mark.parametrize("rows", [1, 2, 8, 16])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_the_product_matches_float64(rows, n, k, dtype, bias):
    x, w, b = operands(rows, n, k, dtype, seed=rows * 31 + n + k)
    b = b if bias else None
    y = skinny(x, w, b)
    want = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert y.shape == (rows, n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), want.to(dtype).double(), **TOL[dtype])


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_the_fp8_product_is_the_emulated_fp8_linear(rows, n, k, bias):
    x, w, b = operands(rows, n, k, torch.bfloat16, seed=rows + n)
    w_scale = (w.float().abs().amax() / fp8.FP8_MAX).reshape(())
    x_scale = (x.float().abs().amax() / fp8.FP8_MAX).reshape(())
    w_q, x_q = fp8.quantize_fp8(w, w_scale), fp8.quantize_fp8(x, x_scale)
    y = skinny(x_q, w_q, b if bias else None, scales=(x_scale, w_scale), out_dtype=torch.bfloat16)
    want = fp8.fp8_linear_emulated(x, w_q, w_scale, x_scale)    # exact products, float32 sums, one rounding
    if bias:
        want = want + b                                         # _scaled_mm's output, then the bias (rounded twice)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "fp8"])
def test_the_relu2_and_fp8_epilogues_are_bitwise_the_separate_kernels(rows, quantized):
    x, w, _ = operands(rows, 2048, 512, torch.bfloat16, seed=rows)
    scales = None
    if quantized:
        w_scale = (w.float().abs().amax() / fp8.FP8_MAX).reshape(())
        x_scale = (x.float().abs().amax() / fp8.FP8_MAX).reshape(())
        x, w, scales = fp8.quantize_fp8(x, x_scale), fp8.quantize_fp8(w, w_scale), (x_scale, w_scale)
    plain = skinny(x, w, scales=scales, out_dtype=torch.bfloat16)
    relu2 = skinny(x, w, scales=scales, out_dtype=torch.bfloat16, relu2=True)
    assert torch.equal(relu2, kernels.relu2(plain))
    q_scale = (relu2.float().amax() / 600).reshape(())        # the largest values saturate at 448
    q = skinny(x, w, scales=scales, out_dtype=torch.bfloat16, relu2=True, quant_scale=q_scale)
    assert q.dtype == fp8.FP8_DTYPE
    want = kernels.relu2_fp8(plain, q_scale, rows)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert bool((q.float() == fp8.FP8_MAX).any())


def test_bad_operands_are_refused():
    x, w, _ = operands(17, 64, 64, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="16 rows"):
        skinny(x, w)
    with pytest.raises(ValueError):
        skinny(x[:4], w.t().contiguous().t())                   # weight rows not contiguous
    with pytest.raises(ValueError):
        skinny(x[:4], w[:, :32])                                 # reduction widths differ
    with settings.override(skinny=True):
        assert not kernels.skinny_ok(x, w)                      # 17 rows: the model keeps cuBLAS
        assert kernels.skinny_ok(x[:16], w)
        assert not kernels.skinny_ok(x[:16].cpu(), w.cpu())
    with settings.override(skinny=False):
        assert not kernels.skinny_ok(x[:16], w)                 # the switch off


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "fp8"])
def test_decode_runs_on_the_skinny_kernel_and_is_close_to_cublas(quantize, monkeypatch):
    """The same model's decode step with the skinny kernel and with cuBLAS (NEMOCONV_SKINNY=0): the kernel really
    ran, with relu² in the bf16 MLPs' up_proj epilogue (FP8 MLPs, Mamba products stay on cuBLASLt: only the FP8
    model's bf16 linears, attention and lm_head, change), and the logits agree."""
    model = build_case("dense", torch.bfloat16, quantize)
    model.cuda_graphs = False                                   # eager steps: each sees the switch as set
    ids = torch.randint(3, model.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    fused = kernels.triton_kernels().fused
    calls = []
    real = fused.skinny_linear
    monkeypatch.setattr(fused, "skinny_linear", lambda *a, **kw: calls.append(kw.get("relu2")) or real(*a, **kw))
    runs = {}
    for on in (True, False):
        with settings.override(skinny=on):
            cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
            model.prefill(ids, cache, last_only=True)
            calls.clear()
            runs[on] = model.decode_step(ids[:, -1], cache)
            if on:
                assert calls and (True in calls) != quantize     # relu² fused where the MLP is bf16
            else:
                assert not calls
    torch.testing.assert_close(runs[True], runs[False], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("inner, hidden", [(1024, 512), (21504, 4096)])   # the FP8 test model's MLP, the 8B's
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_an_fp8_mlp_of_skinny_products_is_the_cublas_mlp(inner, hidden, rows):
    """What an FP8 MLP at decode would run on the skinny kernel (up_proj with relu² and down_proj's quantization in
    its epilogue, then down_proj) against what it runs (relu2_fp8 between two torch._scaled_mm). FP8 products of
    these sizes sum exactly or nearly so in float32: the two should agree to a rounding of the output.
    The lead for the FP8 decode difference that keeps FP8 off the skinny kernel (`fp8.fp8_matmul_quantized`)."""
    g = torch.Generator(device=DEVICE).manual_seed(rows + inner)
    x = torch.randn(rows, hidden, generator=g, device=DEVICE).to(torch.bfloat16)
    up = (torch.randn(inner, hidden, generator=g, device=DEVICE) / hidden ** 0.5).to(torch.bfloat16)
    down = (torch.randn(hidden, inner, generator=g, device=DEVICE) / inner ** 0.5).to(torch.bfloat16)
    up_s, down_s, x_s = ((t.float().abs().amax() / fp8.FP8_MAX).reshape(()) for t in (up, down, x))
    up_q, down_q = fp8.quantize_fp8(up, up_s), fp8.quantize_fp8(down, down_s)
    x_q = fp8.quantize_fp8(x, x_s)
    with settings.override(skinny=False):
        h = fp8.fp8_matmul_quantized(fp8.quantize_fp8(F.pad(x, (0, 0, 0, fp8.padded_rows(rows) - rows)), x_s),
                                     rows, (rows,), up_q, up_s, x_s, None, torch.bfloat16)
        h_s = (kernels.relu2(h).float().amax() / fp8.FP8_MAX).reshape(())
        h_q = kernels.relu2_fp8(h, h_s, fp8.padded_rows(rows))
        want = fp8.fp8_matmul_quantized(h_q, rows, (rows,), down_q, down_s, h_s, None, torch.bfloat16)
    got_h = skinny(x_q, up_q, scales=(x_s, up_s), out_dtype=torch.bfloat16, relu2=True, quant_scale=h_s)
    flipped = (got_h.view(torch.uint8) != h_q[:rows].view(torch.uint8)).float().mean()
    assert flipped < 0.01, flipped                              # at most a rare rounding-boundary flip
    got = skinny(got_h, down_q, scales=(h_s, down_s), out_dtype=torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02 * float(want.float().abs().max()))


def test_every_fp8_product_of_a_decode_step_agrees_with_cublaslt():
    """Each FP8 linear of the FP8 test model, on the very input it gets in a decode step (taken by hooks, so the
    modules run one by one), multiplied by the skinny kernel and by cuBLASLt: these FP8 sums are exact or nearly
    so in float32, so the two may differ only by a last-bit rounding of a few outputs. Names the first linear
    that differs more: where to look for the FP8 decode difference."""
    model = build_case("dense", torch.bfloat16, True)
    seen: dict[str, torch.Tensor] = {}
    quantized = {name: lin for name, lin in model.named_modules() if isinstance(lin, Linear) and lin.quantized}
    hooks = [lin.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
             for name, lin in quantized.items()]
    ids = torch.randint(3, model.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    try:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
        model.prefill(ids, cache, last_only=True)
        seen.clear()
        model.decode_step(ids[:, -1], cache)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == sorted(quantized)
    for name, x in seen.items():
        lin = quantized[name]
        rows = x.numel() // x.shape[-1]
        x_q = fp8.quantize_fp8(F.pad(x.reshape(rows, -1), (0, 0, 0, fp8.padded_rows(rows) - rows)), lin.input_scale)
        want = fp8.fp8_matmul_quantized(x_q, rows, (rows,), lin.weight, lin.weight_scale, lin.input_scale, None,
                                        x.dtype)
        got = skinny(x_q[:rows], lin.weight, scales=(lin.input_scale, lin.weight_scale), out_dtype=x.dtype)
        scale = float(want.float().abs().max())
        differ = float((got != want).float().mean())
        assert differ < 0.01, (name, differ)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6 * scale, msg=name)
