"""MLP and mixture-of-experts layers of the built-in model: relu² MLPs without a gate projection, and routed
relu² experts (sigmoid router with a selection bias, group-limited top-k) beside an always-on shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemoconv.model import fp8
from nemoconv.model.common import Pass, input_linear, param, relu2
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import Linear
from nemoconv.storage.config import ModelSpec


class MLP(nn.Module):
    """down(relu(up(x))²): Nemotron-H's MLPs (and experts) have no gate projection."""

    def __init__(self, in_size: int, inner: int, bias: bool = False):
        super().__init__()
        self.up_proj = Linear(in_size, inner, bias=bias)
        self.down_proj = Linear(inner, in_size, bias=bias)

    def forward(self, x: torch.Tensor, ctx: Pass | None = None) -> torch.Tensor:
        if ctx is not None and ctx.fused:
            out = self._skinny(x, ctx)
            if out is None:
                out = self._gemm(x)
            if out is not None:
                return out
        h = input_linear(self.up_proj, x, ctx)
        if ctx is not None and ctx.fused and fp8.prequantize_ok(self.down_proj, h):
            # relu² and the FP8 quantization of down_proj's input in one launch
            rows = h.numel() // h.shape[-1]
            h_q = kernels.relu2_fp8(h.reshape(rows, h.shape[-1]), self.down_proj.input_scale, fp8.padded_rows(rows))
            down = self.down_proj
            return fp8.fp8_matmul_quantized(h_q, rows, h.shape[:-1], down.weight, down.weight_scale, down.input_scale,
                                            down.bias, h.dtype)
        return self.down_proj(relu2(h))

    def _gemm(self, x: torch.Tensor) -> torch.Tensor | None:
        """A prefill's rows on Hopper as our GEMM with relu² in up_proj's epilogue (no [rows, inner] relu² pass),
        then down_proj → the MLP's output, or None where it does not apply (FP8 or biased linears, `gemm_ok`).
        Fused pass only, as `_skinny`."""
        up, down = self.up_proj, self.down_proj
        if up.quantized or down.quantized or up.bias is not None or not kernels.gemm_ok(x, up.weight):
            return None
        return down(kernels.gemm(x, up.weight, relu2=True))

    def _skinny(self, x: torch.Tensor, ctx: Pass) -> torch.Tensor | None:
        """A decode step's few rows on CUDA as two skinny launches with relu² in up_proj's epilogue (instead of three
        launches, and no relu² rows in memory) → the MLP's output, or None where they do not apply. Both weights in
        the model dtype; or both FP8 with up_proj's input already quantized by the norm before it (`ctx.prequant`),
        where the epilogue also quantizes relu²'s result for down_proj. Only on the fused pass, which no forward
        hook anywhere allows (`runner.fused_ok`): a hook never misses a linear skipped here."""
        up, down = self.up_proj, self.down_proj
        if not (kernels.skinny_ok(x, up.weight) and kernels.skinny_weight_ok(down.weight, up.out_features)):
            return None
        if up.weight.dtype == down.weight.dtype == x.dtype:
            h = kernels.skinny_linear(x, up.weight, up.bias, relu2=True)
            return kernels.skinny_linear(h, down.weight, down.bias)
        pre = ctx.prequant
        if not (up.quantized and pre is not None and pre[0] is x and fp8.prequantize_ok(down, x)):   # down FP8 too
            return None
        rows = x.numel() // x.shape[-1]
        h_q = kernels.skinny_linear(pre[1][:rows], up.weight, up.bias, scales=(up.input_scale, up.weight_scale),
                                    relu2=True, quant_scale=down.input_scale, out_dtype=x.dtype)
        y = kernels.skinny_linear(h_q, down.weight, down.bias, scales=(down.input_scale, down.weight_scale),
                                  out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], down.out_features)


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
        self.weight = param(self.experts, spec.hidden_size)
        self.e_score_correction_bias = param(self.experts)

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
        # (weight addresses, up table, down table) of the grouped decode path; built on first use (`_tables`)
        self.expert_tables: tuple | None = None

    def forward(self, hidden: torch.Tensor, ctx: Pass | None = None) -> torch.Tensor:
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
        cached = self.expert_tables
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
            self.expert_tables = cached
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
