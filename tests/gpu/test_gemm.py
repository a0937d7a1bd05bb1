"""The prefill's products on our Hopper GEMM (`triton_gemm.gemm`, `kernels.linear`, the MLP's relu² epilogue):
against the float64 product, row by row independent of how many rows come with it (the prefix cache's bit-identity
rests on that), relu² in the epilogue bitwise the separate kernel, ragged shapes (rows, outputs and the reduction
not multiples of the tile), what it refuses, and the model's prefill on it against cuBLAS (NEMOCONV_GEMM=0).
Skips without an sm90 GPU or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_cases import DEVICE, build_case, skip_reason

from nemoconv import settings
from nemoconv.model.cuda import kernels


def _reason() -> str | None:
    reason = skip_reason()
    if reason is None and torch.cuda.get_device_capability() != (9, 0):
        reason = "our GEMM runs on sm90 only"
    if reason is None and kernels.triton_kernels().fused.triton_gemm_available is False:
        reason = "this Triton has no host TMA descriptors"
    return reason


pytestmark = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))

# (rows, out, in): the 8B layer's widest product, ragged edges in every dimension, a reduction shorter than a tile
SHAPES = [(2048, 4096, 1024), (300, 21504, 512), (129, 520, 4104), (130, 264, 200), (1000, 1000, 64)]


def operands(rows, n, k, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, k, generator=g, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEVICE) / k ** 0.5).to(dtype)
    return x, w


def fused():
    return kernels.triton_kernels().fused


@pytest.fixture(autouse=True)
def small_products_fill_the_gpu(monkeypatch):
    """These shapes are small: every one of a full tile of rows takes our GEMM here (`fills_the_gpu` would send
    most to cuBLAS), except in the test of that rule itself."""
    from nemoconv.model.cuda import triton_gemm
    monkeypatch.setattr(triton_gemm, "fills_the_gpu", lambda m, n, index: m >= triton_gemm.BM)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", SHAPES)
def test_the_product_is_the_float64_product_rounded_once(rows, n, k, dtype):
    x, w = operands(rows, n, k, dtype)
    assert fused().gemm_ok(x, w)
    y = fused().gemm(x, w)
    exact = x.double() @ w.double().T
    assert y.dtype == dtype and y.shape == (rows, n)
    # one rounding to the dtype (half an ulp: 2^-9 of the value for bf16, 2^-12 for fp16) plus the float32 sum's own
    # error, bounded by k ulps of float32 on the sum of |terms|
    magnitude = x.double().abs() @ w.double().abs().T
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    bound = ulp * exact.abs() + k * 2.0 ** -24 * magnitude + 1e-30
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows", [128, 129, 300, 2048])
def test_each_row_is_the_same_whatever_rows_come_with_it(rows):
    """A prefix-cache hit runs only the prompt's tail; its rows must be bit for bit the full prompt's rows."""
    x, w = operands(2048 + 77, 21504 // 4, 4096, torch.bfloat16, seed=1)
    full = fused().gemm(x, w)
    for start in (0, 2048 + 77 - rows):
        part = fused().gemm(x[start:start + rows], w)
        assert torch.equal(part, full[start:start + rows])


@pytest.mark.parametrize("rows,n,k", SHAPES)
def test_relu2_in_the_epilogue_is_bitwise_the_separate_kernel(rows, n, k):
    x, w = operands(rows, n, k, torch.bfloat16, seed=2)
    assert torch.equal(fused().gemm(x, w, relu2=True), fused().relu2(fused().gemm(x, w)))


def test_operands_it_cannot_take_are_refused_and_linear_falls_back_to_cublas():
    x, w = operands(256, 256, 128, torch.bfloat16)
    ok = fused().gemm_ok
    assert ok(x, w)
    assert not ok(x.float(), w.float())                           # float32: cuBLAS
    assert not ok(x, w.half())                                    # mixed dtypes
    assert not ok(x[:, 1:], w[:, 1:])                             # rows not 16-byte aligned
    assert not ok(x, w[:250])                                     # out features not a multiple of 8
    assert not ok(x, w.T.contiguous().T)                          # weight columns strided
    assert not ok(x.cpu(), w.cpu())
    b = torch.randn(256, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)   # bias: cuBLAS
    with settings.override(gemm=False):
        assert not kernels.gemm_ok(x, w)
    assert fused().gemm(x[:0], w).shape == (0, 256)
    x, w = operands(256, 1024, 128, torch.bfloat16)
    assert kernels.gemm_ok(x, w) and kernels.gemm_ok(x[:128], w)
    assert not kernels.gemm_ok(x[:127], w)                        # less than a tile of rows: cuBLAS
    assert not kernels.gemm_ok(x[:16], w)                         # the skinny kernel's


def test_products_too_small_to_fill_the_gpu_stay_on_cublas(monkeypatch):
    from nemoconv.model.cuda import triton_gemm
    monkeypatch.undo()                                            # the real rule
    monkeypatch.setattr(triton_gemm, "_programs", lambda index: 132)      # an H200's SMs
    x, w = operands(2048, 4096, 64, torch.bfloat16)
    assert kernels.gemm_ok(x, w)                                  # 16 × 16 tiles
    assert not kernels.gemm_ok(x[:1024], w)                       # 8 × 16: fewer tiles than SMs
    assert not kernels.gemm_ok(x[:64], operands(64, 131072, 64, torch.bfloat16)[1])   # a b64 decode step's head


def test_the_prefill_runs_on_it_with_relu2_fused_and_agrees_with_cublas(monkeypatch):
    """The same model's prefill logits with our GEMM and with cuBLAS (NEMOCONV_GEMM=0): the kernel ran, relu² in the
    MLPs' up_proj epilogue, and the two agree (they are different float32 summations only where cuBLAS splits k)."""
    model = build_case("dense", torch.bfloat16)
    model.cuda_graphs = False
    calls = []
    real = fused().gemm
    monkeypatch.setattr(fused(), "gemm", lambda x, w, relu2=False: calls.append(relu2) or real(x, w, relu2=relu2))
    ids = torch.randint(3, model.spec.vocab_size, (2, 300), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits = {}
    for on in (True, False):
        calls.clear()
        with settings.override(gemm=on), torch.inference_mode():
            logits[on] = model.prefill(ids, model.new_cache(2, 300), last_only=True)
        assert (True in calls and False in calls) if on else not calls
    torch.testing.assert_close(logits[True], logits[False], rtol=0.02, atol=0.02)
