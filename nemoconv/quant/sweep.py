"""Compare FP8 variants of a network with the unquantized one, layer by layer (quantize --analyze, --max-kl).

A *variant* is a set of linears (HF module names) in FP8; all others keep their source weights. For a
batch of token ids we want every variant's final logits against the reference's (KL(ref‖variant), top-1
agreement), without ever holding more than one layer's weights:

    reference hidden  ──layer i──▶ reference hidden          (one stream)
    variant v         ──layer i, with v's layer-i linears FP8──▶ v's hidden
A variant shares the reference stream until its first FP8 layer, where it forks (its stream starts as
the reference's input to that layer). So each layer is read once and run once per live stream; after
the last layer the final norm and the output head turn every stream into logits, chunk by chunk.

Memory: (1 + live streams) × tokens hidden states, plus one layer. Callers bound it with `max_streams`
(variants beyond it are swept again in further passes, re-reading the layers): with
tokens × (1 + max_streams) ≤ the calibration's tokens, a sweep needs no more memory than calibration.
Cost: each variant costs (layers after its first FP8 layer) layer forwards on these tokens.

FP8 here is exactly what quantize writes (quant.fp8.quantize_weight on the stored weight, input_scale =
calibrated amax / 448), computed by the model's own FP8 linear (exact float32 emulation on CPU,
torch._scaled_mm on CUDA where the shapes allow), so the code is device-agnostic.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.quant import fp8
from nemoconv.quant.calibrate import _LAYER, TOKENS_PER_BATCH, _build_block, _layer_context, _read_hf, _source_index
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.verification.metrics import LogitStats


@dataclass(frozen=True)
class Variant:
    name: str
    quantized: frozenset[str]   # HF module names in FP8


def layer_of(module: str) -> int:
    m = _LAYER.match(module)
    if m is None:
        raise NemoconvError(f"internal error: {module!r} is not in a main layer")
    return int(m.group(1))


def weight_sqnr_db(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """10·log10(‖W‖² / ‖W − dequant(q)‖²): the FP8 weight's signal-to-quantization-noise ratio."""
    w = w.double()
    noise = float(((q.double() * float(scale)) - w).pow(2).sum())
    signal = float(w.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def compare_variants(ck: Checkpoint, ids: torch.Tensor, variants: list[Variant], input_amax: dict[str, float],
                     device: torch.device, dtype: torch.dtype, max_streams: int = 64, progress=None,
                     sqnr: dict[str, float] | None = None) -> dict[str, LogitStats]:
    """Each variant's logits on `ids` [n, s] against the unquantized network's (name → LogitStats).
    `sqnr`, when given, receives every FP8 weight's SQNR in dB."""
    if any(not v.quantized for v in variants):
        raise ValueError("a variant needs at least one FP8 linear")
    results: dict[str, LogitStats] = {}
    step = max(1, max_streams)
    passes = [variants[k:k + step] for k in range(0, len(variants), step)]
    for n, batch in enumerate(passes):
        results.update(_sweep(ck, ids, batch, input_amax, device, dtype, sqnr,
                              (lambda d, t, n=n: progress(n * t + d, len(passes) * t)) if progress else None))
    return results


def _sweep(ck: Checkpoint, ids: torch.Tensor, variants: list[Variant], input_amax: dict[str, float],
           device: torch.device, dtype: torch.dtype, sqnr: dict | None, progress) -> dict[str, LogitStats]:
    spec = ck.spec
    first = {v.name: min(layer_of(m) for m in v.quantized) for v in variants}
    wanted = {m for v in variants for m in v.quantized}
    index = _source_index(ck)
    rows = max(1, TOKENS_PER_BATCH.get(device.type, 2048) // ids.shape[1])
    ctx = _layer_context()
    layers = len(spec.layer_codes)
    with TensorReader() as reader, torch.no_grad():
        embed = dict(_read_hf(ck, index.get("embed", []), reader))["backbone.embeddings.weight"]
        embed = embed.to(device=device, dtype=dtype)
        ref = [F.embedding(chunk.to(device), embed) for chunk in ids.split(rows)]
        del embed
        streams: dict[str, list[torch.Tensor]] = {}
        for i in range(layers):
            tensors = _read_hf(ck, index.get(i, []), reader)
            fp8_here = _fp8_weights(tensors, {m for m in wanted if layer_of(m) == i}, input_amax, device, sqnr)
            block = _build_block(spec, i, tensors, device, dtype)
            del tensors
            nxt = {}
            plain = []   # streams with no FP8 linear in this layer: run together, in large batches
            for v in variants:
                if first[v.name] > i:
                    continue
                mine = {m: fp8_here[m] for m in v.quantized if m in fp8_here}
                if not mine:
                    plain.append(v.name)
                    continue
                with _swapped(block, i, mine):
                    nxt[v.name] = [block(h, ctx) for h in streams.get(v.name, ref)]
            groups = [ref] + [streams[name] for name in plain]
            outs = _batched(block, ctx, groups, rows)
            ref = outs[0]
            nxt.update(zip(plain, outs[1:]))
            streams = nxt
            block.to_empty(device="meta")
            del block
            if progress:
                progress(i + 1, layers + 1)
        norm_w, head_w = _final_weights(ck, reader, device, dtype)
        results = {v.name: LogitStats() for v in variants}
        for k, h in enumerate(ref):
            ref_logits = _logits(h, norm_w, head_w, spec.layer_norm_epsilon)
            for v in variants:
                results[v.name].add(ref_logits, _logits(streams[v.name][k], norm_w, head_w, spec.layer_norm_epsilon))
        if progress:
            progress(layers + 1, layers + 1)
    return results


def _batched(block: nn.Module, ctx, groups: list[list[torch.Tensor]], rows: int) -> list[list[torch.Tensor]]:
    """block(h) for every chunk of every group, running up to `rows` rows per call (a layer's cost is
    mostly per call on small probes), split back into the same groups and chunks."""
    chunks = [h for g in groups for h in g]
    outs: list[torch.Tensor] = []
    k = 0
    while k < len(chunks):
        batch = [chunks[k]]
        while k + len(batch) < len(chunks) and sum(c.shape[0] for c in batch) + chunks[k + len(batch)].shape[0] <= rows:
            batch.append(chunks[k + len(batch)])
        out = block(torch.cat(batch) if len(batch) > 1 else batch[0], ctx)
        outs += list(out.split([c.shape[0] for c in batch]))
        k += len(batch)
    result, k = [], 0
    for g in groups:
        result.append(outs[k:k + len(g)])
        k += len(g)
    return result


def _fp8_weights(tensors, modules: set[str], input_amax: dict[str, float], device, sqnr: dict | None) -> dict:
    """HF module → (fp8 weight, weight_scale, input_scale) on the device, from the stored weight."""
    weights = dict(tensors)
    out = {}
    for m in modules:
        w = weights[f"{m}.weight"]
        q, weight_scale, _ = fp8.quantize_weight(w, f"weight {m}")
        input_scale = fp8.scale_from_amax(input_amax[m])
        if sqnr is not None:
            sqnr[m] = weight_sqnr_db(w, q, weight_scale)
        out[m] = (q.to(device), weight_scale.to(device), input_scale.to(device))
    return out


@contextlib.contextmanager
def _swapped(block: nn.Module, i: int, fp8_weights: dict):
    """The block with the given linears in FP8, restored afterwards."""
    prefix = f"backbone.layers.{i}."
    saved = []
    for m, (q, weight_scale, input_scale) in fp8_weights.items():
        lin = block.get_submodule(m[len(prefix):])
        saved.append((lin, lin.weight, lin.weight_scale, lin.input_scale))
        lin.weight = nn.Parameter(q, requires_grad=False)
        lin.weight_scale, lin.input_scale = weight_scale, input_scale
    try:
        yield block
    finally:
        for lin, w, ws, xs in saved:
            lin.weight, lin.weight_scale, lin.input_scale = w, ws, xs


def _final_weights(ck: Checkpoint, reader: TensorReader, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """backbone.norm_f.weight and lm_head.weight (the embedding when tied), in the compute dtype."""
    scheme = ck.scheme_rules
    want = {"backbone.norm_f.weight", "lm_head.weight", "backbone.embeddings.weight"}
    names = [n for n in ck.tensor_names() if scheme.to_hf(scheme.normalize(n)) in want]
    found = dict(_read_hf(ck, names, reader))
    head = found["backbone.embeddings.weight"] if ck.spec.tie_word_embeddings or "lm_head.weight" not in found \
        else found["lm_head.weight"]
    return found["backbone.norm_f.weight"].to(device, dtype), head.to(device, dtype)


def _logits(hidden: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> torch.Tensor:
    from nemoconv.model.cuda import kernels

    # as NemotronHLM: norm_f(hidden in the model dtype), then lm_head, logits in float32
    return F.linear(kernels.rmsnorm(hidden.to(norm_w.dtype), norm_w, eps), head_w).float()
