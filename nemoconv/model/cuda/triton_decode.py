"""Triton kernels of the static-shape decode step (imported only where Triton is; `triton_ops` re-exports them):
  expert_gemv             routed experts without a host sync: one GEMV per (token, chosen expert), the
                          weights found through a table of per-expert base addresses (no stacked copy)
  decode_attention        one query per row over the whole preallocated KV cache, masked by position
  paged_decode_attention  the same over a paged block pool, each row at its own position
  ssm_step                one Mamba-2 recurrence step per row, the state updated in place
Their shapes never depend on the position (it is read from a device tensor), so a CUDA graph can replay them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemoconv.model.cuda.triton_pdl import allow_next, enabled, wait_previous


# ---------------------------------------------------------------------------------------------
# Routed experts without a host sync: one GEMV per (token, chosen expert), weights found through a
# table of per-expert base addresses (no stacked copy of the experts)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _expert_gemv_kernel(X, IDS, TABLE, Y, O, I, stride_x, stride_y, TOPK: tl.constexpr,
                        PER_PAIR: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)                         # token · k + slot
    ob = tl.program_id(1)
    token = pair // TOPK
    e = tl.load(IDS + pair)
    w_ptr = tl.load(TABLE + e).to(tl.pointer_type(Y.dtype.element_ty))
    if PER_PAIR:
        x_row = X + pair * stride_x                              # down projection: one hidden row per pair
    else:
        x_row = X + token * stride_x
    o = ob * BO + tl.arange(0, BO)
    omask = o < O
    acc = tl.zeros((BO,), dtype=tl.float32)
    for i0 in range(0, I, BI):
        i = i0 + tl.arange(0, BI)
        imask = i < I
        x = tl.load(x_row + i, mask=imask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + o[:, None].to(tl.int64) * I + i[None, :], mask=omask[:, None] & imask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if PER_PAIR:
        out = acc
    else:
        r = tl.maximum(acc.to(Y.dtype.element_ty).to(tl.float32), 0.0)   # round like the GEMM output, then relu²
        out = r * r
    tl.store(Y + pair * stride_y + o, out.to(Y.dtype.element_ty), mask=omask)


def expert_gemv(x: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, out_features: int, in_features: int,
                per_pair_input: bool) -> torch.Tensor:
    """x [T, in] (or [T·k, in] when per_pair_input) · W[ids]ᵀ → [T·k, out]; W of expert e lives at table[e].

    Without per_pair_input the output is relu²(x Wᵀ) (the experts' up projection and activation);
    with it, the plain product (their down projection).
    """
    pairs = ids.numel()
    topk = ids.shape[-1]
    x = x.contiguous()
    y = torch.empty(pairs, out_features, dtype=x.dtype, device=x.device)
    bo, bi = 16, 256
    _expert_gemv_kernel[(pairs, triton.cdiv(out_features, bo))](
        x, ids.reshape(-1), table, y, out_features, in_features, x.stride(0), y.stride(0),
        TOPK=topk, PER_PAIR=per_pair_input, BO=bo, BI=bi, num_warps=4)
    return y


# ---------------------------------------------------------------------------------------------
# Decode attention: one query per row over the preallocated KV cache, grouped KV heads, no copies.
# The number of keys read comes from a device tensor, so one compiled launch serves every position
# (and a CUDA graph can replay it). Contiguous cache: keys with valid == False (left padding) are
# masked out. Paged cache (PAGED): row b's position p lives at flat row table[b, p // BLOCK] · BLOCK
# + p % BLOCK of the layer's block pool, and each row has its own position.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_attention_kernel(Q, K, V, VALID, POS, TABLE, O, K_NEW, V_NEW, HK, scale,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kl,
                             stride_vb, stride_vh, stride_vl, stride_valid, stride_tb, stride_ob, stride_oh,
                             stride_nb, stride_nh,
                             REP: tl.constexpr, BR: tl.constexpr, D: tl.constexpr, BL: tl.constexpr,
                             PRECISION: tl.constexpr, PAGED: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_NEW: tl.constexpr, PDL: tl.constexpr):
    allow_next(PDL)
    wait_previous(PDL)
    pid = tl.program_id(0)
    b = (pid // HK).to(tl.int64)
    g = pid % HK
    r = tl.arange(0, BR)
    d = tl.arange(0, D)
    rmask = r < REP
    heads = g * REP + r
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    if PAGED:
        n = (tl.load(POS + b) + 1).to(tl.int32)                      # this row's keys 0 … pos
    else:
        n = (tl.load(POS) + 1).to(tl.int32)                          # keys 0 … pos
    m_i = tl.full((BR,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BR,), dtype=tl.float32)
    acc = tl.zeros((BR, D), dtype=tl.float32)
    k_base = K + b * stride_kb + g * stride_kh                       # stride_kb = 0 for a pool
    v_base = V + b * stride_vb + g * stride_vh
    if HAS_NEW:
        # this token's key/value (contiguous cache): stored at pos, a row only this program writes; used from registers
        k_new = tl.load(K_NEW + b * stride_nb + g * stride_nh + d).to(K.dtype.element_ty)
        v_new = tl.load(V_NEW + b * stride_nb + g * stride_nh + d).to(V.dtype.element_ty)
        tl.store(k_base + (n - 1) * stride_kl + d, k_new)
        tl.store(v_base + (n - 1) * stride_vl + d, v_new)
    for start in range(0, n, BL):
        pos = start + tl.arange(0, BL)
        pmask = pos < n
        if PAGED:
            block = tl.load(TABLE + b * stride_tb + pos // BLOCK, mask=pmask, other=0)
            row = block * BLOCK + pos % BLOCK
            ok = pmask
        else:
            row = pos
            ok = tl.load(VALID + b * stride_valid + pos, mask=pmask, other=0).to(tl.int1) & pmask
        k = tl.load(k_base + row[None, :] * stride_kl + d[:, None], mask=pmask[None, :], other=0.0)   # [D, BL]
        if HAS_NEW:
            k = tl.where((pos == n - 1)[None, :], k_new[:, None], k)
        s = tl.dot(q, k, input_precision=PRECISION) * scale                                        # [BR, BL]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # a fully masked block adds nothing
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + row[:, None] * stride_vl + d[None, :], mask=pmask[:, None], other=0.0)  # [BL, D]
        if HAS_NEW:
            v = tl.where((pos == n - 1)[:, None], v_new[None, :], v)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None])


def _launch_decode_attention(q, keys, values, valid, pos, table, block: int, kv_strides: tuple,
                             new_kv: tuple | None = None) -> torch.Tensor:
    b, hq, d = q.shape
    hk = keys.shape[-2] if table is not None else keys.shape[1]
    rep = hq // hk
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else None     # IEEE fp32 products for a float32 model
    (kb, kh, kl), (vb, vh, vl) = kv_strides
    k_new, v_new = new_kv if new_kv is not None else (q, q)
    pdl = enabled(q)
    _decode_attention_kernel[(b * hk,)](
        q, keys, values, valid if valid is not None else pos, pos, table if table is not None else pos, out,
        k_new, v_new, hk, d ** -0.5, q.stride(0), q.stride(1), kb, kh, kl, vb, vh, vl,
        valid.stride(0) if valid is not None else 0, table.stride(0) if table is not None else 0,
        out.stride(0), out.stride(1), k_new.stride(0), k_new.stride(1),
        REP=rep, BR=max(16, triton.next_power_of_2(rep)), D=d, BL=64 if q.dtype != torch.float32 else 32,
        PRECISION=precision, PAGED=table is not None, BLOCK=block, HAS_NEW=new_kv is not None, PDL=pdl,
        num_warps=4, launch_pdl=pdl)
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                     pos: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [b, hq, d]; keys/values [b, hk, max_len, d] (the cache); valid [b, max_len] bool; pos int64 [1]
    (this token's position: keys 0 … pos are attended) → [b, hq, d].

    new_kv = (k, v), each [b, hk, d] with d contiguous and the same strides: this token's key and value, stored
    into the cache at pos by the same launch (instead of a copy before it)."""
    if new_kv is not None and (new_kv[0].stride() != new_kv[1].stride() or new_kv[0].stride(-1) != 1):
        new_kv = tuple(t.contiguous() for t in new_kv)
    strides = ((keys.stride(0), keys.stride(1), keys.stride(2)), (values.stride(0), values.stride(1), values.stride(2)))
    return _launch_decode_attention(q, keys, values, valid, pos, None, 1, strides, new_kv)


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                           pos: torch.Tensor, block: int) -> torch.Tensor:
    """q [b, hq, d]; keys/values [blocks · block, hk, d] (one layer's pool, flat); table [b, W] int64 (each
    row's blocks); pos int64 [b] (each row's position: its keys 0 … pos are attended) → [b, hq, d]."""
    strides = ((0, keys.stride(1), keys.stride(0)), (0, values.stride(1), values.stride(0)))
    return _launch_decode_attention(q, keys, values, None, pos, table, block, strides)


# ---------------------------------------------------------------------------------------------
# One Mamba-2 recurrence step: state = state · exp(dt·A) + (B·dt) · x, y = state · C + D · x.
# The state ([b, h, p, n], float32 by the config) is read and written once, which at batch 8 and
# above is most of a decode step's non-weight traffic: each program owns BP channels × all n states
# of one (row, head), several KB, so that the loads stream at full bandwidth (mamba-ssm's kernel
# takes 4 channels for n = 128, too little per program to keep HBM busy at batch 64).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ssm_step_kernel(STATE, X, DT, A, B, C, D, Y, HEADS_PER_GROUP,
                     stride_sb, stride_sh, stride_sp, stride_xb, stride_xh, stride_dtb,
                     stride_bb, stride_bg, stride_cb, stride_cg, stride_yb, stride_yh,
                     P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr):
    allow_next(PDL)
    wait_previous(PDL)                  # nothing read early: A is the conv step's output, D may be a fresh copy
    pb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    g = h // HEADS_PER_GROUP
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, N)
    pmask = p < P
    s_ptr = STATE + b * stride_sb + h * stride_sh + p[:, None] * stride_sp + n[None, :]
    state = tl.load(s_ptr, mask=pmask[:, None], other=0.0).to(tl.float32)
    x = tl.load(X + b * stride_xb + h * stride_xh + p, mask=pmask, other=0.0).to(tl.float32)
    dt = tl.load(DT + b * stride_dtb + h).to(tl.float32)
    dA = tl.exp(tl.load(A + h).to(tl.float32) * dt)
    dB = tl.load(B + b * stride_bb + g * stride_bg + n).to(tl.float32) * dt
    c = tl.load(C + b * stride_cb + g * stride_cg + n).to(tl.float32)
    state = state * dA + dB[None, :] * x[:, None]
    tl.store(s_ptr, state.to(STATE.dtype.element_ty), mask=pmask[:, None])
    y = tl.sum(state * c[None, :], axis=1) + x * tl.load(D + h).to(tl.float32)
    tl.store(Y + b * stride_yb + h * stride_yh + p, y.to(Y.dtype.element_ty), mask=pmask)


SSM_STEP_TILE = (8, 2)        # (channels per program, warps): the best of six on an H200 at batch 1, 8, 64


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """state [b, h, p, n] (updated in place; n contiguous), x [b, h, p], dt [b, h] (final step sizes),
    A [h], B/C [b, g, n], D [h] → y [b, h, p] in x's dtype."""
    b, h, p = x.shape
    n = state.shape[-1]
    g = B.shape[1]
    if state.stride(-1) != 1 or n & (n - 1):
        raise ValueError("ssm_step needs a state with contiguous power-of-two states")
    x = x if x.stride(-1) == 1 else x.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    bp, warps = tile or SSM_STEP_TILE
    pdl = enabled(x)
    bp = min(bp, triton.next_power_of_2(p))
    _ssm_step_kernel[(triton.cdiv(p, bp), b, h)](
        state, x, dt, A, B, C, D, y, h // g,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1),
        P=p, N=n, BP=bp, PDL=pdl, num_warps=warps, launch_pdl=pdl)
    return y

