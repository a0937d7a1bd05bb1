"""The Mamba mixer's conv in Triton, with the element-wise work around it (`kernels` reaches them through `triton_ops`):
  conv_silu      causal depthwise conv + SiLU over a sequence (prefill / whole sequence), reading the strided xBC
                 slice of in_proj's output; a second small launch reads and refreshes the cached context and
                 computes the step sizes and A                       (2 launches instead of ~16)
  conv_step      one decode step of the conv (state shifted in place) + SiLU, and in the same launch the step
                 size softplus(dt + dt_bias) clamped, and A = -exp(A_log)   (1 instead of ~12)
All arithmetic is float32; results are rounded once, to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemoconv.model.cuda.triton_pdl import allow_next, enabled, wait_previous


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
                      K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
                      PDL: tl.constexpr):
    allow_next(PDL)
    wait_previous(PDL)                  # nothing read early: the weights may be a copy made just before
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
    pdl = enabled(xbc)
    _conv_step_kernel[(b, triton.cdiv(c, bc))](
        xbc, dt, weight, bias if bias is not None else weight, conv_state, y, dt_bias, dt_out, A_log, a_out,
        c, h, float(dt_limit[0]), dt_max,
        xbc.stride(0), dt.stride(0), weight.stride(0), conv_state.stride(0), conv_state.stride(1),
        conv_state.stride(2), y.stride(0), dt_out.stride(0),
        K=k, HAS_BIAS=bias is not None, BC=bc, BH=triton.next_power_of_2(h), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y, dt_out, a_out
