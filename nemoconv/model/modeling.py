"""The built-in Nemotron-H hybrid model (docs/DESIGN.md §5): Mamba-2, NoPE GQA attention, relu² MLP and MoE layers.

Module names mirror the canonical HF tensor names (`backbone.layers.{i}.mixer.in_proj.weight`, …), so
loading is a lookup. The layers live beside this file (`mamba`, `attention`, `mlp`, the shared pieces in
`common`); each reads top to bottom: projections, mixing, output. Sequence operations go through
`cuda.kernels` (Triton on CUDA, torch reference elsewhere); the model never branches on device: where a
pass may take a faster path (fused norms, static-shape decode, CUDA graphs) it asks its `runner`
(`cuda.runner`), which the serving engine uses too.

Three ways to run it:
  model(input_ids, attention_mask)            whole sequence, no cache → logits [b, s, vocab] (float32)
  model.prefill(input_ids, cache, mask)       consumes tokens into a HybridCache → logits
  model.decode_step(tokens, cache)            one token per row from the cache → logits [b, vocab]
`generate` drives the last two. Padding is on the left: padded positions feed zeros into the Mamba
conv and scan (so they leave the recurrent state untouched) and are never attended to.
"""

from __future__ import annotations

import torch
from torch import nn

from nemoconv import settings
from nemoconv.errors import NemoconvError
from nemoconv.model.attention import Attention
from nemoconv.model.cache import HybridCache
from nemoconv.model.common import Embedding, Pass, RMSNorm, causal_mask
from nemoconv.model.cuda.runner import Runner
from nemoconv.model.fp8 import Linear
from nemoconv.model.mamba import MambaMixer
from nemoconv.model.mlp import MLP, MoE
from nemoconv.storage.config import ATTENTION, MAMBA, MOE, ModelSpec
from nemoconv.storage.config import MLP as MLP_CODE

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

    def forward(self, hidden: torch.Tensor, ctx: Pass) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        out = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), ctx)
        return residual + out


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embeddings = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm_f = RMSNorm(spec.hidden_size, spec.layer_norm_epsilon)


class NemotronHLM(nn.Module):
    """Nemotron-H causal LM. Build it with `build_model` / `load_model` (nemoconv.model).

    On CUDA (with mamba-ssm's and our Triton kernels) decode steps have static shapes and are
    replayed from CUDA graphs (see `cuda.graphs`); set `model.cuda_graphs = False` (or the environment
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
        self.cuda_graphs = settings.current().cuda_graphs
        self.runner = Runner(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    def new_cache(self, batch_size: int, max_length: int, ssm_dtype=None) -> HybridCache:
        """A preallocated cache for this model (SSM state dtype from the config, float32 by default)."""
        return HybridCache(self.spec, batch_size, max_length, self.device, self.dtype, ssm_dtype)

    # ---- one pass --------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, ctx: Pass) -> torch.Tensor:
        """input_ids [b, s] through every block and the final norm → hidden [b, s, hidden]."""
        if ctx.fused:
            return self.runner.fused_hidden(input_ids, ctx)     # the same blocks, adds fused into norms (CUDA)
        hidden = self.backbone.embeddings(input_ids)                           # [b, s, hidden]
        for layer in self.backbone.layers:
            hidden = layer(hidden, ctx)
        return self.backbone.norm_f(hidden.to(self.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] → logits [..., vocab] float32."""
        return self.lm_head(hidden).float()

    @staticmethod
    def _pad_mask(attention_mask: torch.Tensor | None, shape, device) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if attention_mask.shape != shape:
            raise NemoconvError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(shape)}")
        mask = attention_mask.to(device).bool()
        return None if bool(mask.all()) else mask

    # ---- public API ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Whole sequences, no cache: input_ids [b, s] (left padding marked by attention_mask) → logits
        [b, s, vocab] float32."""
        input_ids = input_ids.to(self.device)
        b, s = input_ids.shape
        pad = self._pad_mask(attention_mask, input_ids.shape, input_ids.device)
        attn = causal_mask(pad, 0, s) if pad is not None else None
        ctx = Pass(cache=None, start=0, pad_mask=pad, attn_mask=attn, causal=pad is None, decode=False,
                   fused=self.runner.fused_ok())
        return self.logits(self.run(input_ids, ctx))

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
        fused = self.runner.fused_ok()

        def run(tokens: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
            # The mask is built here from cache.valid, so that a captured graph rebuilds it at each replay.
            attn = None if causal else causal_mask(cache.valid[:, :start + s], start, s)
            ctx = Pass(cache=cache, start=start, pad_mask=pad_mask, attn_mask=attn, causal=causal, decode=False,
                       fused=fused)
            hidden = self.run(tokens, ctx)
            return self.logits(hidden[:, -1] if last_only else hidden)

        logits = self.runner.graphed_prefill(run, input_ids, pad, cache, start, causal, last_only, fused)
        cache.advance(s)
        return logits

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One new token per row (tokens [b] or [b, 1]) from the cache → logits [b, vocab] fp32."""
        logits, static = self._decode(tokens, cache)
        return logits.clone() if static else logits

    def _decode(self, tokens: torch.Tensor, cache: HybridCache, plan: tuple | None = None):
        """decode_step without the copy: → (logits, whether logits is a graph's static output buffer).
        plan = (fused, graph signature) when the caller has checked them already (generate)."""
        tokens = tokens.to(self.device).reshape(-1, 1)
        if tokens.shape[0] != cache.batch_size:
            raise NemoconvError(f"{tokens.shape[0]} tokens but the cache was made for {cache.batch_size} rows")
        start = cache.reserve(1)
        if self.runner.static_ok():
            logits, static = self.runner.static_decode(tokens, cache, start, plan)
        else:
            # A single query sees every earlier key: a mask is needed only to hide left padding.
            attn = cache.valid[:, None, None, :start + 1] if cache.has_padding else None
            ctx = Pass(cache=cache, start=start, pad_mask=None, attn_mask=attn, causal=False, decode=True)
            logits, static = self.logits(self.run(tokens, ctx)[:, 0]), False
        cache.advance(1)
        return logits, static

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

        static = self.runner.static_ok()
        plan = None
        if static:
            # On CUDA: no host sync per step. The cache (and its decode graph) is reused across calls,
            # and whether every row has finished is read only every 8 steps (the extra steps emit padding).
            cache = self.runner.generation_cache(b, s + max_new_tokens)
            plan = self.runner.decode_plan()
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
