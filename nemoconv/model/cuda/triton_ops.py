"""Small fused Triton kernels for the CUDA path (imported only where Triton is; `kernels` dispatches to them).

Each one replaces a chain of tiny torch ops that costs one launch and one pass over memory per op:
  rmsnorm        [residual += delta;] y = weight · x / rms(x)          (1 launch instead of ~7)
  gated_rmsnorm  Mamba-2's grouped RMSNorm of y · silu(z), bit for bit mamba-ssm's layer_norm_fwd, optionally
                 writing only the next linear's FP8 input                (1 launch instead of 2)
  relu2          relu(x)²                                                (1 instead of 2)
  conv_silu      causal depthwise conv + SiLU over a sequence, reading the strided xBC slice of
                 in_proj's output and the cached left context directly, optionally with the step
                 size and A as in conv_step, then the context refreshed in a second small launch
                                                                         (2 instead of ~16)
  conv_step      one decode step of the conv (state shifted in place) + SiLU, and in the same launch
                 the step size softplus(dt + dt_bias) clamped, and A = -exp(A_log)   (1 instead of ~12)
  quantize_fp8   x / scale, saturated, rounded to e4m3, rows zero-padded  (1 instead of 5)
The FP8 outputs (rmsnorm, gated_rmsnorm, relu2_fp8, quantize_fp8) have rows zero-padded to cuBLASLt's multiple
of 16: a padding row's program stores zeros and returns, so at batch 1 the 15 padding rows cost next to nothing.
and, from `triton_decode` (the decode step's own kernels), expert_gemv, decode_attention,
paged_decode_attention and ssm_step, so that `kernels` finds every fused kernel in this one module.
All arithmetic is float32, as in `reference`; results are rounded once, to the output dtype. The
only other differences from the torch reference are summation order and the exp/log approximations
(a few ulp of float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemoconv.model.cuda.triton_decode import (  # noqa: F401
    decode_attention,
    expert_gemv,
    paged_decode_attention,
    ssm_step,
)


def _warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


# ---------------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add that precedes it
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_kernel(X, DELTA, R_OUT, Y, W, Q, Q_SCALE, M, stride_x, stride_d, stride_r, stride_y, stride_q, N, eps,
                    HAS_DELTA: tl.constexpr, HAS_Q: tl.constexpr, BLOCK: tl.constexpr, QVEC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_Q:
        if row >= M:                                  # rows ≥ M exist only as zero padding of Q: nothing to compute
            tl.store(Q + row * stride_q + cols, tl.zeros([BLOCK], dtype=Q.dtype.element_ty), mask=mask)
            return
        scale = tl.load(Q_SCALE).to(tl.float32)       # loaded first: its latency hides behind the row's
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0)
        r = (x.to(tl.float32) + d.to(tl.float32)).to(R_OUT.dtype.element_ty)   # the residual add, rounded
        tl.store(R_OUT + row * stride_r + cols, r, mask=mask)
        x = r
    xf = x.to(Y.dtype.element_ty).to(tl.float32)          # the norm sees the stream in the model dtype
    var = tl.sum(xf * xf, axis=0) / N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (w * (xf * tl.rsqrt(var + eps))).to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=mask)
    if HAS_Q:                                         # the FP8 input of the next linear, as fp8.quantize_fp8
        # stored QVEC bytes per thread, the width of the other accesses: a 16-byte store would have the compiler
        # lay the whole row out 16 per thread, and the sum of squares would then add in another order than
        # without HAS_Q (y would differ from the unquantized kernel's in the last bit)
        tl.store(Q + row * stride_q + tl.max_contiguous(cols, QVEC), _fp8_of(y, scale, Q), mask=mask)


@triton.jit
def _fp8_of(v, scale, Q):
    """fp8.quantize_fp8 of v (already rounded to the model dtype): IEEE v / scale, saturated, e4m3 nearest-even."""
    q = tl.math.div_rn(v.to(tl.float32), scale)                # IEEE division, as torch's x / scale
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return q.to(Q.dtype.element_ty, fp_downcast_rounding="rtne")


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
    _rmsnorm_kernel[(grid,)](x2, d2, r, y, weight, q, scale, rows, x2.stride(0), d2.stride(0), r.stride(0),
                             y.stride(0), q.stride(0), n, eps, HAS_DELTA=delta is not None, HAS_Q=quant is not None,
                             BLOCK=block, QVEC=16 // y.element_size(), num_warps=_warps(block))
    out = (y.reshape(shape),) if delta is None else (r.reshape(shape), y.reshape(shape))
    if quant is not None:
        out = out + (q,)
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------
# Mamba-2's gated grouped RMSNorm, optionally straight to out_proj's FP8 input
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gated_rmsnorm_kernel(Y, Z, W, OUT, Q, Q_SCALE, M, stride_y, stride_z, stride_o, stride_q, group_size, eps,
                          HAS_OUT: tl.constexpr, HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row, group). The float32 steps are those of mamba-ssm's layer_norm_fwd (RMS, gate
    before the norm), in its order and with its operators — a fused multiply-add the compiler forms, the
    approximate sqrt and divisions all depend on that — so that the outputs match it bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    inside = tl.arange(0, BLOCK) < group_size
    if HAS_Q:
        if row >= M:                                  # rows ≥ M exist only as zero padding of Q
            tl.store(Q + row * stride_q + cols, tl.zeros([BLOCK], dtype=Q.dtype.element_ty), mask=inside)
            return
        scale = tl.load(Q_SCALE).to(tl.float32)       # loaded first: its latency hides behind the row's
    gated = tl.load(Y + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
    z = tl.load(Z + row * stride_z + cols, mask=inside, other=0.0).to(tl.float32)
    weight = tl.load(W + cols, mask=inside).to(tl.float32)
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
        HAS_OUT=quant is None, HAS_Q=quant is not None, BLOCK=block,
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
# Causal depthwise conv + SiLU over a sequence (prefill / whole sequence)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _step_size(v, dt_min, dt_max):
    """softplus(v) as torch computes it (threshold 20), clamped to [dt_min, dt_max]; v float32."""
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))   # log1p(e), accurate for small e
    sp = tl.where(v > 20.0, v, sp)
    return tl.minimum(tl.maximum(sp, dt_min), dt_max)


@triton.jit
def _conv_seq_kernel(X, W, BIAS, Y, S, C, stride_xb, stride_xt, stride_wc, stride_yb, stride_yt,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """y = silu(causal conv of x) with a zero left context. Kept to this alone: reading the cached context
    (a masked gather every block issued) or computing the step sizes here made the kernel 2–3.5× slower at the
    8B shapes; `_conv_edges_kernel` does both after it."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)                 # [BT] positions
    c = tl.program_id(2) * BC + tl.arange(0, BC)                 # [BC] channels
    cmask = c < C
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        src = t - (K - 1) + j                                    # input position feeding tap j
        w = tl.load(W + c * stride_wc + j, mask=cmask, other=0.0).to(tl.float32)
        inx = (src >= 0) & (src < S)
        v = tl.load(X + b * stride_xb + src[:, None] * stride_xt + c[None, :],
                    mask=inx[:, None] & cmask[None, :], other=0.0)
        acc += w[None, :] * v.to(tl.float32)
    y = acc * tl.sigmoid(acc)
    tl.store(Y + b * stride_yb + t[:, None] * stride_yt + c[None, :], y.to(Y.dtype.element_ty),
             mask=(t < S)[:, None] & cmask[None, :])


@triton.jit
def _conv_edges_kernel(X, W, BIAS, STATE, Y, DT, DT_BIAS, DT_OUT, A_LOG, A_OUT, S, C, H, n_cblocks, dt_min, dt_max,
                       stride_xb, stride_xt, stride_wc, stride_sb, stride_sc, stride_sk, stride_yb, stride_yt,
                       stride_db, stride_dt, stride_ob, stride_ot,
                       K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_DT: tl.constexpr,
                       BK: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    """What `_conv_seq_kernel` leaves, after it. Programs below n_cblocks, one block of channels each (HAS_STATE):
    the first k-1 outputs again, now with the cached context [b, c, k-1] on the left, and then that context
    replaced by the last k-1 inputs, reaching back into the old one when s < k-1 (in place: every load comes
    before the barrier, every store after it). The programs after them (HAS_DT), BT positions each: the step
    sizes softplus(dt + dt_bias) clamped [b, s, h], and in the first one A = -exp(A_log)."""
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    K1: tl.constexpr = K - 1
    if HAS_STATE:
        if pid < n_cblocks:
            c = pid * BC + tl.arange(0, BC)
            i = tl.arange(0, BK)                                 # output position i < k-1, or new-state slot i
            cmask = c < C
            state = STATE + b * stride_sb + c[None, :] * stride_sc
            x = X + b * stride_xb + c[None, :]
            acc = tl.zeros((BK, BC), dtype=tl.float32)
            if HAS_BIAS:
                acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            for j in tl.static_range(K):
                src = i - K1 + j                                 # < 0: slot src + k-1 of the old context
                w = tl.load(W + c * stride_wc + j, mask=cmask, other=0.0).to(tl.float32)
                vx = tl.load(x + src[:, None] * stride_xt, mask=((src >= 0) & (src < S))[:, None] & cmask[None, :],
                             other=0.0)
                vs = tl.load(state + (src[:, None] + K1) * stride_sk, mask=(src < 0)[:, None] & cmask[None, :],
                             other=0.0)
                acc += w[None, :] * (vx.to(tl.float32) + vs.to(tl.float32))
            slot = i < K1
            last = S - K1 + i                                    # input position that lands in new slot i
            vx = tl.load(x + last[:, None] * stride_xt, mask=(slot & (last >= 0))[:, None] & cmask[None, :], other=0.0)
            vs = tl.load(state + (i[:, None] + S) * stride_sk, mask=(slot & (last < 0))[:, None] & cmask[None, :],
                         other=0.0)
            fresh = tl.where((last >= 0)[:, None], vx.to(STATE.dtype.element_ty), vs)
            tl.debug_barrier()
            y = acc * tl.sigmoid(acc)
            tl.store(Y + b * stride_yb + i[:, None] * stride_yt + c[None, :], y.to(Y.dtype.element_ty),
                     mask=(slot & (i < S))[:, None] & cmask[None, :])
            tl.store(state + i[:, None] * stride_sk, fresh, mask=slot[:, None] & cmask[None, :])
    if HAS_DT:
        if pid >= n_cblocks:
            t = (pid - n_cblocks) * BT + tl.arange(0, BT)
            h = tl.arange(0, BH)
            mask = (t < S)[:, None] & (h < H)[None, :]
            raw = tl.load(DT + b * stride_db + t[:, None] * stride_dt + h[None, :], mask=mask, other=0.0)
            raw = raw.to(tl.float32) + tl.load(DT_BIAS + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
            tl.store(DT_OUT + b * stride_ob + t[:, None] * stride_ot + h[None, :], _step_size(raw, dt_min, dt_max),
                     mask=mask)
            if (pid == n_cblocks) & (b == 0):
                a = tl.load(A_LOG + h, mask=h < H, other=0.0).to(tl.float32)
                tl.store(A_OUT + h, -tl.exp(a), mask=h < H)


CONV_TILE = (32, 256, 4)      # (positions, channels, warps) per program of the sequence conv (bench_kernels)
EDGE_CHANNELS = 256           # channels per program of the context fix-up and refresh
DT_ROWS = 32                  # positions per program of the step sizes


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor | None,
              step: tuple | None = None):
    """x [b, s, c] (channels contiguous, rows any stride), weight [c, k] → silu(conv) [b, s, c] contiguous.

    conv_state [b, c, k-1], if given, is the left context and is then replaced by the last k-1 inputs.
    step = (dt [b, s, h] raw (rows any stride), dt_bias [h], dt_limit, A_log [h]): then the second launch also
    computes softplus(dt + dt_bias) clamped to dt_limit [b, s, h] float32 and A = -exp(A_log) [h] float32,
    and the result is (y, step sizes, A).
    """
    b, s, c = x.shape
    k = weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty(b, s, c, dtype=x.dtype, device=x.device)
    bt, bc, warps = CONV_TILE
    has_bias = bias is not None
    bias = bias if has_bias else weight
    _conv_seq_kernel[(b, triton.cdiv(s, bt), triton.cdiv(c, bc))](
        x, weight, bias, y, s, c, x.stride(0), x.stride(1), weight.stride(0), y.stride(0), y.stride(1),
        K=k, HAS_BIAS=has_bias, BT=bt, BC=bc, num_warps=warps)
    has_state = conv_state is not None and k > 1
    if not has_state and step is None:
        return y
    st = conv_state if has_state else y
    if step is not None:
        dt, dt_bias, dt_limit, A_log = step
        if dt.stride(-1) != 1:
            dt = dt.contiguous()
        h = dt.shape[-1]
        dt_out = torch.empty(b, s, h, dtype=torch.float32, device=x.device)
        a_out = torch.empty(h, dtype=torch.float32, device=x.device)
        dt_range = (float(dt_limit[0]), min(float(dt_limit[1]), 3.0e38))
    else:
        dt = dt_bias = dt_out = A_log = a_out = y
        h, dt_range = 1, (0.0, 0.0)
    n_cblocks = triton.cdiv(c, EDGE_CHANNELS) if has_state else 0
    n_dt = triton.cdiv(s, DT_ROWS) if step is not None else 0
    # after the conv, which used the zero context for these positions and read no context (same stream)
    _conv_edges_kernel[(b, n_cblocks + n_dt)](
        x, weight, bias, st, y, dt, dt_bias, dt_out, A_log, a_out, s, c, h, n_cblocks, *dt_range,
        x.stride(0), x.stride(1), weight.stride(0), st.stride(0) if has_state else 0,
        st.stride(1) if has_state else 0, st.stride(2) if has_state else 0, y.stride(0), y.stride(1),
        dt.stride(0), dt.stride(1), dt_out.stride(0), dt_out.stride(1),
        K=k, HAS_BIAS=has_bias, HAS_STATE=has_state, HAS_DT=step is not None, BK=triton.next_power_of_2(k),
        BC=EDGE_CHANNELS, BT=DT_ROWS, BH=triton.next_power_of_2(h), num_warps=4)
    return y if step is None else (y, dt_out, a_out)


# ---------------------------------------------------------------------------------------------
# One decode step of the conv, plus the step size and A, for a Mamba layer
# ---------------------------------------------------------------------------------------------
@triton.jit
def _conv_step_kernel(XBC, DT, W, BIAS, STATE, Y, DT_BIAS, DT_OUT, A_LOG, A_OUT,
                      C, H, dt_min, dt_max,
                      stride_xb, stride_dtb, stride_wc, stride_sb, stride_sc, stride_sk, stride_yb, stride_db,
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    c = pid * BC + tl.arange(0, BC)
    cmask = c < C
    x_new = tl.load(XBC + b * stride_xb + c, mask=cmask, other=0.0)
    acc = tl.zeros((BC,), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
    state = STATE + b * stride_sb + c * stride_sc
    prev = tl.load(state, mask=cmask, other=0.0)                # oldest cached input (tap 0)
    for j in tl.static_range(K - 1):
        w = tl.load(W + c * stride_wc + j, mask=cmask, other=0.0).to(tl.float32)
        acc += w * prev.to(tl.float32)
        if j + 1 < K - 1:
            nxt = tl.load(state + (j + 1) * stride_sk, mask=cmask, other=0.0)
        else:
            nxt = x_new.to(STATE.dtype.element_ty)
        tl.store(state + j * stride_sk, nxt, mask=cmask)          # shift the context left by one
        prev = nxt
    w_last = tl.load(W + c * stride_wc + (K - 1), mask=cmask, other=0.0).to(tl.float32)
    acc += w_last * prev.to(tl.float32)
    tl.store(Y + b * stride_yb + c, (acc * tl.sigmoid(acc)).to(Y.dtype.element_ty), mask=cmask)
    if pid == 0:
        h = tl.arange(0, BH)
        hmask = h < H
        v = tl.load(DT + b * stride_dtb + h, mask=hmask, other=0.0).to(tl.float32) \
            + tl.load(DT_BIAS + h, mask=hmask, other=0.0).to(tl.float32)
        tl.store(DT_OUT + b * stride_db + h, _step_size(v, dt_min, dt_max), mask=hmask)
        if b == 0:
            a = tl.load(A_LOG + h, mask=hmask, other=0.0).to(tl.float32)
            tl.store(A_OUT + h, -tl.exp(a), mask=hmask)


def conv_step(xbc: torch.Tensor, dt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              conv_state: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float],
              A_log: torch.Tensor):
    """xbc [b, c], dt [b, h] (rows any stride) → (silu(conv) [b, c], step size [b, h] fp32, A [h] fp32).

    conv_state [b, c, k-1] shifts left by one in place.
    """
    b, c = xbc.shape
    h = dt.shape[1]
    k = weight.shape[-1]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty(b, c, dtype=xbc.dtype, device=xbc.device)
    dt_out = torch.empty(b, h, dtype=torch.float32, device=xbc.device)
    a_out = torch.empty(h, dtype=torch.float32, device=xbc.device)
    bc = 512
    dt_max = min(float(dt_limit[1]), 3.0e38)
    _conv_step_kernel[(b, triton.cdiv(c, bc))](
        xbc, dt, weight, bias if bias is not None else weight, conv_state, y, dt_bias, dt_out, A_log, a_out,
        c, h, float(dt_limit[0]), dt_max,
        xbc.stride(0), dt.stride(0), weight.stride(0), conv_state.stride(0), conv_state.stride(1),
        conv_state.stride(2), y.stride(0), dt_out.stride(0),
        K=k, HAS_BIAS=bias is not None, BC=bc, BH=triton.next_power_of_2(h), num_warps=4)
    return y, dt_out, a_out


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
