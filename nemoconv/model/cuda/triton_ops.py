"""Small fused Triton kernels for the CUDA path (imported only where Triton is; `kernels` dispatches to them).

Each one replaces a chain of tiny torch ops that costs one launch and one pass over memory per op:
  rmsnorm        [residual += delta;] y = weight · x / rms(x)          (1 launch instead of ~7)
  gated_rmsnorm  Mamba-2's grouped RMSNorm of y · silu(z), bit for bit mamba-ssm's layer_norm_fwd, optionally
                 writing only the next linear's FP8 input                (1 launch instead of 2)
  relu2          relu(x)²                                                (1 instead of 2)
  quantize_fp8   x / scale, saturated, rounded to e4m3, rows zero-padded  (1 instead of 5)
The FP8 outputs (rmsnorm, gated_rmsnorm, relu2_fp8, quantize_fp8) have rows zero-padded to cuBLASLt's multiple
of 16: a padding row's program stores zeros and returns, so at batch 1 the 15 padding rows cost next to nothing.
It also re-exports, from `triton_conv`, the Mamba conv (conv_silu, conv_step, each with the step sizes and A), and
from `triton_decode` (the decode step's own kernels), expert_gemv, decode_attention, paged_decode_attention and
ssm_step, from `triton_gemv` skinny_linear (products of ≤ 16 rows), and from `triton_ssd` the prefill's SSD scan
(ssd_scan, ssd_supported), so that `kernels` finds every fused kernel in this one module.
All arithmetic is float32, as in `reference`; results are rounded once, to the output dtype. The
only other differences from the torch reference are summation order and the exp/log approximations
(a few ulp of float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemoconv.model.cuda.triton_conv import conv_silu, conv_step  # noqa: F401
from nemoconv.model.cuda.triton_decode import (  # noqa: F401
    decode_attention,
    expert_gemv,
    paged_decode_attention,
    ssm_step,
)
from nemoconv.model.cuda.triton_gemm import AVAILABLE as triton_gemm_available  # noqa: F401
from nemoconv.model.cuda.triton_gemm import gemm, gemm_ok  # noqa: F401
from nemoconv.model.cuda.triton_gemv import fp8_of as _fp8_of
from nemoconv.model.cuda.triton_gemv import skinny_linear, skinny_tile  # noqa: F401
from nemoconv.model.cuda.triton_pdl import allow_next, enabled, wait_previous
from nemoconv.model.cuda.triton_ssd import ssd_scan  # noqa: F401
from nemoconv.model.cuda.triton_ssd import supported as ssd_supported  # noqa: F401


def _warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


# ---------------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add that precedes it
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_kernel(X, DELTA, R_OUT, Y, W, Q, Q_SCALE, M, stride_x, stride_d, stride_r, stride_y, stride_q, N, eps,
                    HAS_DELTA: tl.constexpr, HAS_Q: tl.constexpr, BLOCK: tl.constexpr, QVEC: tl.constexpr,
                    PDL: tl.constexpr):
    allow_next(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # the parameters first: their latency hides behind the wait and the row's (triton_pdl: read before the wait)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Q:
        scale = tl.load(Q_SCALE).to(tl.float32)
    wait_previous(PDL)
    if HAS_Q:
        if row >= M:                                  # rows ≥ M exist only as zero padding of Q: nothing to compute
            tl.store(Q + row * stride_q + cols, tl.zeros([BLOCK], dtype=Q.dtype.element_ty), mask=mask)
            return
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0)
        r = (x.to(tl.float32) + d.to(tl.float32)).to(R_OUT.dtype.element_ty)   # the residual add, rounded
        tl.store(R_OUT + row * stride_r + cols, r, mask=mask)
        x = r
    xf = x.to(Y.dtype.element_ty).to(tl.float32)          # the norm sees the stream in the model dtype
    var = tl.sum(xf * xf, axis=0) / N
    y = (w * (xf * tl.rsqrt(var + eps))).to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=mask)
    if HAS_Q:                                         # the FP8 input of the next linear, as fp8.quantize_fp8
        # stored QVEC bytes per thread, the width of the other accesses: a 16-byte store would have the compiler
        # lay the whole row out 16 per thread, and the sum of squares would then add in another order than
        # without HAS_Q (y would differ from the unquantized kernel's in the last bit)
        tl.store(Q + row * stride_q + tl.max_contiguous(cols, QVEC), _fp8_of(y, scale, Q), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
            quant: tuple[torch.Tensor, int] | None = None):
    """y = RMSNorm(x) in weight's dtype; with delta, first residual = x + delta (x's dtype) → (residual, y).

    With quant = (input_scale, rows_padded), also returns y quantized to FP8 for the next linear
    ([rows_padded, n], zero rows past the real ones), as the last element.
    """
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=weight.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    if delta is not None:
        d2 = delta.reshape(-1, n)
        if d2.stride(-1) != 1:
            d2 = d2.contiguous()
        r = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    else:
        d2 = r = x2
    if quant is not None:
        scale, grid = quant[0], quant[1]
        q = torch.empty(grid, n, dtype=torch.float8_e4m3fn, device=x.device)
    else:
        scale, grid, q = x2, rows, x2
    pdl = enabled(x2)
    _rmsnorm_kernel[(grid,)](x2, d2, r, y, weight, q, scale, rows, x2.stride(0), d2.stride(0), r.stride(0),
                             y.stride(0), q.stride(0), n, eps, HAS_DELTA=delta is not None, HAS_Q=quant is not None,
                             BLOCK=block, QVEC=16 // y.element_size(), PDL=pdl, num_warps=_warps(block),
                             launch_pdl=pdl)
    out = (y.reshape(shape),) if delta is None else (r.reshape(shape), y.reshape(shape))
    if quant is not None:
        out = out + (q,)
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# Mamba-2's gated grouped RMSNorm, optionally straight to out_proj's FP8 input
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gated_rmsnorm_kernel(Y, Z, W, OUT, Q, Q_SCALE, M, stride_y, stride_z, stride_o, stride_q, group_size, eps,
                          HAS_OUT: tl.constexpr, HAS_Q: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per (row, group). The float32 steps are those of mamba-ssm's layer_norm_fwd (RMS, gate
    before the norm), in its order and with its operators — a fused multiply-add the compiler forms, the
    approximate sqrt and divisions all depend on that — so that the outputs match it bit for bit."""
    allow_next(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    inside = tl.arange(0, BLOCK) < group_size
    weight = tl.load(W + cols, mask=inside).to(tl.float32)          # parameters: read before the wait (triton_pdl)
    if HAS_Q:
        scale = tl.load(Q_SCALE).to(tl.float32)
    wait_previous(PDL)
    if HAS_Q:
        if row >= M:                                  # rows ≥ M exist only as zero padding of Q
            tl.store(Q + row * stride_q + cols, tl.zeros([BLOCK], dtype=Q.dtype.element_ty), mask=inside)
            return
    gated = tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
    z = tl.load(Z + row * stride_z + cols, mask=inside, other=0.0).to(tl.float32)
    gated *= z * tl.sigmoid(z)                                        # y · silu(z)
    kept = tl.where(inside, gated, 0.0)
    mean_square = tl.sum(kept * kept, axis=0) / group_size
    inv_rms = 1 / tl.sqrt(mean_square + eps)
    normed = (gated * inv_rms * weight).to(Y.dtype.element_ty)        # rounded to y's dtype, as returned
    if HAS_OUT:
        tl.store(OUT + row * stride_o + cols, normed, mask=inside)
    if HAS_Q:
        tl.store(Q + row * stride_q + cols, _fp8_of(normed, scale, Q), mask=inside)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int,
                  quant: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """RMSNorm(y · silu(z)) over each group of `group_size` channels, times weight → y's dtype and shape.

    y, z [..., n]: rows at any stride, channels contiguous (z may be a column slice of in_proj's output).
    With quant = (input_scale, rows_padded), returns instead only that result quantized to FP8 for the next
    linear, [rows_padded, n] with zero rows past the real ones (the normed rows themselves are not written).
    """
    shape = y.shape
    n = shape[-1]
    y2, z2 = y.reshape(-1, n), z.reshape(-1, n)
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    pdl = enabled(y2) and weight.is_contiguous()     # else the copy below is the kernel before: no early read
    weight = weight.contiguous()
    rows = y2.shape[0]
    if n % group_size:
        raise ValueError(f"{n} channels do not split into groups of {group_size}")
    block = triton.next_power_of_2(group_size)
    if quant is not None:
        scale, grid = quant
        out = q = torch.empty(grid, n, dtype=torch.float8_e4m3fn, device=y.device)
    else:
        scale, grid = y2, rows
        out = q = torch.empty(rows, n, dtype=y.dtype, device=y.device)
    _gated_rmsnorm_kernel[(grid, n // group_size)](
        y2, z2, weight, out, q, scale, rows, y2.stride(0), z2.stride(0), out.stride(0), q.stride(0), group_size, eps,
        HAS_OUT=quant is None, HAS_Q=quant is not None, BLOCK=block, PDL=pdl, launch_pdl=pdl,
        num_warps=min(max(block // 256, 1), 8))         # layer_norm_fwd's warps: the same summation tree
    return q if quant is not None else out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# relu²
# ---------------------------------------------------------------------------------------------
@triton.jit
def _relu2_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.maximum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(Y + offs, (x * x).to(Y.dtype.element_ty), mask=mask)


def relu2(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    _relu2_kernel[(triton.cdiv(n, 2048),)](x, y, n, BLOCK=2048, num_warps=8)
    return y


def relu2_fp8(x2: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """quantize_fp8(relu2(x2), scale) in one launch: x2 [m, n] → fp8 [rows, n], zero rows past m."""
    return _quantize_fp8(x2, scale, rows, relu2=True)


# ---------------------------------------------------------------------------------------------
# FP8 activation quantization (per-tensor static scale), rows zero-padded for cuBLASLt
# ---------------------------------------------------------------------------------------------
@triton.jit
def _quantize_fp8_kernel(X, SCALE, Y, M, N, stride_x, stride_y, RELU2: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    if row >= M:                                                  # a padding row: zeros, nothing to compute
        tl.store(Y + row * stride_y + cols, tl.zeros([BLOCK], dtype=Y.dtype.element_ty), mask=cmask)
        return
    scale = tl.load(SCALE).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    if RELU2:
        x = tl.maximum(x, 0.0)
        x = (x * x).to(X.dtype.element_ty).to(tl.float32)      # relu² rounded as relu2() returns it
    tl.store(Y + row * stride_y + cols, _fp8_of(x, scale, Y), mask=cmask)


def quantize_fp8(x2: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """x2 [m, n] → fp8 [rows, n] (rows ≥ m; the extra rows are zeros) = e4m3(clamp(x / scale, ±448))."""
    return _quantize_fp8(x2, scale, rows, relu2=False)


def _quantize_fp8(x2: torch.Tensor, scale: torch.Tensor, rows: int, relu2: bool) -> torch.Tensor:
    m, n = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=x2.device)
    block = min(2048, triton.next_power_of_2(n))
    _quantize_fp8_kernel[(rows, triton.cdiv(n, block))](x2, scale, y, m, n, x2.stride(0), y.stride(0),
                                                         RELU2=relu2, BLOCK=block, num_warps=4)
    return y
