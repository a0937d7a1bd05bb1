"""Compare FP8 variants of a network with the unquantized one, layer by layer (quantize --analyze, --max-kl).

A *variant* is a set of linears (HF module names) in FP8; all others keep their source weights. For a
batch of token ids we want every variant's final logits against the reference's (KL(ref‖variant), top-1
agreement), without ever holding more than one layer's weights:

    reference hidden  ──layer i──▶ reference hidden          (one stream)
    variant v         ──layer i, with v's layer-i linears FP8──▶ v's hidden
A variant shares the reference stream until its first FP8 layer, where it forks (its stream starts as
the reference's input to that layer). So each layer is read once and run once per live stream; after
the last layer the final norm and the output head turn every stream into logits.

Where the work is shared: streams without an FP8 linear in layer i run through it together in batches
(per-call costs dominate small probes); a variant whose only FP8 linear in layer i is the mixer's output
linear (Mamba out_proj, MLP down_proj) forks without a second run of the mixer: its output is
h + L_fp8(x_L), with x_L taken from the reference's own pass; at the end the reference's logits, softmax
and norms are computed once per slice of positions and the variants' logits come from one output-head
GEMM per group, compared in one set of batched float64 reductions (`_slice_stats`, LogitStats' numbers).

Memory: (1 + live streams) × tokens hidden states, plus one layer and one batch of outputs (chunks are
replaced in place). Callers bound it with `max_streams` (variants beyond it are swept again in further
passes, re-reading the layers): with tokens × (1 + max_streams) ≤ 2 × the calibration's tokens (what
calibration holds: its inputs and outputs), a sweep needs no more memory than calibration.
Cost: each variant costs (layers after its first FP8 layer) layer forwards on these tokens, plus one
output-head GEMM and one comparison on them.

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
from nemoconv.quant.calibrate import _LAYER, TOKENS_PER_BATCH, _build_block, _layer_context, _source_index
from nemoconv.quant.layer_reads import layer_reader, read_ahead, read_hf
from nemoconv.storage.config import MAMBA, MLP
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.verification.metrics import LogitStats

# logits compared per group: float64 temporaries of 8 MB on CPU (the comparison's dozen passes over them stay
# near the cache: 1.30 s against 1.90 s at 64 MB for 4 variants × 1024 positions × 8192 logits, one thread),
# 512 MB on CUDA (fewer launches)
COMPARE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


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
    """10·log10(‖W‖² / ‖W − dequant(q)‖²): the FP8 weight's signal-to-quantization-noise ratio (float32 sums:
    torch's are pairwise, far finer than the 0.1 dB reported, and a MoE has hundreds of these)."""
    w = w.float()
    noise = float(((q.float() * float(scale)) - w).pow(2).sum())
    signal = float(w.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def compare_variants(ck: Checkpoint, ids: torch.Tensor, variants: list[Variant], input_amax: dict[str, float],
                     device: torch.device, dtype: torch.dtype, max_streams: int = 64, progress=None,
                     sqnr: dict[str, float] | None = None,
                     reference: list[torch.Tensor] | None = None, kept_layers=None) -> dict[str, LogitStats]:
    """Each variant's logits on `ids` [n, s] against the unquantized network's (name → LogitStats).
    `sqnr`, when given, receives every FP8 weight's SQNR in dB. `reference`, the unquantized network's hidden
    states on `ids` at every layer boundary ([n, s, hidden] × (layers + 1), e.g. the Fisher estimate's), spares
    running the reference stream: a sweep then starts at its first variant's first FP8 layer. `kept_layers`
    (layer_reads.KeptLayers): layers already on the GPU."""
    if any(not v.quantized for v in variants):
        raise ValueError("a variant needs at least one FP8 linear")
    results: dict[str, LogitStats] = {}
    step = max(1, max_streams)
    passes = [variants[k:k + step] for k in range(0, len(variants), step)]
    for n, batch in enumerate(passes):
        results.update(_sweep(ck, ids, batch, input_amax, device, dtype, sqnr,
                              (lambda d, t, n=n: progress(n * t + d, len(passes) * t)) if progress else None,
                              reference, kept_layers))
    return results


def _sweep(ck: Checkpoint, ids: torch.Tensor, variants: list[Variant], input_amax: dict[str, float],
           device: torch.device, dtype: torch.dtype, sqnr: dict | None, progress,
           reference: list[torch.Tensor] | None = None, kept_layers=None) -> dict[str, LogitStats]:
    spec = ck.spec
    first = {v.name: min(layer_of(m) for m in v.quantized) for v in variants}
    wanted = {m for v in variants for m in v.quantized}
    index = _source_index(ck)
    rows = max(1, TOKENS_PER_BATCH.get(device.type, 2048) // ids.shape[1])
    ctx = _layer_context()
    layers = len(spec.layer_codes)
    start = min(first.values()) if reference is not None else 0
    with layer_reader(device) as reader, torch.no_grad():
        if reference is not None:
            ref = list(reference[start].split(rows))
        else:
            embed = dict(read_hf(ck, index.get("embed", []), reader))["backbone.embeddings.weight"]
            embed = embed.to(device=device, dtype=dtype)
            ref = [F.embedding(chunk.to(device), embed) for chunk in ids.split(rows)]
            del embed
        streams: dict[str, list[torch.Tensor]] = {}
        for i, tensors in read_ahead(ck, index, reader, range(start, layers), kept_layers):
            fp8_here = _fp8_weights(tensors, {m for m in wanted if layer_of(m) == i}, input_amax, device, sqnr)
            block = _build_block(spec, i, tensors, device, dtype)
            del tensors
            live = [v for v in variants if first[v.name] <= i]
            _advance(block, ctx, i, live, fp8_here, ref, streams, rows, reference is None)
            if reference is not None:
                ref = list(reference[i + 1].split(rows))
            block.to_empty(device="meta")
            del block
            if progress:
                progress(i + 1, layers + 1)
        norm_w, head_w = _final_weights(ck, reader, device, dtype, kept_layers)
        results = _compare_logits(ref, streams, [v.name for v in variants], norm_w, head_w, spec.layer_norm_epsilon)
        if progress:
            progress(layers + 1, layers + 1)
    return results


def _advance(block: nn.Module, ctx, i: int, live: list[Variant], fp8_here: dict, ref: list[torch.Tensor],
             streams: dict[str, list[torch.Tensor]], rows: int, run_ref: bool = True) -> None:
    """Every live stream (and the reference) through layer i, chunk by chunk in place, so that only one
    batch of outputs exists beside the streams. A variant with FP8 linears in this layer runs alone with
    them swapped in (forking from the reference's input at its first layer), except one whose only FP8
    linear here is the mixer's output linear: it reuses the reference's pass (`_shortcut`). The reference
    and every stream without an FP8 linear here run together, in batches of up to `rows` rows (the reference
    only with `run_ref`: else the caller has its next state, unless a shortcut needed its pass)."""
    plain, short = [], {}
    last = f"backbone.layers.{i}.{_LAST_LINEAR[block.code]}" if block.code in _LAST_LINEAR else None
    for v in live:
        mine = {m: fp8_here[m] for m in v.quantized if m in fp8_here}
        if not mine:
            plain.append(streams[v.name])
        elif v.name not in streams and set(mine) == {last} and not block.residual_in_fp32:
            short[v.name] = mine
        else:
            chunks = streams.setdefault(v.name, list(ref))   # a fork starts from the reference's input
            with _swapped(block, i, mine):
                for k, h in enumerate(chunks):
                    chunks[k] = block(h, ctx)
    if short:
        streams.update(_shortcut(block, ctx, i, last, ref, short))
    _batched(block, ctx, ([] if short or not run_ref else [ref]) + plain, rows)


# Mixers whose output is their last linear's output, so that block(h) = h + L(x_L): a variant whose only FP8
# linear in such a layer is L needs L's input from the reference's pass, not a second run of the mixer.
_LAST_LINEAR = {MAMBA: "mixer.out_proj", MLP: "mixer.down_proj"}


def _shortcut(block: nn.Module, ctx, i: int, last: str, ref: list[torch.Tensor], variants: dict) -> dict:
    """The reference through the layer alone (in place), keeping its input h and L's input x_L; then
    each variant's output h + L_fp8(x_L), the very operations the whole block would run."""
    lin = block.get_submodule(last.removeprefix(f"backbone.layers.{i}."))
    inputs: list[torch.Tensor] = []
    handle = lin.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    residuals = list(ref)
    try:
        for k, h in enumerate(ref):
            ref[k] = block(h, ctx)
    finally:
        handle.remove()
    out = {}
    for name, mine in variants.items():
        with _swapped(block, i, mine):
            out[name] = [h + lin(x) for h, x in zip(residuals, inputs)]
    return out


def _batched(block: nn.Module, ctx, groups: list[list[torch.Tensor]], rows: int) -> None:
    """Replace every chunk h of every group by block(h), running up to `rows` rows per call (a layer's
    cost is mostly per call on small probes)."""
    slots = [(g, k) for g in groups for k in range(len(g))]
    j = 0
    while j < len(slots):
        take = 1
        size = slots[j][0][slots[j][1]].shape[0]
        while j + take < len(slots) and size + slots[j + take][0][slots[j + take][1]].shape[0] <= rows:
            size += slots[j + take][0][slots[j + take][1]].shape[0]
            take += 1
        batch = [g[k] for g, k in slots[j:j + take]]
        out = block(torch.cat(batch) if take > 1 else batch[0], ctx)
        for (g, k), o in zip(slots[j:j + take], out.split([h.shape[0] for h in batch])):
            g[k] = o
        j += take


def _fp8_weights(tensors, modules: set[str], input_amax: dict[str, float], device, sqnr: dict | None,
                 widen: bool = False) -> dict:
    """HF module → (fp8 weight, weight_scale, input_scale) on the device, from the stored weight. `widen`: off
    CUDA the weight comes widened to float32 (its exact values: the emulated FP8 product widens it anyway, so
    once per weight instead of once per call; it also gives the SQNR), for callers that call fp8_linear on it
    rather than swap it into a Linear."""
    weights = dict(tensors)
    out = {}
    for m in modules:
        # quantized (and its SQNR taken) where it will be used: on a GPU, CPU passes over every projection of
        # an 8B would cost more than the analysis itself
        w = weights[f"{m}.weight"].to(device)
        q, weight_scale, _ = fp8.quantize_weight_here(w, f"weight {m}")
        wide = widen and device.type != "cuda"
        if wide or sqnr is not None:
            q32 = q.float()            # once for both: FP8 → float32 is slow on a CPU (~10 ns a value)
            if sqnr is not None:
                sqnr[m] = weight_sqnr_db(w, q32, weight_scale)
            if wide:
                q = q32
        input_scale = fp8.scale_from_amax(input_amax[m])
        out[m] = (q, weight_scale.to(device), input_scale.to(device))
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


def _final_weights(ck: Checkpoint, reader: TensorReader, device, dtype,
                   kept_layers=None) -> tuple[torch.Tensor, torch.Tensor]:
    """backbone.norm_f.weight and lm_head.weight (the embedding when tied), in the compute dtype; offered to
    `kept_layers` (layer_reads.KeptLayers, key "final") for the next pass."""
    held = kept_layers.get("final") if kept_layers is not None else None
    if held is not None:
        return held[0][1], held[1][1]
    norm_w, head_w = _read_final_weights(ck, reader, device, dtype)
    if kept_layers is not None:
        kept_layers.keep("final", [("norm", norm_w), ("head", head_w)])
    return norm_w, head_w


def _read_final_weights(ck: Checkpoint, reader: TensorReader, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scheme = ck.scheme_rules
    want = {"backbone.norm_f.weight", "lm_head.weight", "backbone.embeddings.weight"}
    names = [n for n in ck.tensor_names() if scheme.to_hf(scheme.normalize(n)) in want]
    found = dict(read_hf(ck, names, reader))
    head = found["backbone.embeddings.weight"] if ck.spec.tie_word_embeddings or "lm_head.weight" not in found \
        else found["lm_head.weight"]
    return found["backbone.norm_f.weight"].to(device, dtype), head.to(device, dtype)


def _logits(hidden: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> torch.Tensor:
    from nemoconv.model.cuda import kernels

    # as NemotronHLM: norm_f(hidden in the model dtype), then lm_head, logits in float32
    return F.linear(kernels.rmsnorm(hidden.to(norm_w.dtype), norm_w, eps), head_w).float()


def _compare_logits(ref: list[torch.Tensor], streams: dict[str, list[torch.Tensor]], names: list[str],
                    norm_w: torch.Tensor, head_w: torch.Tensor, eps: float) -> dict[str, LogitStats]:
    """LogitStats of every stream's logits against the reference's. The work is cut into slices of
    positions; for each, the reference's side (softmax, norms, argmax) is computed once and the variants'
    logits come from one output-head GEMM per group of variants, compared in float64 as LogitStats does
    (`_slice_stats`), with at most COMPARE_ELEMENTS[device] logits per group."""
    width = ref[0].shape[-1]
    ref_h = torch.cat([h.reshape(-1, width) for h in ref])
    flat = {}
    for n in names:   # one variant at a time, so its chunks are freed as it is flattened
        flat[n] = torch.cat([h.reshape(-1, width) for h in streams.pop(n)])
    vocab, budget = head_w.shape[0], COMPARE_ELEMENTS.get(head_w.device.type, COMPARE_ELEMENTS["cpu"])
    span = max(1, min(ref_h.shape[0], budget // vocab))
    group = max(1, budget // (span * vocab))
    results = {n: LogitStats() for n in names}
    for a in range(0, ref_h.shape[0], span):
        side = _RefSide(_logits(ref_h[a:a + span], norm_w, head_w, eps).double())
        for g in range(0, len(names), group):
            part = names[g:g + group]
            cand = _logits(torch.cat([flat[n][a:a + span] for n in part]), norm_w, head_w, eps)
            for n, stats in zip(part, _slice_stats(side, cand.view(len(part), -1, vocab))):
                results[n].merge(stats)
    return results


class _RefSide:
    """What LogitStats computes from the reference's logits r [t, V], computed once for all variants."""

    def __init__(self, r: torch.Tensor):
        self.r = r
        logp = torch.log_softmax(r, dim=-1)
        self.p = logp.exp()
        self.plogp = (self.p * logp).sum(-1)                  # Σ p·log p per position
        self.rp = torch.stack([r, self.p], dim=-1)            # [t, V, 2]: c·r and c·p in one pass over c
        self.norm = r.norm(dim=-1)
        self.zero = self.norm == 0
        self.max_abs = float(r.abs().max())
        self.top1 = r.argmax(-1)
        self.nonfinite = int((~torch.isfinite(r)).sum())


def _slice_stats(ref: _RefSide, c32: torch.Tensor) -> list[LogitStats]:
    """LogitStats._add_chunk's numbers for g candidates c32 [g, t, V] (float32 logits) against one
    reference, in float64, in fewer passes over the candidates: KL(p‖q) = Σ p·log p − c·p + logsumexp(c)
    (log q = c − logsumexp(c); Σ p = 1 up to rounding: the KL moves by ~1e-16 of the logits' size), the
    dot products c·r and c·p in one batched GEMV, an all-zero row from its norm."""
    g, t, vocab = c32.shape
    c = c32.double()
    diff = (c - ref.r).abs_().view(g, -1)
    dots = torch.bmm(c.transpose(0, 1), ref.rp).transpose(0, 1)    # [g, t, 2], one pass over c
    cnorm = c.norm(dim=-1)
    norms = ref.norm * cnorm
    cos = torch.where(norms > 0, dots[..., 0] / norms.clamp_min(1e-300),
                      (ref.zero & (cnorm == 0)).double()).clamp(-1.0, 1.0)
    kl = (ref.plogp - dots[..., 1] + torch.logsumexp(c, dim=-1)).clamp_min(0.0)
    dsum = diff.sum(1)
    finite = bool(torch.isfinite(dsum).all()) and ref.nonfinite == 0   # then every candidate logit is finite
    bad = [0] * g if finite else (~torch.isfinite(c)).view(g, -1).sum(1).tolist()
    columns = zip(bad, diff.amax(1).tolist(), dsum.tolist(), cos.sum(1).tolist(), cos.amin(1).tolist(),
                  kl.sum(1).tolist(), kl.amax(1).tolist(), (c32.argmax(-1) == ref.top1).sum(1).tolist())
    return [LogitStats(positions=t, elements=t * vocab, max_abs=dmax, sum_abs=dsum, cos_sum=csum, cos_min=cmin,
                       kl_sum=ksum, kl_max=kmax, top1_agree=agree, max_abs_ref=ref.max_abs,
                       nonfinite_ref=ref.nonfinite, nonfinite_cand=nb)
            for nb, dmax, dsum, csum, cmin, ksum, kmax, agree in columns]
