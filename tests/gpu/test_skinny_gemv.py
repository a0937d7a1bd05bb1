"""The skinny product of decode steps (`triton_gemv.skinny_linear`, `kernels.linear`): at most 16 rows against a
weight read once, in bf16/fp16/fp32 and in FP8 with per-tensor scales, with relu² and FP8 quantization of the
result in its epilogue; the model's decode on it against cuBLAS and cuBLASLt (NEMOCONV_SKINNY=0); an FP8 MLP of
skinny products against cuBLASLt's; and every FP8 product of a decode step of the FP8 test model, on its own input,
against the exact sum.

Covers what the kernel branches on: one row (multiply-adds) and several (tensor-core tiles), a reduction that is
and is not a multiple of the tile, an output width that is not a multiple of the block, bias. Skips without CUDA
or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from cuda_cases import DEVICE, build_case, skip_reason

from nemoconv import settings
from nemoconv.model import fp8
from nemoconv.model.cuda import kernels, warmup
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
def test_the_fp8_product_is_the_exact_sum(rows, n, k, bias):
    x, w, b = operands(rows, n, k, torch.bfloat16, seed=rows + n)
    w_scale = (w.float().abs().amax() / fp8.FP8_MAX).reshape(())
    x_scale = (x.float().abs().amax() / fp8.FP8_MAX).reshape(())
    w_q, x_q = fp8.quantize_fp8(w, w_scale), fp8.quantize_fp8(x, x_scale)
    y = skinny(x_q, w_q, b if bias else None, scales=(x_scale, w_scale), out_dtype=torch.bfloat16)
    product = exact_fp8_product(x_q, w_q, x_scale, w_scale, torch.bfloat16)
    want = product + b if bias else product                     # _scaled_mm's output, then the bias (rounded twice)
    assert y.dtype == torch.bfloat16
    assert float((y != want).float().mean()) < 0.01             # float32 sums: a rare last-bit difference
    # at most one ulp of the product (before the bias) and one of the result
    err = (y.float() - want.float()).abs()
    assert bool((err <= 2 ** -7 * (product.float().abs() + want.float().abs()) + 1e-6).all()), float(err.max())


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


def test_warmup_compiles_the_heads_product_at_the_real_vocabulary(monkeypatch):
    """The warm-up's stand-in has a 256-token head; it also runs the skinny product with the tile of the real
    vocabulary's head, so that the first real decode step does not compile it."""
    spec = dataclasses.replace(build_case("dense", torch.bfloat16).spec, vocab_size=32000)
    fused = kernels.triton_kernels().fused
    tiles = []
    real = fused.skinny_linear
    monkeypatch.setattr(fused, "skinny_linear", lambda *a, **kw: tiles.append(kw.get("tile")) or real(*a, **kw))
    with settings.override(skinny=True):
        warmup._exercise(spec, torch.device(DEVICE), torch.bfloat16, 2, 8, 2, 0, False)
    assert fused.skinny_tile(2, 32000, spec.hidden_size, False) in tiles
    assert fused.skinny_tile(2, 32000, spec.hidden_size, False) != fused.skinny_tile(2, 256, spec.hidden_size, False)


def test_bf16_decode_runs_on_the_skinny_kernel_and_is_close_to_cublas(monkeypatch):
    """The same model's decode step with the skinny kernel and with cuBLAS (NEMOCONV_SKINNY=0): the kernel really
    ran, with relu² in the MLPs' up_proj epilogue, and the logits agree."""
    model = build_case("dense", torch.bfloat16)
    model.cuda_graphs = False                                   # eager steps: each sees the switch as set
    calls = record_skinny_calls(monkeypatch)
    runs = {}
    for on in (True, False):
        with settings.override(skinny=on):
            calls.clear()
            runs[on] = decode_once(model)
            assert (True in calls) if on else not calls        # relu² fused into the MLPs' up_proj
    torch.testing.assert_close(runs[True], runs[False], rtol=0.05, atol=0.05)


def test_fp8_decode_on_the_skinny_kernel_is_decode_with_exactly_summed_fp8_products(monkeypatch):
    """The FP8 model's decode step with every FP8 product on the skinny kernel (relu² and down_proj's quantization
    in up_proj's epilogue), against the same step with its FP8 products on torch._scaled_mm made exact (float64
    sums; the bf16 products stay on the skinny kernel in both): the two differ only where float32 sums are not
    exact, so the logits agree closely. (Against cuBLASLt itself they need not: its FP8 sums are inexact, and in
    this random network a flipped FP8 rounding of an activation grows from layer to layer.)"""
    model = build_case("dense", torch.bfloat16, True)
    model.cuda_graphs = False
    # the prefills' FP8 products (80 rows: never the skinny kernel) exact too, so that both steps start from one cache
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, scale_a, scale_b, out_dtype, **kw: exact_fp8_product(
        a, b.t(), scale_a, scale_b, out_dtype))
    calls = record_skinny_calls(monkeypatch, "scales")
    on_fp8 = decode_once(model)
    assert any(c is not None for c in calls)                   # FP8 products ran on the skinny kernel
    real_ok = kernels.skinny_ok
    monkeypatch.setattr(kernels, "skinny_ok", lambda x, w: w.dtype != fp8.FP8_DTYPE and real_ok(x, w))
    calls.clear()
    exact = decode_once(model)
    assert all(c is None for c in calls)                       # no FP8 product on the skinny kernel this time
    torch.testing.assert_close(on_fp8, exact, rtol=0.02, atol=0.02)


def record_skinny_calls(monkeypatch, keyword="relu2") -> list:
    """The value of `keyword` at each call of the skinny kernel from now on."""
    fused = kernels.triton_kernels().fused
    calls, real = [], fused.skinny_linear
    monkeypatch.setattr(fused, "skinny_linear", lambda *a, **kw: calls.append(kw.get(keyword)) or real(*a, **kw))
    return calls


def decode_once(model) -> torch.Tensor:
    """Logits of one decode step after a 40-token prefill of two rows (a fixed prompt)."""
    ids = torch.randint(3, model.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
    model.prefill(ids, cache, last_only=True)
    return model.decode_step(ids[:, -1], cache)


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


def exact_fp8_product(x_q, weight, input_scale, weight_scale, dtype):
    """The FP8 product summed exactly (float64 holds every sum of these products), then scaled and rounded as
    the kernels do: the float32 result, times input_scale · weight_scale, rounded to dtype."""
    acc = (x_q.double() @ weight.double().t()).float()
    return (acc * (input_scale.float() * weight_scale.float())).to(dtype)


def test_every_fp8_product_of_a_decode_step_is_the_exact_sum():
    """Each FP8 linear of the FP8 test model, on the very input it gets in a decode step (taken by hooks, so the
    modules run one by one), multiplied by the skinny kernel: its float32 sums of exact products are the exact
    sum, rounded once, up to a rare last-bit difference of the scale's multiplication. (cuBLASLt's FP8 sums
    are not: on an H200 they differed from this in ~6 % of in_proj's bf16 outputs.)"""
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
        x_q = fp8.quantize_fp8(x.reshape(-1, x.shape[-1]), lin.input_scale)
        want = exact_fp8_product(x_q, lin.weight, lin.input_scale, lin.weight_scale, x.dtype)
        got = skinny(x_q, lin.weight, scales=(lin.input_scale, lin.weight_scale), out_dtype=x.dtype)
        differ = float((got != want).float().mean())
        assert differ < 1e-3, (name, differ)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0, msg=name)   # one ulp at most
