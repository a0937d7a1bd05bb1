"""The built-in Nemotron-H hybrid model (DESIGN.md §5): Mamba-2, NoPE GQA attention, relu² MLP and MoE layers.

Module names mirror the canonical HF tensor names (`backbone.layers.{i}.mixer.in_proj.weight`, …), so
loading is a lookup. Each layer reads top to bottom: projections, mixing, output. Sequence operations
go through `kernels` (Triton on CUDA, torch reference elsewhere); the model never branches on device.

Three ways to run it:
  model(input_ids, attention_mask)            whole sequence, no cache → logits [b, s, vocab] (float32)
  model.prefill(input_ids, cache, mask)       consumes tokens into a HybridCache → logits
  model.decode_step(tokens, cache)            one token per row from the cache → logits [b, vocab]
`generate` drives the last two. Padding is on the left: padded positions feed zeros into the Mamba
conv and scan (so they leave the recurrent state untouched) and are never attended to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemoconv.errors import NemoconvError
from nemoconv.model import fp8
from nemoconv.model.cache import HybridCache
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import Linear
from nemoconv.storage.config import ATTENTION, MAMBA, MOE, ModelSpec
from nemoconv.storage.config import MLP as MLP_CODE

# Prefills of at most this many rows × positions are captured as CUDA graphs (a graph keeps its
# activations' memory).
PREFILL_GRAPH_MAX_TOKENS = 8192


@dataclass
class _Pass:
    """What one forward pass over s new tokens needs to know (built once, read by every layer)."""

    cache: HybridCache | None
    start: int                        # position of the first new token (0 without a cache)
    pad_mask: torch.Tensor | None     # [b, s] bool, False at left padding; None when there is none
    attn_mask: torch.Tensor | None    # [b, 1, s, t] bool, True = may attend; None → see `causal`
    causal: bool                      # plain causal attention over s == t positions (no mask needed)
    decode: bool                      # a single-token step from the cache
    pos: torch.Tensor | None = None   # int64 on the device: this step's position (static-shape decode),
                                      # [1] for a HybridCache, [b] (one per row) for a paged cache
    fused: bool = False               # CUDA structure: residual add fused into the next norm, MoE without sync
    prequant: tuple | None = None     # (normed hidden, its FP8 quantization for the mixer's first linear)


# ---------------------------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------------------------
def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = _param(size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x, self.weight, self.eps)   # weight applied in fp32, as the reference does


class Embedding(nn.Module):
    def __init__(self, vocab: int, size: int):
        super().__init__()
        self.weight = _param(vocab, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Conv1d(nn.Module):
    """Holds the depthwise conv parameters in HF's layout: weight [c, 1, k], bias [c]."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = _param(channels, 1, kernel)
        self.bias = _param(channels) if bias else None


class GatedRMSNorm(nn.Module):
    """RMSNorm of y·silu(z) computed separately over n_groups channel groups (Mamba-2's output norm)."""

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = _param(size)
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rmsnorm(y, z, self.weight, self.eps, self.group_size)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return kernels.relu2(x)


def _input_linear(lin: Linear, x: torch.Tensor, ctx: _Pass | None) -> torch.Tensor:
    """lin(x), using the FP8 activation the preceding norm kernel already produced for x, if any."""
    pre = ctx.prequant if ctx is not None else None
    if pre is not None and pre[0] is x:
        return fp8.fp8_matmul_quantized(pre[1], x.numel() // x.shape[-1], x.shape[:-1], lin.weight, lin.weight_scale,
                                        lin.input_scale, lin.bias, x.dtype)
    return lin(x)


# ---------------------------------------------------------------------------------------------
# Mamba-2 mixer
# ---------------------------------------------------------------------------------------------
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
        # Step-size clamp. transformers 5.23's NemotronHMamba2Mixer sets time_step_limit to
        # (config.time_step_min, inf) and ignores config.time_step_limit (NVIDIA's original code and
        # mamba-ssm use (0, inf), i.e. no clamp). We match transformers for parity, and apply the same
        # clamp in all three paths: transformers clamps only its chunked path and not its single-token
        # decode, so without this our cached decode would drift from our own full forward whenever
        # softplus(dt) < time_step_min.
        self.dt_limit = (spec.time_step_min, float("inf"))
        self.in_proj = Linear(spec.hidden_size, self.inner + self.conv_dim + self.heads, bias=spec.mamba_proj_bias)
        self.conv1d = Conv1d(self.conv_dim, spec.conv_kernel, bias=spec.use_conv_bias)
        self.A_log = _param(self.heads)
        self.D = _param(self.heads)
        self.dt_bias = _param(self.heads)
        self.norm = GatedRMSNorm(self.inner, self.inner // self.groups, spec.layer_norm_epsilon)
        self.out_proj = Linear(self.inner, spec.hidden_size, bias=spec.mamba_proj_bias)

    def _step_size(self, dt: torch.Tensor) -> torch.Tensor:
        """Raw dt [..., h] → softplus(dt + dt_bias), clamped, in float32."""
        return F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)

    def forward(self, hidden: torch.Tensor, ctx: _Pass) -> torch.Tensor:
        return self._step(hidden, ctx) if ctx.decode else self._sequence(hidden, ctx)

    def _sequence(self, hidden: torch.Tensor, ctx: _Pass) -> torch.Tensor:
        """Whole sequence (no cache) or prefill (state read from and written back to the cache)."""
        b, s, _ = hidden.shape
        h, p, g, n = self.heads, self.head_dim, self.groups, self.state_size
        pad = ctx.pad_mask[..., None] if ctx.pad_mask is not None else None    # [b, s, 1]
        if pad is not None:
            hidden = hidden.masked_fill(~pad, 0.0)
        zxbcdt = _input_linear(self.in_proj, hidden, ctx)                      # [b, s, h·p + conv_dim + h]
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, h], dim=-1)
        if pad is not None:
            # Padding must enter the conv as zeros (the zero left context of an unpadded row), even with
            # a biased in_proj; after the conv it must give x = B = 0 so the scan state stays untouched.
            xbc = xbc.masked_fill(~pad, 0.0)
        conv_state, ssm_state = ctx.cache.layer_mamba(self.layer_idx) if ctx.cache is not None else (None, None)
        xbc = kernels.causal_conv1d_silu(xbc, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)
        if pad is not None:
            xbc = xbc.masked_fill(~pad, 0.0)
        x, B, C = xbc.split([self.inner, g * n, g * n], dim=-1)
        A = -torch.exp(self.A_log.float())                                     # [h], negative
        result = kernels.ssd_chunk_scan(
            x.reshape(b, s, h, p), self._step_size(dt), A, B.reshape(b, s, g, n), C.reshape(b, s, g, n), self.D,
            self.chunk_size, initial_state=ssm_state, return_final_state=ssm_state is not None)
        if ssm_state is not None:
            y, final_state = result
            ssm_state.copy_(final_state)
        else:
            y = result                                                         # [b, s, h, p]
        y = self.norm(y.reshape(b, s, self.inner), z)                          # gate, then grouped RMSNorm
        return self.out_proj(y)                                                # [b, s, hidden]

    def _step(self, hidden: torch.Tensor, ctx: _Pass) -> torch.Tensor:
        """Single-token decode from the cache: hidden [b, 1, hidden]."""
        b = hidden.shape[0]
        h, p, g, n = self.heads, self.head_dim, self.groups, self.state_size
        conv_state, ssm_state = ctx.cache.layer_mamba(self.layer_idx)
        zxbcdt = _input_linear(self.in_proj, hidden, ctx)[:, 0]                # [b, h·p + conv_dim + h]
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, h], dim=-1)
        # conv step (state shifted in place), step size softplus(dt + dt_bias) clamped, A = -exp(A_log)
        xbc, dt, A = kernels.mamba_step_inputs(xbc, dt, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state,
                                               self.dt_bias, self.dt_limit, self.A_log)
        x, B, C = xbc.split([self.inner, g * n, g * n], dim=-1)
        y = kernels.ssm_step(ssm_state, x.reshape(b, h, p), dt, A,
                             B.reshape(b, g, n), C.reshape(b, g, n), self.D)   # [b, h, p]
        y = self.norm(y.reshape(b, self.inner), z)
        return self.out_proj(y)[:, None]                                       # [b, 1, hidden]


# ---------------------------------------------------------------------------------------------
# Attention (no positional encoding: Nemotron-H's attention is NoPE), grouped KV heads
# ---------------------------------------------------------------------------------------------
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

    def forward(self, hidden: torch.Tensor, ctx: _Pass) -> torch.Tensor:
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

    def _static_step(self, hidden: torch.Tensor, ctx: _Pass) -> torch.Tensor:
        """One token per row with shapes independent of the position (CUDA graphs): the cache stores the
        new key and value at ctx.pos (a device tensor) and attends the query over its keys up to there."""
        b = hidden.shape[0]
        q = self.q_proj(hidden).view(b, self.heads, self.head_dim)                        # [b, hq, d]
        k = self.k_proj(hidden).view(b, self.kv_heads, 1, self.head_dim)                  # [b, hk, 1, d]
        v = self.v_proj(hidden).view(b, self.kv_heads, 1, self.head_dim)
        k, v = self._kv(k, v)
        out = ctx.cache.decode_attend(self.layer_idx, q, k, v, ctx.pos)                   # [b, hq, d]
        return self.o_proj(out.reshape(b, 1, self.heads * self.head_dim))


# ---------------------------------------------------------------------------------------------
# MLP and MoE
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """down(relu(up(x))²): Nemotron-H's MLPs (and experts) have no gate projection."""

    def __init__(self, in_size: int, inner: int, bias: bool = False):
        super().__init__()
        self.up_proj = Linear(in_size, inner, bias=bias)
        self.down_proj = Linear(inner, in_size, bias=bias)

    def forward(self, x: torch.Tensor, ctx: _Pass | None = None) -> torch.Tensor:
        h = _input_linear(self.up_proj, x, ctx)
        if ctx is not None and ctx.fused and fp8.prequantize_ok(self.down_proj, h):
            # relu² and the FP8 quantization of down_proj's input in one launch
            rows = h.numel() // h.shape[-1]
            h_q = kernels.relu2_fp8(h.reshape(rows, h.shape[-1]), self.down_proj.input_scale, fp8.padded_rows(rows))
            down = self.down_proj
            return fp8.fp8_matmul_quantized(h_q, rows, h.shape[:-1], down.weight, down.weight_scale, down.input_scale,
                                            down.bias, h.dtype)
        return self.down_proj(relu2(h))


class Router(nn.Module):
    """Nemotron-3 routing: sigmoid scores; experts are *selected* on score + e_score_correction_bias,
    within the best `topk_group` of `n_group` groups (a group ranks by the sum of its two best
    biased scores), but *weighted* by the unbiased scores, optionally renormalised, then scaled."""

    fp32_params = ("e_score_correction_bias",)

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.experts, self.top_k = spec.n_routed_experts, spec.num_experts_per_tok
        self.n_group, self.topk_group = spec.n_group, spec.topk_group
        self.norm_topk_prob, self.scale = spec.norm_topk_prob, spec.routed_scaling_factor
        self.weight = _param(self.experts, spec.hidden_size)
        self.e_score_correction_bias = _param(self.experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] → (weights [T, k] float32, expert ids [T, k])."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))      # [T, E]
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            per_group = choice.view(-1, self.n_group, self.experts // self.n_group)          # [T, G, E/G]
            group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
            best = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.experts // self.n_group, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices                          # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids


class MoE(nn.Module):
    """Routed relu² experts (optionally in a smaller latent space) plus an always-on shared expert."""

    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.latent = spec.moe_latent_size
        expert_size = spec.expert_input_size
        self.gate = Router(spec)
        self.experts = nn.ModuleList(MLP(expert_size, spec.moe_intermediate_size)
                                     for _ in range(spec.n_routed_experts))
        self.shared_experts = MLP(spec.hidden_size, spec.moe_shared_expert_intermediate_size, bias=spec.mlp_bias)
        if self.latent:
            self.fc1_latent_proj = Linear(spec.hidden_size, self.latent, bias=spec.mlp_bias)
            self.fc2_latent_proj = Linear(self.latent, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, hidden: torch.Tensor, ctx: _Pass | None = None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])                                      # [T, hidden]
        weights, ids = self.gate(x)                                            # [T, k]
        expert_in = self.fc1_latent_proj(x) if self.latent else x              # [T, X]
        if ctx is not None and ctx.fused and ctx.decode and self.grouped_ok(expert_in):
            routed = self._routed_grouped(expert_in, weights, ids).to(hidden.dtype)
        else:
            routed = self._routed_loop(expert_in, weights, ids).to(hidden.dtype)
        if self.latent:
            routed = self.fc2_latent_proj(routed)                              # [T, hidden]
        return (routed + self.shared_experts(x)).reshape(shape)

    def _routed_loop(self, expert_in: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_k weight · expert(x) in float32, visiting each expert once with the tokens that chose it.
        Reads the per-expert token counts on the host (one sync)."""
        x = expert_in

        # Visit experts in order, each with the tokens that chose it; sum weighted outputs in fp32.
        k = ids.shape[1]
        flat = ids.reshape(-1)                                                 # [T·k]
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        weight_of = weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        routed = torch.zeros(x.shape[0], expert_in.shape[-1], dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token_of[start:start + count]
                out = self.experts[e](expert_in[rows]) * weight_of[start:start + count, None]
                routed.index_add_(0, rows, out.float())
                start += count
        return routed

    # ---- decode without a host sync (CUDA) ---------------------------------------------------
    def grouped_ok(self, expert_in: torch.Tensor) -> bool:
        """Whether the experts can run as table-indexed GEMVs: CUDA, unquantized, one dtype, no bias."""
        first = self.experts[0].up_proj
        return (expert_in.is_cuda and kernels.backend(expert_in) == "triton"
                and all(not m.up_proj.quantized and not m.down_proj.quantized and m.up_proj.bias is None
                        and m.down_proj.bias is None and m.up_proj.weight.dtype == expert_in.dtype
                        and m.down_proj.weight.dtype == expert_in.dtype for m in self.experts)
                and first.weight.is_contiguous())

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 tables of the experts' weight addresses (up, down), rebuilt when a weight moves."""
        key = tuple(m.up_proj.weight.data_ptr() for m in self.experts) + \
            tuple(m.down_proj.weight.data_ptr() for m in self.experts)
        cached = self.__dict__.get("_expert_tables")
        if cached is None or cached[0] != key:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("expert tables must be built before CUDA graph capture")
            for m in self.experts:
                if not (m.up_proj.weight.is_contiguous() and m.down_proj.weight.is_contiguous()):
                    raise RuntimeError("expert weights must be contiguous")
            device = self.experts[0].up_proj.weight.device
            e = len(self.experts)
            table = torch.tensor(key, dtype=torch.int64, device=device)
            cached = (key, table[:e], table[e:])
            self.__dict__["_expert_tables"] = cached
        return cached[1], cached[2]

    def _routed_grouped(self, expert_in: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum with one GEMV per (token, chosen expert), weights found by address: no sync."""
        up, down = self._tables()
        fused = kernels.triton_kernels().fused
        t, k = ids.shape
        inner, width = self.experts[0].up_proj.weight.shape                    # [I, X]
        h = fused.expert_gemv(expert_in, ids, up, inner, width, per_pair_input=False)    # [T·k, I] relu²(up)
        out = fused.expert_gemv(h, ids, down, width, inner, per_pair_input=True)         # [T·k, X]
        return (out.view(t, k, width).float() * weights[..., None]).sum(1)    # [T, X] float32


_MIXERS = {MAMBA: MambaMixer, ATTENTION: Attention, MOE: MoE}


class Block(nn.Module):
    """Pre-norm residual block around one mixer."""

    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.code = spec.layer_codes[layer_idx]
        self.norm = RMSNorm(spec.hidden_size, spec.layer_norm_epsilon)
        if self.code == MLP_CODE:
            self.mixer = MLP(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        else:
            self.mixer = _MIXERS[self.code](spec, layer_idx)
        self.residual_in_fp32 = spec.residual_in_fp32

    def forward(self, hidden: torch.Tensor, ctx: _Pass) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        out = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), ctx)
        return residual + out


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embeddings = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm_f = RMSNorm(spec.hidden_size, spec.layer_norm_epsilon)


# ---------------------------------------------------------------------------------------------
# The language model
# ---------------------------------------------------------------------------------------------
class NemotronHLM(nn.Module):
    """Nemotron-H causal LM. Build it with `build_model` / `load_model` (nemoconv.model).

    On CUDA (with mamba-ssm's and our Triton kernels) decode steps have static shapes and are
    replayed from CUDA graphs (see `graphs`); set `model.cuda_graphs = False` (or the environment
    variable NEMOCONV_CUDA_GRAPHS=0) to run the same kernels eagerly.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.mlp_hidden_act != "relu2" or spec.mamba_hidden_act != "silu":
            raise NemoconvError(f"unsupported activations: mlp_hidden_act={spec.mlp_hidden_act!r}, "
                                f"mamba_hidden_act={spec.mamba_hidden_act!r} (expected relu2 and silu)")
        self.spec = spec
        self.backbone = Backbone(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size)
        # Multi-token-prediction heads (`mtp.*`) exist only to draft tokens for speculative decoding;
        # they never change the main model's logits, so they are not built (the loader skips them).
        self.cuda_graphs = os.environ.get("NEMOCONV_CUDA_GRAPHS", "1") != "0"

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    def new_cache(self, batch_size: int, max_length: int, ssm_dtype=None) -> HybridCache:
        """A preallocated cache for this model (SSM state dtype from the config, float32 by default)."""
        return HybridCache(self.spec, batch_size, max_length, self.device, self.dtype, ssm_dtype)

    # ---- shared pieces ---------------------------------------------------------------------
    def _run(self, input_ids: torch.Tensor, ctx: _Pass) -> torch.Tensor:
        hidden = self.backbone.embeddings(input_ids)                           # [b, s, hidden]
        layers = self.backbone.layers
        if not ctx.fused:
            for layer in layers:
                hidden = layer(hidden, ctx)
            return self.backbone.norm_f(hidden.to(self.dtype))
        # The same blocks, with each residual add fused into the next block's pre-norm (one launch).
        # Where the next mixer starts with an FP8 linear, the norm kernel also quantizes its input.
        residual = hidden.float() if self.spec.residual_in_fp32 else hidden
        lin = self._fp8_input(layers[0].mixer, residual, ctx)
        if lin is None:
            normed = kernels.rmsnorm(residual, layers[0].norm.weight, layers[0].norm.eps)
        else:
            normed, x_q = kernels.rmsnorm_fp8(residual, None, layers[0].norm.weight, layers[0].norm.eps,
                                              lin.input_scale, fp8.padded_rows(residual.numel() // residual.shape[-1]))
            ctx.prequant = (normed, x_q)
        for i, layer in enumerate(layers):
            out = layer.mixer(normed, ctx)
            last = i + 1 == len(layers)
            norm = self.backbone.norm_f if last else layers[i + 1].norm
            lin = None if last else self._fp8_input(layers[i + 1].mixer, out, ctx)
            if lin is None:
                residual, normed = kernels.add_rmsnorm(residual, out, norm.weight, norm.eps)
            else:
                residual, normed, x_q = kernels.rmsnorm_fp8(residual, out, norm.weight, norm.eps, lin.input_scale,
                                                            fp8.padded_rows(out.numel() // out.shape[-1]))
                ctx.prequant = (normed, x_q)
        return normed

    @staticmethod
    def _fp8_input(mixer: nn.Module, x: torch.Tensor, ctx: _Pass) -> Linear | None:
        """The FP8 linear a mixer applies first to its input, if the norm before it can quantize for it
        (MLP up_proj; Mamba in_proj unless padding must be masked first)."""
        if isinstance(mixer, MLP):
            lin = mixer.up_proj
        elif isinstance(mixer, MambaMixer) and ctx.pad_mask is None:
            lin = mixer.in_proj
        else:
            return None
        return lin if lin.weight.dtype == fp8.FP8_DTYPE and fp8.prequantize_ok(lin, x) else None

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @staticmethod
    def _pad_mask(attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.shape != shape:
            raise NemoconvError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(shape)}")
        mask = attention_mask.to(device).bool()
        return None if bool(mask.all()) else mask

    @staticmethod
    def _attention_mask(valid: torch.Tensor, start: int, s: int) -> torch.Tensor:
        """valid [b, t] (t = start + s) → [b, 1, s, t]: causal, and only real keys. A padded query also
        sees itself, so its (ignored) row never softmaxes over nothing and stays finite."""
        t = valid.shape[1]
        query_pos = torch.arange(start, start + s, device=valid.device)[:, None]   # [s, 1]
        key_pos = torch.arange(t, device=valid.device)[None, :]                    # [1, t]
        causal = key_pos <= query_pos                                              # [s, t]
        return (causal & (valid[:, None, :] | (key_pos == query_pos)))[:, None]     # [b, 1, s, t]

    # ---- CUDA fast path --------------------------------------------------------------------
    def _triton(self) -> bool:
        return self.device.type == "cuda" and kernels.backend(self.backbone.embeddings.weight) == "triton"

    def _hooked(self) -> bool:
        """Any forward hook, global or on a module: then modules must run one by one, as written."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _fused_ok(self) -> bool:
        return self._triton() and not self._hooked()

    def _static_ok(self) -> bool:
        """Decode with static shapes (its position a device tensor): CUDA with the Triton kernels."""
        d = self.spec.head_dim
        return self._triton() and (ATTENTION not in self.spec.layer_codes or (d >= 16 and d & (d - 1) == 0))

    def _graph_signature(self, fused: bool) -> tuple | None:
        """The model state a decode graph depends on (every parameter's and buffer's address), or None
        where graphs are off or cannot hold the step (hooks, FP8 or odd experts)."""
        if not (self.cuda_graphs and fused):
            return None
        probe = self.backbone.embeddings.weight
        if any(isinstance(layer.mixer, MoE) and not layer.mixer.grouped_ok(probe) for layer in self.backbone.layers):
            return None
        return tuple(t.data_ptr() for t in self.parameters()) + tuple(t.data_ptr() for t in self.buffers())

    def _graph_pool(self):
        pool = self.__dict__.get("_pool")
        if pool is None:
            pool = self.__dict__["_pool"] = torch.cuda.graph_pool_handle()
        return pool

    def _static_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: HybridCache, fused: bool) -> torch.Tensor:
        """One decode step whose launches do not depend on the position (tokens [b, 1], pos [1] on the device)."""
        ctx = _Pass(cache=cache, start=cache.seq_len, pad_mask=None, attn_mask=None, causal=False, decode=True,
                    pos=pos, fused=fused)
        return self._logits(self._run(tokens, ctx)[:, 0])

    def _decode(self, tokens: torch.Tensor, cache: HybridCache, plan: tuple | None = None):
        """decode_step without the copy: → (logits, whether logits is a graph's static output buffer).
        plan = (fused, graph signature) when the caller has checked them already (generate)."""
        tokens = tokens.to(self.device).reshape(-1, 1)
        if tokens.shape[0] != cache.batch_size:
            raise NemoconvError(f"{tokens.shape[0]} tokens but the cache was made for {cache.batch_size} rows")
        start = cache.reserve(1)
        if self._static_ok():
            if plan is None:
                fused = self._fused_ok()
                plan = (fused, self._graph_signature(fused))
            fused, signature = plan
            decoder = cache.static_decoder()
            decoder.load(tokens, start)
            logits, static = decoder.step(lambda t, p: self._static_step(t, p, cache, fused), signature,
                                          self._graph_pool() if signature is not None else None)
        else:
            # A single query sees every earlier key: a mask is needed only to hide left padding.
            attn = cache.valid[:, None, None, :start + 1] if cache.has_padding else None
            ctx = _Pass(cache=cache, start=start, pad_mask=None, attn_mask=attn, causal=False, decode=True)
            logits, static = self._logits(self._run(tokens, ctx)[:, 0]), False
        cache.advance(1)
        return logits, static

    def _generation_cache(self, batch_size: int, length: int) -> HybridCache:
        """A reset cache for generate, kept between calls (with its decode graph) per batch size; its
        length is rounded up to a multiple of 256 so that nearby lengths share it. At most two kept."""
        caches = self.__dict__.setdefault("_generation_caches", {})
        cache = caches.pop(batch_size, None)
        if cache is None or cache.max_length < length or cache.device != self.device or cache.dtype != self.dtype:
            cache = None
            while len(caches) >= 2:
                caches.pop(next(iter(caches)))
            cache = self.new_cache(batch_size, -(-length // 256) * 256)
        else:
            cache.reset()
        caches[batch_size] = cache
        return cache

    # ---- public API ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequences, no cache: input_ids [b, s] (left padding marked by attention_mask) → logits
        [b, s, vocab] float32."""
        input_ids = input_ids.to(self.device)
        b, s = input_ids.shape
        pad = self._pad_mask(attention_mask, input_ids.shape, input_ids.device)
        attn = self._attention_mask(pad, 0, s) if pad is not None else None
        ctx = _Pass(cache=None, start=0, pad_mask=pad, attn_mask=attn, causal=pad is None, decode=False,
                    fused=self._fused_ok())
        return self._logits(self._run(input_ids, ctx))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: HybridCache, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Consume input_ids [b, s] into `cache` (may be called repeatedly: chunked prefill).

        attention_mask [b, s] covers these s tokens only (0 = left padding). Returns logits
        [b, s, vocab], or [b, vocab] for the last position with last_only.
        """
        input_ids = input_ids.to(self.device)
        b, s = input_ids.shape
        if b != cache.batch_size:
            raise NemoconvError(f"batch of {b} rows but the cache was made for {cache.batch_size}")
        pad = self._pad_mask(attention_mask, input_ids.shape, input_ids.device)
        start = cache.reserve(s, pad)
        causal = start == 0 and not cache.has_padding
        fused = self._fused_ok()

        def run(tokens: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
            # The mask is built here from cache.valid, so that a captured graph rebuilds it at each replay.
            attn = None if causal else self._attention_mask(cache.valid[:, :start + s], start, s)
            ctx = _Pass(cache=cache, start=start, pad_mask=pad_mask, attn_mask=attn, causal=causal, decode=False,
                        fused=fused)
            hidden = self._run(tokens, ctx)
            return self._logits(hidden[:, -1] if last_only else hidden)

        key = self._prefill_graph_key(input_ids, pad, cache, start, causal, last_only, fused)
        if key is None:
            logits = run(input_ids, pad)
        else:
            graphs = cache.__dict__.get("_prefill_graphs")
            if graphs is None:
                from nemoconv.model.cuda.graphs import GraphCache

                graphs = cache.__dict__["_prefill_graphs"] = GraphCache()
            logits, static = graphs.run(key, run, input_ids, pad)
            if static:
                logits = logits.clone()
        cache.advance(s)
        return logits

    def _prefill_graph_key(self, input_ids, pad, cache: HybridCache, start: int, causal: bool, last_only: bool,
                           fused: bool) -> tuple | None:
        """What a prefill's CUDA graph depends on, or None where it must run eagerly (see
        `_prefill_graph_signature`; also: the full logits asked for, whose buffer would be large, or a
        cache whose storage is not known to stay in place)."""
        signature = self._prefill_graph_signature(input_ids, fused) if last_only else None
        storage = tuple(getattr(cache, name, None) for name in ("kv", "conv", "ssm", "valid"))
        if signature is None or any(not isinstance(t, torch.Tensor) for t in storage):
            return None
        return (tuple(input_ids.shape), input_ids.dtype, start, causal, pad is not None,
                tuple(t.data_ptr() for t in storage), signature)

    def _prefill_graph_signature(self, input_ids, fused: bool) -> tuple | None:
        """The model state a prefill's CUDA graph depends on (`_graph_signature`), or None where prefills
        run eagerly: graphs off, hooks, too many tokens, MoE layers (their routing reads expert counts
        on the host)."""
        if not self._static_ok() or input_ids.numel() > PREFILL_GRAPH_MAX_TOKENS:
            return None
        if any(layer.code == MOE for layer in self.backbone.layers):
            return None
        return self._graph_signature(fused)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One new token per row (tokens [b] or [b, 1]) from the cache → logits [b, vocab] fp32."""
        logits, static = self._decode(tokens, cache)
        return logits.clone() if static else logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Cache-driven generation → [b, s + max_new_tokens].

        Greedy when temperature == 0, else sampling from softmax(logits / temperature), restricted to
        the top_k tokens if given. Rows that produced an EOS token continue with pad_token_id
        (default: the first EOS id).
        """
        input_ids = input_ids.to(self.device)
        b, s = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_t = torch.tensor(eos, device=self.device, dtype=input_ids.dtype)
        out = torch.full((b, s + max_new_tokens), pad_id, dtype=input_ids.dtype, device=self.device)
        out[:, :s] = input_ids
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)

        static = self._static_ok()
        plan = None
        if static:
            # On CUDA: no host sync per step. The cache (and its decode graph) is reused across calls,
            # and whether every row has finished is read only every 8 steps (the extra steps emit padding).
            cache = self._generation_cache(b, s + max_new_tokens)
            fused = self._fused_ok()
            plan = (fused, self._graph_signature(fused))
        else:
            cache = self.new_cache(b, s + max_new_tokens)
        logits = self.prefill(input_ids, cache, attention_mask, last_only=True)        # [b, vocab]
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            token = self._pick(logits, temperature, top_k, generator)                   # [b]
            if eos:
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                finished |= torch.isin(token, eos_t)
            out[:, s + i] = token
            if i + 1 == max_new_tokens or (eos and (not static or i % 8 == 7) and bool(finished.all())):
                break
            logits = self._decode(token, cache, plan)[0]
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        if not temperature or temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
