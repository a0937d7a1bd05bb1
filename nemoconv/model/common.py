"""What every layer of the built-in model shares: the `Pass` (what one forward pass over s new tokens needs
to know), the attention mask, and the small modules (RMSNorm, Embedding, relu², an FP8-aware input linear).
Sequence operations go through `cuda.kernels` (Triton on CUDA, the torch reference elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemoconv.model import fp8
from nemoconv.model.cache import HybridCache
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import Linear


@dataclass
class Pass:
    """What one forward pass over s new tokens needs to know (built once, read by every layer)."""

    cache: HybridCache | None         # or a paged cache of the serving engine (same layer interface)
    start: int                        # position of the first new token (0 without a cache)
    pad_mask: torch.Tensor | None     # [b, s] bool, False at left padding; None when there is none
    attn_mask: torch.Tensor | None    # [b, 1, s, t] bool, True = may attend; None → see `causal`
    causal: bool                      # plain causal attention over s == t positions (no mask needed)
    decode: bool                      # a single-token step from the cache
    pos: torch.Tensor | None = None   # int64 on the device: this step's position (static-shape decode),
                                      # [1] for a HybridCache, [b] (one per row) for a paged cache
    fused: bool = False               # CUDA structure: residual add fused into the next norm, MoE without sync
    prequant: tuple | None = None     # (normed hidden, its FP8 quantization for the mixer's first linear)
    lengths: torch.Tensor | None = None   # int64 [b] on the device: real new tokens per row, right padding after
                                      # them (the serving engine's bucketed prefill tails); None: no right padding


def causal_mask(valid: torch.Tensor, start: int, s: int) -> torch.Tensor:
    """valid [b, t] (t = start + s) → [b, 1, s, t]: causal, and only real keys. A padded query also
    sees itself, so its (ignored) row never softmaxes over nothing and stays finite."""
    t = valid.shape[1]
    query_pos = torch.arange(start, start + s, device=valid.device)[:, None]   # [s, 1]
    key_pos = torch.arange(t, device=valid.device)[None, :]                    # [1, t]
    causal = key_pos <= query_pos                                              # [s, t]
    return (causal & (valid[:, None, :] | (key_pos == query_pos)))[:, None]     # [b, 1, s, t]


def param(*shape) -> nn.Parameter:
    """An uninitialised frozen parameter (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = param(size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x, self.weight, self.eps)   # weight applied in fp32, as the reference does


class Embedding(nn.Module):
    def __init__(self, vocab: int, size: int):
        super().__init__()
        self.weight = param(vocab, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return kernels.relu2(x)


def input_linear(lin: Linear, x: torch.Tensor, ctx: Pass | None) -> torch.Tensor:
    """lin(x), using the FP8 activation the preceding norm kernel already produced for x, if any."""
    pre = ctx.prequant if ctx is not None else None
    if pre is not None and pre[0] is x:
        return fp8.fp8_matmul_quantized(pre[1], x.numel() // x.shape[-1], x.shape[:-1], lin.weight, lin.weight_scale,
                                        lin.input_scale, lin.bias, x.dtype)
    return lin(x)
