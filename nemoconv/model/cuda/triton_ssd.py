"""Mamba-2's chunked SSD scan for whole sequences (prefill), in two Triton launches instead of mamba-ssm's five.

The scan is cut into chunks of Q positions. With a_t = dt_t·A ≤ 0 and cum the running sum of a inside a chunk:
  states   one program per (head, block of head dims, batch row) walks the chunks in order and keeps the
           state in registers: it writes the state each chunk starts from (x's dtype) and the chunk's cum
           (float32), then S ← exp(Σa)·S + Σ_t exp(cum_end - cum_t)·dt_t·x_tᵀB_t; the last S is the final
           state (float32).
  outputs  one program per (block of BM rows, chunk, head, batch row), all in parallel:
           y_l = exp(cum_l)·C_l·S_chunkᵀ + Σ_{m≤l} (C_l·B_m)·exp(cum_l - cum_m)·dt_m·x_m + D·x_l,
           the C·Bᵀ block computed where it is used (no [Q, Q] matrix goes through memory).
mamba-ssm's five kernels write the chunk states in float32, pass them through a kernel of their own and read
them back, and keep C·Bᵀ in memory between launches. H200, one 8B layer (128 heads of 64, 8 groups of state 128)
at 2048 tokens, bf16: theirs 160 µs, these two 115 µs (42 + 73). Rounding is of the same kind: bf16 operands
into float32 accumulators, the chunk states rounded once to x's dtype, one operand of the chunk-state product
rounded to bf16 after its decay·dt scale (theirs B, ours x: outputs measured as exact as theirs, the final state
1.3-2.4× less exact; tests/gpu/test_ssd_scan.py). Positions past the sequence's end are read as dt = 0 and x = 0,
so the state passes through them unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 operands keep full precision (tensor cores would round them to tf32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _states_kernel(X, DT, A, B, INIT, STATES, FINAL, CUM, seqlen, nchunks, heads_per_group, dim_p, dim_n,
                   sx_b, sx_s, sx_h, sdt_b, sdt_s, sdt_h, sb_b, sb_s, sb_g, ss_b, ss_c, ss_h, ss_p,
                   Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_INIT: tl.constexpr,
                   IEEE: tl.constexpr):
    h = tl.program_id(0)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    bi = tl.program_id(2).to(tl.int64)
    nheads = tl.num_programs(0)
    g = h // heads_per_group
    n = tl.arange(0, BN)
    q = tl.arange(0, Q)
    pn_mask = (p[:, None] < dim_p) & (n[None, :] < dim_n)
    pn = p[:, None] * dim_n + n[None, :]                                  # offsets in a contiguous [p, n] state
    a_h = tl.load(A + h)
    if HAS_INIT:
        S = tl.load(INIT + (bi * nheads + h) * dim_p * dim_n + pn, mask=pn_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BP, BN), dtype=tl.float32)
    x_base = X + bi * sx_b + h * sx_h
    b_base = B + bi * sb_b + g * sb_g
    st_ptr = STATES + bi * ss_b + h * ss_h + p[:, None] * ss_p + n[None, :]
    cum_ptr = CUM + (bi * nheads + h) * nchunks * Q + q
    first = tl.program_id(1) == 0
    for c in range(nchunks):
        tl.store(st_ptr, S.to(STATES.dtype.element_ty), mask=pn_mask)
        st_ptr += ss_c
        t = c * Q + q
        tmask = t < seqlen
        dt = tl.load(DT + bi * sdt_b + t * sdt_s + h * sdt_h, mask=tmask, other=0.0)
        cum = tl.cumsum(dt * a_h, axis=0)
        total = tl.sum(dt * a_h, axis=0)
        if first:
            tl.store(cum_ptr, cum)                                        # the outputs read it
        cum_ptr += Q
        weight = tl.exp(total - cum) * dt                                 # decay to the chunk's end · dt
        x = tl.load(x_base + t[:, None].to(tl.int64) * sx_s + p[None, :], mask=tmask[:, None] & (p[None, :] < dim_p),
                    other=0.0)
        xw = (x.to(tl.float32) * weight[:, None]).to(x.dtype)
        bt = tl.load(b_base + t[:, None].to(tl.int64) * sb_s + n[None, :], mask=tmask[:, None] & (n[None, :] < dim_n),
                     other=0.0)
        S = S * tl.exp(total) + _dot(tl.trans(xw), bt, IEEE)
    tl.store(FINAL + (bi * nheads + h) * dim_p * dim_n + pn, S, mask=pn_mask)


@triton.jit
def _outputs_kernel(X, DT, B, C, D, STATES, CUM, Y, seqlen, nchunks, heads_per_group, dim_p, dim_n,
                    sx_b, sx_s, sx_h, sdt_b, sdt_s, sdt_h, sb_b, sb_s, sb_g, sc_b, sc_s, sc_g,
                    ss_b, ss_c, ss_h, ss_p, sy_b, sy_s, sy_h,
                    Q: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bi = (tl.program_id(1) // nchunks).to(tl.int64)
    c = tl.program_id(1) % nchunks
    h = tl.program_id(2)
    g = h // heads_per_group
    q0 = c * Q                                                            # the chunk's first position
    valid = seqlen - q0                                                   # positions of this chunk that exist
    m = pid_m * BM + tl.arange(0, BM)                                     # this block's rows, inside the chunk
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pmask = p < dim_p
    nmask = n < dim_n
    mmask = m < valid
    dt_chunk = DT + bi * sdt_b + q0.to(tl.int64) * sdt_s + h * sdt_h
    cum_chunk = CUM + ((bi * tl.num_programs(2) + h) * nchunks + c) * Q
    cum_m = tl.load(cum_chunk + m)
    c_rows = C + bi * sc_b + g * sc_g + (q0 + m)[:, None].to(tl.int64) * sc_s + n[None, :]
    cm = tl.load(c_rows, mask=mmask[:, None] & nmask[None, :], other=0.0)                      # [BM, N]
    s_ptr = STATES + bi * ss_b + c.to(tl.int64) * ss_c + h * ss_h + p[:, None] * ss_p + n[None, :]
    start = tl.load(s_ptr, mask=pmask[:, None] & nmask[None, :], other=0.0)                     # [P, N]
    # what the state the chunk starts from gives each row, decayed to it
    acc = _dot(cm, tl.trans(start), IEEE) * tl.exp(cum_m)[:, None]                               # [BM, P]
    x_head = X + bi * sx_b + h * sx_h
    b_group = B + bi * sb_b + g * sb_g
    for k0 in range(0, (pid_m + 1) * BM, BM):                             # earlier positions of the chunk only
        k = k0 + tl.arange(0, BM)
        kmask = k < valid
        dt_k = tl.load(dt_chunk + k * sdt_s, mask=kmask, other=0.0)
        cum_k = tl.load(cum_chunk + k)
        bk = tl.load(b_group + (q0 + k)[:, None].to(tl.int64) * sb_s + n[None, :],
                     mask=kmask[:, None] & nmask[None, :], other=0.0)                            # [BM, N]
        scores = _dot(cm, tl.trans(bk), IEEE)        # C_l·B_m: recomputed per head, cheaper than a [Q, Q] read
        decay = tl.exp(tl.where(m[:, None] >= k[None, :], cum_m[:, None] - cum_k[None, :], float("-inf")))
        xk = tl.load(x_head + (q0 + k)[:, None].to(tl.int64) * sx_s + p[None, :],
                     mask=kmask[:, None] & pmask[None, :], other=0.0)                            # [BM, P]
        acc += _dot((scores * decay * dt_k[None, :]).to(xk.dtype), xk, IEEE)
    xm = tl.load(x_head + (q0 + m)[:, None].to(tl.int64) * sx_s + p[None, :],
                 mask=mmask[:, None] & pmask[None, :], other=0.0)
    acc += tl.load(D + h) * xm.to(tl.float32)
    y_ptr = Y + bi * sy_b + h * sy_h + (q0 + m)[:, None].to(tl.int64) * sy_s + p[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & pmask[None, :])


# Tiles: rows of an outputs program, head dims of a states program, warps and pipeline stages of each. Swept on
# an H200 at the 8B layout, 2048 tokens (µs per layer): outputs 64 rows, 4 warps, 1 stage 116 (2 stages 136;
# 32 rows 157; 128 rows 145-245; 8 warps 146-257); states: 16, 32 and 64 head dims a program within 6 % of
# each other. A program per several heads of a group (B and C read once for them) was slower: its per-column
# decays cost more. Also no faster (same layer, whole scan against 115): states with the n dims split in 2 or 4
# programs 116-166, with 2 or 4 heads a program (per-head decays, B read once) 120-153, 3 stages 153; outputs
# with 2 or 4 heads a program (C·Bᵀ once, 3-D dots) 135-237; outputs launched under PDL while states runs,
# waiting on per-chunk counts, 147. A second chunk-state product of x·decay·dt's bf16 remainder would make the
# final state 1.0e-5 from float64 instead of 2.4e-3 (mamba-ssm 2.2e-3), for 127 µs.
TILES = {"rows": 64, "state_dims": 32, "warps_states": 4, "warps_outputs": 4, "stages_states": 2,
         "stages_outputs": 1}


def _block(size: int) -> int:
    return max(triton.next_power_of_2(size), 16)


def supported(x: torch.Tensor, D: torch.Tensor, chunk_size: int) -> bool:
    """Chunks of a power of two from 16 positions (tensor-core tiles need 16), model dtypes, one D per head."""
    return chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0 and D.numel() == x.shape[2] and \
        x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
             chunk_size: int, initial_state: torch.Tensor | None = None, return_final_state: bool = False,
             final_out: torch.Tensor | None = None):
    """x [b, s, h, p], dt [b, s, h] (final step sizes), A [h], B/C [b, s, g, n], D [h], initial_state
    [b, h, p, n] or None → y [b, s, h, p] in x's dtype (and the final state, float32, when asked). A final_out
    that is float32 and contiguous [b, h, p, n] is where the scan writes the final state (then the state returned);
    it may be initial_state itself: each program reads its slice of the initial state before it writes the same
    slice of the final one. Any other final_out is left alone (`kernels.ssd_chunk_scan` copies into it)."""
    b, s, h, p = x.shape
    g, n = B.shape[-2:]
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    dt, A, D = dt.float(), A.float().contiguous(), D.float().contiguous()
    y = torch.empty(b, s, h, p, device=x.device, dtype=x.dtype)
    if s == 0:                                    # nothing to scan: the state is what it was
        final = initial_state.float().clone() if initial_state is not None else \
            torch.zeros(b, h, p, n, device=x.device, dtype=torch.float32)
        return (y, final) if return_final_state else y
    nchunks = triton.cdiv(s, chunk_size)
    states = torch.empty(b, nchunks, h, p, n, device=x.device, dtype=x.dtype)
    direct = final_out is not None and final_out.dtype == torch.float32 and final_out.is_contiguous() and \
        final_out.shape == (b, h, p, n)
    final = final_out if direct else torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    cum = torch.empty(b, h, nchunks, chunk_size, device=x.device, dtype=torch.float32)
    init = initial_state.float().contiguous() if initial_state is not None else final
    ieee = x.dtype == torch.float32
    bp = min(_block(p), TILES["state_dims"])
    _states_kernel[(h, triton.cdiv(p, bp), b)](
        x, dt, A, B, init, states, final, cum, s, nchunks, h // g, p, n,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        B.stride(0), B.stride(1), B.stride(2), *states.stride()[:4],
        Q=chunk_size, BP=bp, BN=_block(n), HAS_INIT=initial_state is not None, IEEE=ieee,
        num_warps=TILES["warps_states"], num_stages=TILES["stages_states"])
    bm = min(TILES["rows"], chunk_size)
    _outputs_kernel[(chunk_size // bm, b * nchunks, h)](
        x, dt, B, C, D, states, cum, y, s, nchunks, h // g, p, n,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        *states.stride()[:4], y.stride(0), y.stride(1), y.stride(2),
        Q=chunk_size, BM=bm, BP=_block(p), BN=_block(n), IEEE=ieee, num_warps=TILES["warps_outputs"],
        num_stages=TILES["stages_outputs"])
    return (y, final) if return_final_state else y
