"""One layer of a checkpoint at a time: the pieces a layer-streaming runner (or a calibration pass) builds.

A checkpoint splits into pieces: layer i (`backbone.layers.{i}.*`) and the ends (embeddings, final norm,
lm_head). Each piece is built by `loading.build_model` itself, as a small model of the same config:
  layer i   a one-layer model (layer_codes = the i-th code) whose only block is the layer, renamed 0; the
            embedding and final norm it also needs are a 1-token dummy (vocab 1, tied head: a few bytes);
  ends      a model with no layers: embeddings, norm_f, lm_head.
So a streamed layer gets exactly the parameters, dtypes, FP8 scales and KV-cache scales the whole model
gives it (the same function decides them), and its blocks run the same modules on the same values.
A layer's mixer has layer_idx 0, which is its slot in its own one-layer `HybridCache` (`layer_cache`).

The run functions mirror `NemotronHLM`'s unfused path op for op (the CPU path, and CUDA without the fused
residual+norm launches), so on the CPU a streamed run computes bit-identical logits:
  layer_forward   whole sequence, no cache          (model(ids))
  layer_prefill   consumes a sequence into a cache  (model.prefill on an empty cache)
  layer_decode    one token per row from the cache  (model.decode_step)
  embed / head_logits   the ends.
Left padding is not supported here (verify's prompts all have one length).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.model.cache import HybridCache
from nemoconv.model.common import Pass, causal_mask
from nemoconv.model.loading import build_model, canonical_name
from nemoconv.model.modeling import Block, NemotronHLM
from nemoconv.storage.config import ModelSpec
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.stream.pipeline import Item, Journal, to_hf

ENDS = "ends"   # the piece key of embeddings + norm_f + lm_head
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_ENDS = ("backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight")


# ---- which tensors make a piece ------------------------------------------------------------------


def piece_names(ck: Checkpoint) -> dict[object, list[str]]:
    """Source tensor names (as stored) by piece: layer index, or ENDS. MTP heads belong to none (not run)."""
    scheme = ck.scheme_rules
    index: dict[object, list[str]] = {}
    for name in ck.tensor_names():
        hf = canonical_name(scheme.to_hf(scheme.normalize(name), ck.spec) or "")
        m = _LAYER.match(hf)
        key = int(m.group(1)) if m else (ENDS if hf in _ENDS else None)
        if key is not None:
            index.setdefault(key, []).append(name)
    return index


def piece_bytes(ck: Checkpoint, names: list[str], dtype: torch.dtype) -> int:
    """Bytes the piece holds once built in `dtype` (FP8 weights stay one byte, small fp32 params ignored)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in names:
        e = ck.entries[name]
        fp8 = e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        total += e.nbytes if fp8 or not e.dtype.is_floating_point else e.nbytes // e.dtype.itemsize * size
    return total


def read_piece(ck: Checkpoint, names: list[str], reader: TensorReader) -> list[tuple[str, torch.Tensor]]:
    """The named source tensors as (HF name, tensor): renamed, split, unstacked by the scheme's rules, as
    `load_model`'s stream does. (A manifest's restoring casts are left out: they are exact by construction,
    so the values the model gets are the same.)"""
    scheme = ck.scheme_rules
    items = (Item(scheme.normalize(n), ck.entries[n].meta(), (n,), entry=ck.entries[n], reader=reader)
             for n in names)
    return [(it.name, it.data()) for it in to_hf(items, scheme, ck.spec, {}, Journal())]


# ---- building a piece ----------------------------------------------------------------------------


def layer_spec(spec: ModelSpec, i: int) -> ModelSpec:
    """The config of a one-layer model holding layer i (its own cache's spec too)."""
    return replace(spec, layer_codes=spec.layer_codes[i], vocab_size=1, tie_word_embeddings=True)


def build_layer(spec: ModelSpec, i: int, tensors: list[tuple[str, torch.Tensor]], device, dtype) -> Block:
    """Layer i of the network on `device`, from its HF-named tensors, built by `build_model`."""
    prefix, own = f"backbone.layers.{i}.", "backbone.layers.0."
    dtype_t = torch.float32 if dtype is None else dtype
    dummy = [("backbone.embeddings.weight", torch.zeros(1, spec.hidden_size, dtype=dtype_t)),
             ("backbone.norm_f.weight", torch.ones(spec.hidden_size, dtype=dtype_t))]
    renamed = []
    for name, t in tensors:
        name = canonical_name(name)
        if not name.startswith(prefix):
            raise NemoconvError(f"internal error: {name} is not a tensor of layer {i}")
        renamed.append((own + name[len(prefix):], t))
    try:
        model = build_model(layer_spec(spec, i), renamed + dummy, device=device, dtype=dtype)
    except NemoconvError as exc:
        raise NemoconvError(str(exc).replace(own, prefix)) from None
    return model.backbone.layers[0]


def build_ends(spec: ModelSpec, tensors: list[tuple[str, torch.Tensor]], device, dtype) -> NemotronHLM:
    """Embeddings, final norm and lm_head (tied or not) as a model with no layers."""
    return build_model(replace(spec, layer_codes=""), tensors, device=device, dtype=dtype)


def release(module: nn.Module) -> None:
    """Free a piece's memory now, even if a reference to the module lingers."""
    module.to_empty(device="meta")


def module_bytes(module: nn.Module) -> int:
    """Bytes of a piece's parameters and buffers (a tied weight counted once)."""
    seen = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


# ---- running a piece -----------------------------------------------------------------------------


def layer_cache(spec: ModelSpec, i: int, batch: int, max_length: int, device, dtype: torch.dtype) -> HybridCache:
    """The decoding state of layer i alone (KV for attention, conv+SSM for Mamba, nothing for MLP/MoE)."""
    return HybridCache(layer_spec(spec, i), batch, max_length, device, dtype)


def cache_bytes(cache: HybridCache) -> int:
    return cache.memory_bytes()["total"]


def move_cache(cache: HybridCache, device) -> HybridCache:
    """The same cache with its storage on `device` (a spill to host memory and back)."""
    device = torch.device(device)
    if cache.device != device:
        for name in ("kv", "conv", "ssm", "valid"):
            setattr(cache, name, getattr(cache, name).to(device))
        cache.device = device
    return cache


def layer_forward(block: Block, hidden: torch.Tensor) -> torch.Tensor:
    """Whole sequences without a cache: hidden [b, s, h] → [b, s, h]."""
    return block(hidden, Pass(cache=None, start=0, pad_mask=None, attn_mask=None, causal=True, decode=False))


def layer_prefill(block: Block, hidden: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """Consume hidden [b, s, h] into the layer's cache (first call on an empty cache, or chunks after)."""
    s = hidden.shape[1]
    start = cache.reserve(s)
    ctx = Pass(cache=cache, start=start, pad_mask=None, causal=start == 0,
                attn_mask=None if start == 0 else causal_mask(cache.valid[:, :start + s], start, s),
                decode=False)
    out = block(hidden, ctx)
    cache.advance(s)
    return out


def layer_decode(block: Block, hidden: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """One token per row: hidden [b, 1, h] → [b, 1, h], the cache advanced by one position."""
    start = cache.reserve(1)
    out = block(hidden, Pass(cache=cache, start=start, pad_mask=None, attn_mask=None, causal=False, decode=True))
    cache.advance(1)
    return out


def embed(ends: NemotronHLM, ids: torch.Tensor) -> torch.Tensor:
    return ends.backbone.embeddings(ids.to(ends.device))


def head_logits(ends: NemotronHLM, hidden: torch.Tensor, last: str | None = None) -> torch.Tensor:
    """Final norm and lm_head → float32 logits. last="position": only the last position ([b, V], after a
    prefill); last="step": a decode step's single position ([b, V]); None: every position ([b, s, V])."""
    normed = ends.backbone.norm_f(hidden.to(ends.dtype))
    if last == "position":
        normed = normed[:, -1]
    elif last == "step":
        normed = normed[:, 0]
    return ends.lm_head(normed).float()
