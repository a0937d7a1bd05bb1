"""Plain-torch reference of every sequence operation the hybrid model needs.

These run on any device and are the definition the CUDA kernels are checked against. Shapes use
b batch, s sequence (new tokens), t key positions, c channels, k conv width, h heads, p head dim,
g groups, n SSM state size, q chunk length. All arithmetic is float32; results come back in the
input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Depthwise causal convolution (Mamba's short conv), followed by SiLU
# ---------------------------------------------------------------------------------------------
def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       conv_state: torch.Tensor | None = None) -> torch.Tensor:
    """x [b, s, c], weight [c, k], bias [c] → silu(conv) [b, s, c].

    `conv_state` [b, c, k-1] holds the k-1 inputs before x (zeros at the start of a sequence); when
    given, it is used as left context and then overwritten with the last k-1 inputs seen.
    """
    b, s, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2).float()                                         # [b, c, s]
    left = conv_state.float() if conv_state is not None else xt.new_zeros(b, c, k - 1)
    window = torch.cat([left, xt], dim=-1)                                 # [b, c, k-1+s]
    y = F.conv1d(window, weight.float().unsqueeze(1), bias.float() if bias is not None else None, groups=c)
    if conv_state is not None:
        conv_state.copy_(window[:, :, window.shape[-1] - (k - 1):])
    return F.silu(y).transpose(1, 2).to(x.dtype)                           # [b, s, c]


def causal_conv1d_silu_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            conv_state: torch.Tensor) -> torch.Tensor:
    """One new input per row: x [b, c] → [b, c]; conv_state [b, c, k-1] shifts left by one in place."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)   # [b, c, k]
    y = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    conv_state.copy_(window[:, :, 1:])
    return F.silu(y).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Mamba-2 selective state space (SSD)
#   state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_tᵀ      state [h, p, n]
#   y_t     = state_t C_t + D x_t
# ---------------------------------------------------------------------------------------------
def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., q] → [..., q, q] with out[..., l, m] = a[m+1] + … + a[l] for l ≥ m, and -inf above the diagonal.

    Built from a masked cumulative sum rather than a difference of cumsums, which keeps the
    exponentials of long decays accurate.
    """
    q = a.shape[-1]
    terms = a.unsqueeze(-1).expand(*a.shape, q)                            # terms[..., i, m] = a[i]
    after_m = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)   # i > m
    sums = torch.cumsum(terms.masked_fill(~after_m, 0.0), dim=-2)          # sum of a[i] for m < i ≤ l
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, float("-inf"))


def ssd_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None,
                   return_final_state: bool = False):
    """The whole-sequence scan, in chunks (the SSD algorithm of Mamba-2).

    x [b, s, h, p]; dt [b, s, h] (already softplus'd and clamped); A [h] (negative); B, C [b, s, g, n];
    D [h]; initial_state [b, h, p, n] or None (zeros) → y [b, s, h, p] (and the final state, float32).
    Inside a chunk the output is a masked, decay-weighted attention-like product; across chunks a
    short recurrence carries the state.
    """
    b, s, h, p = x.shape
    g, n = B.shape[-2:]
    q = chunk_size
    heads_per_group = h // g
    x32, dt32 = x.float(), dt.float()
    B32 = B.float().repeat_interleave(heads_per_group, dim=2)              # [b, s, h, n]
    C32 = C.float().repeat_interleave(heads_per_group, dim=2)              # [b, s, h, n]

    # Pad to whole chunks at the end: dt = 0 there means no decay and no input, so the state is unchanged.
    pad = (-s) % q
    if pad:
        x32, dt32, B32, C32 = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x32, dt32, B32, C32))
    nc = (s + pad) // q
    xc = x32.reshape(b, nc, q, h, p)
    Bc = B32.reshape(b, nc, q, h, n)
    Cc = C32.reshape(b, nc, q, h, n)
    dtc = dt32.reshape(b, nc, q, h)
    xdt = xc * dtc.unsqueeze(-1)                                           # [b, nc, q, h, p] input × step
    log_decay = (dtc * A.float()).permute(0, 1, 3, 2)                      # [b, nc, h, q]  dt·A ≤ 0
    cum = torch.cumsum(log_decay, dim=-1)                                  # [b, nc, h, q]

    # 1. Within each chunk: y_l += Σ_{m≤l} (C_l·B_m) exp(a_{m+1}+…+a_l) dt_m x_m
    decay = torch.exp(_segment_sums(log_decay))                            # [b, nc, h, q(l), q(m)]
    scores = torch.einsum("bclhn,bcmhn->bchlm", Cc, Bc) * decay
    y = torch.einsum("bchlm,bcmhp->bclhp", scores, xdt)

    # 2. What each chunk adds to the state at its end: Σ_m exp(a_{m+1}+…+a_end) dt_m x_m B_mᵀ
    to_end = torch.exp(cum[..., -1:] - cum)                                # [b, nc, h, q]
    chunk_states = torch.einsum("bclhn,bchl,bclhp->bchpn", Bc, to_end, xdt)

    # 3. Carry the state across chunks (one step per chunk).
    state = initial_state.float() if initial_state is not None else x32.new_zeros(b, h, p, n)
    chunk_decay = torch.exp(cum[..., -1])                                  # [b, nc, h]
    entering = []
    for i in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, i, :, None, None] + chunk_states[:, i]
    entering = torch.stack(entering, dim=1)                                # [b, nc, h, p, n]

    # 4. The state entering a chunk, decayed to each position and read out by C_l.
    from_start = torch.exp(cum)                                            # [b, nc, h, q]
    y = y + torch.einsum("bclhn,bchpn,bchl->bclhp", Cc, entering, from_start)

    y = y + D.float()[:, None] * xc                                        # skip connection
    y = y.reshape(b, nc * q, h, p)[:, :s].to(x.dtype)
    return (y, state) if return_final_state else y


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One recurrence step per row, updating `state` [b, h, p, n] in place.

    x [b, h, p]; dt [b, h] (already softplus'd and clamped); A [h]; B, C [b, g, n]; D [h] → y [b, h, p].
    """
    h, g = x.shape[1], B.shape[1]
    B32 = B.float().repeat_interleave(h // g, dim=1)                       # [b, h, n]
    C32 = C.float().repeat_interleave(h // g, dim=1)                       # [b, h, n]
    x32, dt32 = x.float(), dt.float()
    decay = torch.exp(dt32 * A.float())                                    # [b, h]
    new_state = state.float() * decay[:, :, None, None] \
        + (dt32[:, :, None] * x32).unsqueeze(-1) * B32.unsqueeze(2)        # [b, h, p, n]
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C32) + D.float()[:, None] * x32
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Norms and attention
# ---------------------------------------------------------------------------------------------
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) · weight, in float32 (weight applied in fp32, as transformers does) → x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """RMSNorm(y · silu(z)) over groups of `group_size` channels, times weight (gate before norm)."""
    gated = y.float() * F.silu(z.float())
    groups = gated.reshape(*gated.shape[:-1], -1, group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return (groups.reshape(gated.shape) * weight.float()).to(y.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q [b, hq, s, d]; k, v [b, hk, t, d]; mask [b, 1, s, t] bool (True = may attend) or None;
    causal (used when mask is None): query i sees keys ≤ i + (t - s). → [b, hq, s, d]
    """
    s, t, d = q.shape[-2], k.shape[-2], q.shape[-1]
    repeat = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeat, dim=1).float()                         # [b, hq, t, d]
    v = v.repeat_interleave(repeat, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * d ** -0.5                 # [b, hq, s, t]
    if mask is None and causal:
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal=t - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


def flat_rows(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Paged KV addressing: the flat row (block · B + offset) of each row's positions, where position p of
    a row lives in block table[p // B] at offset p % B. table [b, W], positions [b, n] → [b, n]."""
    return table.gather(1, positions // block_size) * block_size + positions % block_size
