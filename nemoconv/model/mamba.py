"""Mamba-2 mixer of the built-in model: in_proj → causal depthwise conv → selective scan (SSD) → gated
grouped RMSNorm → out_proj, in three paths: a whole sequence (no cache), a prefill that reads and writes the
cache's conv and SSM state, and a single-token decode step from that state.
"""

from __future__ import annotations

import torch
from torch import nn

from nemoconv.model import fp8
from nemoconv.model.common import Pass, input_linear, param
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import Linear
from nemoconv.storage.config import ModelSpec


def last_inputs(context: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The conv context after the first `lengths[r]` of x's positions: context [b, c, k-1] (the inputs
    before x), x [b, s, c], lengths int64 [b] on the device → [b, c, k-1], reaching back into the old
    context where a row has fewer than k-1 real inputs. A gather: no host reads, so a CUDA graph
    replays it for any length."""
    k1 = context.shape[-1]
    window = torch.cat([context, x.transpose(1, 2).to(context.dtype)], dim=-1)     # [b, c, k-1+s]
    index = lengths[:, None] + torch.arange(k1, device=x.device)[None]            # window positions n … n+k-2
    return window.gather(2, index[:, None, :].expand(-1, window.shape[1], -1))


class Conv1d(nn.Module):
    """Holds the depthwise conv parameters in HF's layout: weight [c, 1, k], bias [c]."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = param(channels, 1, kernel)
        self.bias = param(channels) if bias else None


class GatedRMSNorm(nn.Module):
    """RMSNorm of y·silu(z) computed separately over n_groups channel groups (Mamba-2's output norm)."""

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = param(size)
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rmsnorm(y, z, self.weight, self.eps, self.group_size)


class MambaMixer(nn.Module):
    fp32_params = ("A_log", "D", "dt_bias")  # tiny, and precision-critical: always kept in float32

    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = spec.mamba_num_heads, spec.mamba_head_dim
        self.groups, self.state_size = spec.n_groups, spec.ssm_state_size
        self.inner = spec.mamba_intermediate                     # h·p
        self.conv_dim = spec.conv_dim                            # h·p + 2·g·n  (x, B, C)
        self.chunk_size = spec.chunk_size
        # Step-size clamp: config.time_step_limit ((0, inf) by default, i.e. none), as NVIDIA's original code
        # and mamba-ssm (no clamp by default) and transformers from 5.25 apply it (5.0-5.24 clamped at
        # (time_step_min, inf) instead). The same clamp in all three paths (chunked, decode step, reference),
        # so that cached decoding reproduces the full forward.
        self.dt_limit = spec.time_step_limit
        self.in_proj = Linear(spec.hidden_size, self.inner + self.conv_dim + self.heads, bias=spec.mamba_proj_bias)
        self.conv1d = Conv1d(self.conv_dim, spec.conv_kernel, bias=spec.use_conv_bias)
        self.A_log = param(self.heads)
        self.D = param(self.heads)
        self.dt_bias = param(self.heads)
        self.norm = GatedRMSNorm(self.inner, self.inner // self.groups, spec.layer_norm_epsilon)
        self.out_proj = Linear(self.inner, spec.hidden_size, bias=spec.mamba_proj_bias)

    def forward(self, hidden: torch.Tensor, ctx: Pass) -> torch.Tensor:
        return self._step(hidden, ctx) if ctx.decode else self._sequence(hidden, ctx)

    def _sequence(self, hidden: torch.Tensor, ctx: Pass) -> torch.Tensor:
        """Whole sequence (no cache) or prefill (state read from and written back to the cache)."""
        b, s, _ = hidden.shape
        h, p, g, n = self.heads, self.head_dim, self.groups, self.state_size
        pad = ctx.pad_mask[..., None] if ctx.pad_mask is not None else None    # [b, s, 1]
        if pad is not None:
            hidden = hidden.masked_fill(~pad, 0.0)
        zxbcdt = input_linear(self.in_proj, hidden, ctx)                      # [b, s, h·p + conv_dim + h]
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, h], dim=-1)
        if pad is not None:
            # Padding must enter the conv as zeros (the zero left context of an unpadded row), even with
            # a biased in_proj; after the conv it must give x = B = 0 so the scan state stays untouched.
            xbc = xbc.masked_fill(~pad, 0.0)
        conv_state, ssm_state = ctx.cache.layer_mamba(self.layer_idx) if ctx.cache is not None else (None, None)
        # Right padding (a bucketed prefill tail): the conv context must end at the last real input, not at the
        # pads the conv kernel sees last; taken from the old context and these inputs before the conv replaces it.
        context = last_inputs(conv_state, xbc, ctx.lengths) if ctx.lengths is not None and conv_state is not None \
            else None
        # conv (its context read and refreshed), step size softplus(dt + dt_bias) clamped, A = -exp(A_log)
        xbc, step, A = kernels.mamba_sequence_inputs(xbc, dt, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state,
                                                     self.dt_bias, self.dt_limit, self.A_log)
        if ctx.lengths is not None:
            # dt = 0 and x = B = 0 at the pads, so the scan state passes through them unchanged (decay
            # exp(0·A) = 1, nothing added)
            real = (torch.arange(s, device=hidden.device)[None] < ctx.lengths[:, None])[..., None]   # [b, s, 1]
            xbc = xbc.masked_fill(~real, 0.0)
            step = step.masked_fill(~real, 0.0)
            if context is not None:
                conv_state.copy_(context)
        if pad is not None:
            xbc = xbc.masked_fill(~pad, 0.0)
        x, B, C = xbc.split([self.inner, g * n, g * n], dim=-1)
        result = kernels.ssd_chunk_scan(
            x.reshape(b, s, h, p), step, A, B.reshape(b, s, g, n), C.reshape(b, s, g, n), self.D,
            self.chunk_size, initial_state=ssm_state, state_out=ssm_state)      # the final state into the cache
        y = result.reshape(b, s, self.inner)
        if ctx.fused and fp8.prequantize_ok(self.out_proj, y):
            return self._norm_fp8_out(y.reshape(b * s, self.inner), z.reshape(b * s, self.inner), (b, s))
        y = self.norm(y, z)                                                    # gate, then grouped RMSNorm
        return self.out_proj(y)                                                # [b, s, hidden]

    def _step(self, hidden: torch.Tensor, ctx: Pass) -> torch.Tensor:
        """Single-token decode from the cache: hidden [b, 1, hidden]."""
        b = hidden.shape[0]
        h, p, g, n = self.heads, self.head_dim, self.groups, self.state_size
        conv_state, ssm_state = ctx.cache.layer_mamba(self.layer_idx)
        zxbcdt = input_linear(self.in_proj, hidden, ctx)[:, 0]                # [b, h·p + conv_dim + h]
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, h], dim=-1)
        # conv step (state shifted in place), step size softplus(dt + dt_bias) clamped, A = -exp(A_log)
        xbc, dt, A = kernels.mamba_step_inputs(xbc, dt, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state,
                                               self.dt_bias, self.dt_limit, self.A_log)
        x, B, C = xbc.split([self.inner, g * n, g * n], dim=-1)
        y = kernels.ssm_step(ssm_state, x.reshape(b, h, p), dt, A,
                             B.reshape(b, g, n), C.reshape(b, g, n), self.D)   # [b, h, p]
        y = y.reshape(b, self.inner)
        if ctx.fused and fp8.prequantize_ok(self.out_proj, y):
            return self._norm_fp8_out(y, z, (b, 1))
        y = self.norm(y, z)
        return self.out_proj(y)[:, None]                                       # [b, 1, hidden]

    def _norm_fp8_out(self, y: torch.Tensor, z: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        """norm then out_proj with the norm writing out_proj's FP8 input itself (one launch instead of two, and no
        normed rows in memory): y, z [rows, inner] (z a strided slice of in_proj's output) → [*lead, hidden]."""
        rows, out, norm = y.shape[0], self.out_proj, self.norm
        y_q = kernels.gated_rmsnorm_fp8(y, z, norm.weight, norm.eps, norm.group_size, out.input_scale,
                                        fp8.padded_rows(rows))
        return fp8.fp8_matmul_quantized(y_q, rows, lead, out.weight, out.weight_scale, out.input_scale, out.bias,
                                        y.dtype)
