"""Attention of the built-in model: no positional encoding (Nemotron-H's attention is NoPE), grouped KV heads,
an optional FP8 KV cache emulated exactly."""

from __future__ import annotations

import torch
from torch import nn

from nemoconv.model import fp8
from nemoconv.model.common import Pass
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import Linear
from nemoconv.storage.config import ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        bias = spec.attention_bias
        self.q_proj = Linear(spec.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = Linear(spec.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(spec.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, spec.hidden_size, bias=bias)
        # FP8 KV cache (a checkpoint's k_proj.k_scale / v_proj.v_scale, float32 []): when set, keys and values
        # are read as an FP8 cache holds them, e4m3(k / k_scale) · k_scale, in every path (whole sequence,
        # prefill, decode), so the cached and uncached logits agree and verify sees the cache's effect.
        # This is an exact emulation (a round trip through float8_e4m3fn) on CPU and on CUDA alike; the
        # cache buffer itself keeps the model dtype.
        self.register_buffer("k_scale", None)
        self.register_buffer("v_scale", None)

    def _kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale is not None:
            k = fp8.quantize_fp8(k, self.k_scale).float().mul(self.k_scale).to(k.dtype)
        if self.v_scale is not None:
            v = fp8.quantize_fp8(v, self.v_scale).float().mul(self.v_scale).to(v.dtype)
        return k, v

    def forward(self, hidden: torch.Tensor, ctx: Pass) -> torch.Tensor:
        if ctx.pos is not None:
            return self._static_step(hidden, ctx)
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).view(b, s, self.heads, self.head_dim).transpose(1, 2)     # [b, hq, s, d]
        k = self.k_proj(hidden).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, hk, s, d]
        v = self.v_proj(hidden).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        k, v = self._kv(k, v)
        if ctx.cache is not None:
            # the cache stores the new keys/values and hands back every key/value so far (a
            # HybridCache slices its contiguous buffer; a paged cache gathers its blocks)
            k, v = ctx.cache.attend_kv(self.layer_idx, ctx.start, k, v)        # [b, hk, t, d]
        out = kernels.attention(q, k, v, ctx.attn_mask, ctx.causal)           # [b, hq, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def _static_step(self, hidden: torch.Tensor, ctx: Pass) -> torch.Tensor:
        """One token per row with shapes independent of the position (CUDA graphs): the cache stores the
        new key and value at ctx.pos (a device tensor) and attends the query over its keys up to there."""
        b = hidden.shape[0]
        q = self.q_proj(hidden).view(b, self.heads, self.head_dim)                        # [b, hq, d]
        k = self.k_proj(hidden).view(b, self.kv_heads, 1, self.head_dim)                  # [b, hk, 1, d]
        v = self.v_proj(hidden).view(b, self.kv_heads, 1, self.head_dim)
        k, v = self._kv(k, v)
        out = ctx.cache.decode_attend(self.layer_idx, q, k, v, ctx.pos)                   # [b, hq, d]
        return self.o_proj(out.reshape(b, 1, self.heads * self.head_dim))
