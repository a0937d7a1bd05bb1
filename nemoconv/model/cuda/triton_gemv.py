"""Skinny matrix products for decode (1 to 16 rows), the weight read once at full bandwidth (imported only where
Triton is; `triton_ops` re-exports `skinny_linear`). NEMOCONV_SKINNY=0 turns it off (cuBLAS/cuBLASLt then).

At a decode step every weight matrix is read once for a handful of rows, so the step's time is the weights'
bytes over the memory bandwidth. cuBLAS's choices for such shapes leave part of the H200's bandwidth unused and
add split-K reduce launches; here each program streams a block of weight rows over the whole reduction (one row:
multiply-adds; more: tensor-core tiles of 16 rows with pipelined loads), so a product is one launch.
  skinny_linear   y = x Wᵀ (+ b) for bf16/fp16/fp32 W, or FP8 W with per-tensor scales on an FP8 activation
                  (ModelOpt's static format, `fp8.py`); optionally relu² of the result (the MLP's up_proj at
                  decode), and optionally that relu² written as the next product's FP8 input. The model routes
                  every product of a decode step here (`kernels.linear`, `fp8.fp8_matmul_quantized`, `MLP`)
Arithmetic: exact products (bf16 and e4m3 values are exact in float32), float32 sums, one rounding to the output
dtype; FP8 results are scaled as `torch._scaled_mm` scales them (input_scale · weight_scale, then rounded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemoconv.model.cuda.kernels import SKINNY_ROWS as MAX_ROWS  # the rows that take the skinny kernel
from nemoconv.model.cuda.triton_pdl import allow_next, enabled, wait_previous


@triton.jit
def fp8_of(v, scale, Q):
    """fp8.quantize_fp8 of v (already rounded to the model dtype): IEEE v / scale, saturated, e4m3 nearest-even."""
    q = tl.math.div_rn(v.to(tl.float32), scale)                # IEEE division, as torch's x / scale
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return q.to(Q.dtype.element_ty, fp_downcast_rounding="rtne")


@triton.jit
def _weight_block(w_base, k0, K, nmask, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """The weight's block of columns k0 … k0 + BK: [BN, BK], each row contiguous."""
    k = k0 + tl.arange(0, BK)
    if EVEN_K:
        w = tl.load(w_base + k[None, :], mask=nmask[:, None], other=0.0)
    else:
        w = tl.load(w_base + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0)
    return w


@triton.jit
def _accumulate(acc, w, X, k0, K, m, mmask, stride_xm, BK: tl.constexpr, DOT: tl.constexpr, FP8: tl.constexpr):
    """acc + w · x[:, k0 … k0 + BK]ᵀ (w the block from `_weight_block`): [BN, BM] for tensor-core tiles, else [BN]."""
    k = k0 + tl.arange(0, BK)
    if DOT:
        # the weight block is the product's left operand, BN (64 or 128) tall, and the rows' block the right one,
        # 16 wide: on Hopper a wgmma of both from shared memory (x Wᵀ the other way round, with the rows as the
        # 16-tall left operand, took mma.sync and streamed the weight 3.3 % slower over a b8 decode step's products)
        xt = tl.load(X + m[None, :] * stride_xm + k[:, None], mask=mmask[None, :] & (k < K)[:, None], other=0.0)
        if FP8:                                                 # every e4m3 value is exact in fp16: the same products
            xt = xt.to(tl.float16)
            w = w.to(tl.float16)
        acc += tl.dot(w, xt, input_precision="ieee" if X.dtype.element_ty == tl.float32 else None)
    else:                                                       # one row: plain multiply-adds, no tiles
        x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    return acc


@triton.jit
def _skinny_kernel(X, W, BIAS, X_SCALE, W_SCALE, Q_SCALE, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
                   FP8: tl.constexpr, HAS_BIAS: tl.constexpr, RELU2: tl.constexpr, QUANT: tl.constexpr,
                   ROUND: tl.constexpr, PDL: tl.constexpr):
    allow_next(PDL)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    nmask = n < N
    mmask = m < M
    w_base = W + n.to(tl.int64)[:, None] * stride_wn
    if DOT:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BN,), dtype=tl.float32)
    if PDL:
        # the first weight block is requested before waiting for the previous kernel (triton_pdl: weights are never
        # written), so the weight stream starts while that kernel finishes. (Not peeled without PDL: the peeled
        # block of a tensor-core tile would take shared memory of its own, beyond what deep pipelines leave.)
        w = _weight_block(w_base, 0, K, nmask, BK, EVEN_K)
        wait_previous(PDL)
        acc = _accumulate(acc, w, X, 0, K, m, mmask, stride_xm, BK, DOT, FP8)
        first = BK
    else:
        first = 0
    for k0 in range(first, K, BK):
        w = _weight_block(w_base, k0, K, nmask, BK, EVEN_K)
        acc = _accumulate(acc, w, X, k0, K, m, mmask, stride_xm, BK, DOT, FP8)
    if DOT:
        acc = tl.trans(acc)                                     # [BM, BN], as the rows are stored
    else:
        acc = acc[None, :]
    if FP8:
        acc = acc * (tl.load(X_SCALE).to(tl.float32) * tl.load(W_SCALE).to(tl.float32))
    if HAS_BIAS:
        b = tl.load(BIAS + n, mask=nmask, other=0.0).to(tl.float32)
        if FP8:                                                 # _scaled_mm rounds, then the bias is added
            acc = acc.to(ROUND).to(tl.float32)
        acc += b[None, :]
    out = acc.to(ROUND)
    if RELU2:                                                   # relu² of the rounded product, rounded again
        r = tl.maximum(out.to(tl.float32), 0.0)
        out = (r * r).to(ROUND)
    if QUANT:
        out = fp8_of(out, tl.load(Q_SCALE).to(tl.float32), Y)
    tl.store(Y + m[:, None] * stride_ym + n[None, :], out, mask=mmask[:, None] & nmask[None, :])


def skinny_tile(rows: int, out_features: int, in_features: int, fp8: bool) -> tuple[int, int, int, int, bool]:
    """(BN, BK, warps, stages, tensor-core tiles) for a product of this shape: the best of a sweep of tiles on an
    H200 over the 8B layout's seven weight shapes (`benchmarks/bench_skinny.py --sweep`). Narrow outputs (few
    blocks of BN rows) want more bytes in flight per program: longer BK, more warps or deeper pipelines. One FP8
    row takes BK 2048, the same bytes per load as bf16's 1024 (a second sweep, with BK 2048: the four FP8 shapes
    of a decode step in 2,060 µs against 2,282 at BK 1024)."""
    n, k = out_features, in_features
    if rows == 1:
        if fp8:
            return (8, 2048, 8, 1, False)
        return (8, 512, 4, 1, False) if n >= 16384 and k <= 4096 else (8, 1024, 8, 1, False)
    # several rows, from a sweep at 8 rows (BN 64/128, BK 64-256, 3-5 stages; bf16): deep pipelines of long blocks
    # for narrow outputs, BN 128 for the vocabulary's width; FP8 blocks twice as long (the same bytes per load)
    if n <= 8192:
        return (64, 512, 4, 4, True) if fp8 else (64, 256, 4, 5, True)
    if n >= 65536 and not fp8:
        return (128, 128, 4, 3, True)
    return (64, 256, 4, 3, True) if fp8 else (64, 128, 4, 3, True)


def skinny_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scales: tuple[torch.Tensor, torch.Tensor] | None = None, relu2: bool = False,
                  quant_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                  tile: tuple[int, int, int, int, bool] | None = None) -> torch.Tensor:
    """x2 [m, k] (m ≤ MAX_ROWS, k contiguous) · weight [n, k]ᵀ (+ bias) → [m, n].

    scales = (input_scale, weight_scale): weight and x2 are FP8 and the product is scaled by both (out_dtype
    is then the model dtype). relu2: relu² of the rounded result. quant_scale: that result written as FP8
    (quantize_fp8 with this scale) instead of in the model dtype. Under graph capture with PDL (`triton_pdl`) the
    first weight block is read before the previous kernel ends: the weight must not be written in the same graph.
    """
    m, k = x2.shape
    n = weight.shape[0]
    if m > MAX_ROWS or x2.stride(-1) != 1 or weight.stride(-1) != 1 or weight.shape[1] != k:
        raise ValueError("skinny_linear needs at most 16 rows and contiguous rows of x and weight")
    fp8 = scales is not None
    round_dtype = out_dtype or x2.dtype
    y_dtype = torch.float8_e4m3fn if quant_scale is not None else round_dtype
    y = torch.empty(m, n, dtype=y_dtype, device=x2.device)
    bn, bk, warps, stages, dot = tile or skinny_tile(m, n, k, fp8)
    bk = min(bk, triton.next_power_of_2(k))
    while dot and stages * (16 + bn) * bk * x2.element_size() > 200 * 1024 and bk > 32:
        bk //= 2                                                # float32 operands: the pipeline within shared memory
    dummy = scales[0] if fp8 else y
    # PDL for one-row products only. On an H200 at 8 rows, the model's decode graph (8B layout) replayed in 4.66 ms
    # without PDL for the tensor-core tiles, 5.07 with it and 4.99 with it and the first block peeled (a stage
    # fewer, for shared memory); bench_generate's floor with state 4.21, 5.41, 4.60. One row gains from it: the
    # floor went 3.86 → 3.77 ms (measured on the earlier mma.sync tiles).
    pdl = enabled(x2) and not dot
    _skinny_kernel[(triton.cdiv(n, bn),)](
        x2, weight, bias if bias is not None else dummy, *(scales if fp8 else (dummy, dummy)),
        quant_scale if quant_scale is not None else dummy, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        BM=16, BN=bn, BK=bk, EVEN_K=k % bk == 0, DOT=dot, FP8=fp8, HAS_BIAS=bias is not None, RELU2=relu2,
        QUANT=quant_scale is not None, ROUND=_TL_DTYPES[round_dtype], PDL=pdl, num_warps=warps, num_stages=stages,
        launch_pdl=pdl)
    return y


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
