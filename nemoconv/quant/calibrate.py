"""Calibration: the largest |input| each targeted linear sees, from the built-in model, layer by layer.

Only one layer's weights are ever on the device: the embedding turns every calibration sequence into
hidden states; then each layer in turn is loaded, all hidden states go through it (in micro-batches)
while the inputs of its targeted linears are observed, its outputs replace its inputs, and it is
freed. The next layer's tensors are read from disk on a thread meanwhile. A checkpoint larger than the
device therefore calibrates in the memory of one layer plus the hidden states.

Observation is ModelOpt's own max calibration (`mtq.quantize(layer, mtq.FP8_DEFAULT_CFG, loop)`) when
nvidia-modelopt 0.47 is installed, else forward pre-hooks that keep the same running max; the two give
identical amax values (tests/test_quantize_modelopt.py). Like ModelOpt's PTQ, activations flow through
the unquantized layers. Routed experts see only the tokens routed to them; an expert that receives no
calibration token takes the largest amax of its layer's experts for that projection.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.data.calib_data import CALIBRATION_TEXTS
from nemoconv.errors import NemoconvError
from nemoconv.model.layers import build_layer
from nemoconv.quant.fp8 import abs_max
from nemoconv.quant.layer_reads import KeptLayers, layer_reader, read_ahead, read_hf
from nemoconv.quant.observers import modelopt_status, pick_observer  # noqa: F401 - modelopt_status: public here too
from nemoconv.storage.config import ATTENTION, LAYER_KIND_NAMES
from nemoconv.verification.prompts import check_ids, encode, find_tokenizer, read_prompt_file

SEED = 20250117                      # random calibration tokens and the order texts are cycled in
TOKENS_PER_BATCH = {"cuda": 16384, "cpu": 2048}
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer)\.experts\.(\d+)\.(up_proj|down_proj)$")


# ---- calibration tokens --------------------------------------------------------------------------


@dataclass
class CalibData:
    ids: torch.Tensor        # int64 [samples, seq_len]
    info: dict               # what the manifest records about the source


def calibration_tokens(ck: Checkpoint, calib_file: str | Path | None, samples: int, seq_len: int) -> CalibData:
    """`samples` sequences of `seq_len` tokens: from the file, else the built-in text through the
    checkpoint's tokenizer.json, else seeded random ids (no tokenizer)."""
    vocab = ck.spec.vocab_size
    tok = find_tokenizer(ck.path)
    if calib_file is not None:
        path = Path(calib_file)
        if tok.tokenizer is None and path.is_file() and not _is_jsonl(path):
            raise NemoconvError(f"{path}: text calibration data needs a tokenizer.json, and {ck.path} has none "
                                f"(give JSONL lines with \"input_ids\" instead)")
        docs = [p.ids for p in read_prompt_file(path, tok.tokenizer, vocab)]
        info = {"kind": "file", "source": f"file {path}"}
    elif tok.tokenizer is not None:
        docs = []
        for k, text in enumerate(CALIBRATION_TEXTS):
            ids = encode(tok.tokenizer, text)
            check_ids(ids, vocab, f"{tok.path} (built-in calibration text {k})")
            docs.append(ids)
        info = {"kind": "builtin-text", "source": f"built-in calibration text ({len(CALIBRATION_TEXTS)} "
                                                  f"paragraphs) through {tok.path.name}"}
    else:
        g = torch.Generator().manual_seed(SEED)
        ids = torch.randint(0, vocab, (samples, seq_len), generator=g)
        return CalibData(ids, {"kind": "random", "source": f"seeded random token ids (seed {SEED}; the "
                                                           f"checkpoint has no tokenizer.json)",
                               "distinct_tokens": samples * seq_len, "cycled": False})
    docs = [d for d in docs if d]
    distinct = sum(len(d) for d in docs)
    if not distinct:
        raise NemoconvError(f"{info['source']}: no tokens to calibrate on")
    need = samples * seq_len
    stream = [t for d in docs for t in d]
    # Too little data: cycle through it again in seeded random orders, so each pass gives the
    # recurrent layers different preceding context (the same tokens in the same order add nothing).
    g = torch.Generator().manual_seed(SEED)
    while len(stream) < need:
        for k in torch.randperm(len(docs), generator=g).tolist():
            stream.extend(docs[k])
    ids = torch.tensor(stream[:need], dtype=torch.int64).view(samples, seq_len)
    info.update({"distinct_tokens": distinct, "cycled": distinct < need})
    return CalibData(ids, info)


def _is_jsonl(path: Path) -> bool:
    if path.suffix.lower() in (".jsonl", ".json"):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return first.lstrip().startswith("{")


# ---- the layer-by-layer pass ---------------------------------------------------------------------


@dataclass
class CalibResult:
    amax: dict[str, float]                      # HF module → input amax
    tokens: dict[str, int]                      # HF module → calibration tokens it saw
    weight_amax: dict[str, float] = field(default_factory=dict)  # HF module → amax of its stored weight
    filled: dict[str, str] = field(default_factory=dict)  # expert → why its amax was borrowed
    calibrator: str = ""                        # who observed the amax, for people
    device: str = ""
    dtype: str = ""
    micro_batch: int = 0
    kv_amax: dict[str, float] = field(default_factory=dict)  # attention k_proj/v_proj → amax of its output
    # with keep_rows=k: the first k sequences' input to every layer run, then the last one's output (--analyze)
    kept: list[torch.Tensor] = field(default_factory=list)


def _source_index(ck: Checkpoint) -> dict[object, list[str]]:
    """Source tensor names by main-network layer index ("embed" for the embedding)."""
    scheme = ck.scheme_rules
    index: dict[object, list[str]] = {}
    for name in ck.tensor_names():
        hf = scheme.to_hf(scheme.normalize(name)) or ""
        m = _LAYER.match(hf)
        key = int(m.group(1)) if m else ("embed" if hf == "backbone.embeddings.weight" else None)
        if key is not None:
            index.setdefault(key, []).append(name)
    return index


def _build_block(spec, i: int, tensors: list[tuple[str, torch.Tensor]], device, dtype) -> nn.Module:
    # through the model's own loader (nemoconv.model.layers → loading.build_model): the same module as in
    # the whole model, scales and dtypes included
    return build_layer(spec, i, tensors, device, dtype)


def _layer_context():
    from nemoconv.model import Pass as _Pass

    # Whole sequences without cache or padding: the model's plain causal forward.
    return _Pass(cache=None, start=0, pad_mask=None, attn_mask=None, causal=True, decode=False)


def _router_counter(block: nn.Module, counts: dict):
    """Count tokens per routed expert (from the router's choices) for the summary and the fill rule."""
    gate = getattr(block.mixer, "gate", None)
    if gate is None or not hasattr(block.mixer, "experts"):
        return None

    def hook(module, args, output):
        ids = output[1].reshape(-1)
        c = torch.bincount(ids, minlength=len(block.mixer.experts))
        counts["experts"] = c if counts.get("experts") is None else counts["experts"] + c
    return gate.register_forward_hook(hook)


def run_calibration(ck: Checkpoint, targets: list[str], ids: torch.Tensor, device: torch.device,
                    dtype: torch.dtype, calibrator: str = "auto",
                    progress: Callable[[int, int], None] | None = None, kv: bool = False,
                    keep_rows: int = 0, kept_layers: KeptLayers | None = None) -> CalibResult:
    """Input amax of every targeted linear (HF module names), streaming the network layer by layer; with
    `kv`, also the amax of every attention layer's k_proj/v_proj output (the keys and values an FP8 KV
    cache stores: Nemotron-H's attention has no positional rotation, so they are the projections' outputs).
    With `keep_rows`, `kept` holds the first keep_rows sequences' hidden state at every layer boundary run
    (the Fisher estimate's forward pass, for free). `kept_layers` keeps what fits of the layers on the GPU
    for the passes after this one."""
    observer, label = pick_observer(calibrator)
    spec = ck.spec
    by_layer = _targets_by_layer(targets)
    index = _source_index(ck)
    rows = max(1, TOKENS_PER_BATCH.get(device.type, 2048) // ids.shape[1])
    seen = _Seen(total_tokens=ids.numel())
    with layer_reader(device) as reader, torch.no_grad():
        embed = dict(read_hf(ck, index.get("embed", []), reader))["backbone.embeddings.weight"]
        embed = embed.to(device=device, dtype=dtype)
        hidden = [F.embedding(chunk.to(device), embed) for chunk in ids.split(rows)]
        del embed
        # Layers without targets after the last targeted one change no scale: stop there.
        last = max(by_layer) if by_layer else -1
        if kv:
            last = max([last] + [i for i, c in enumerate(spec.layer_codes) if c == ATTENTION])
        kept: list[torch.Tensor] = []
        for i, tensors in read_ahead(ck, index, reader, range(last + 1), kept_layers):
            layer_targets = by_layer.get(i, {})
            seen.weight_amax.update(_weight_amax(tensors, layer_targets.values()))
            block = _build_block(spec, i, tensors, device, dtype)
            del tensors
            if keep_rows:
                kept.append(_first_rows(hidden, keep_rows))
            hidden = _calibrate_layer(block, i, spec, hidden, layer_targets, observer, seen, kv)
            block.to_empty(device="meta")  # frees the layer's memory now, even if a reference lingers
            del block
            if progress:
                progress(i + 1, last + 1)
        if keep_rows:
            kept.append(_first_rows(hidden, keep_rows))
    filled = _fill_idle_experts(targets, seen.amax, seen.tokens)
    kv_found = {m: float(a.float()) for m, a in seen.kv_amax.items()}
    for m, a in kv_found.items():
        _check_finite(a, m)
    result = CalibResult(seen.amax, seen.tokens, seen.weight_amax, filled, label, str(device),
                         str(dtype).removeprefix("torch."), rows, kv_found)
    result.calibrator_name = observer.name  # "modelopt" | "builtin", for the manifest
    result.kept = kept
    return result


def _first_rows(chunks: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The first `rows` rows of a list of row chunks, as one new tensor."""
    taken, need = [], rows
    for c in chunks:
        if need <= 0:
            break
        taken.append(c[:need])
        need -= taken[-1].shape[0]
    return torch.cat(taken).clone()


@dataclass
class _Seen:
    """What the pass has observed so far."""

    total_tokens: int
    amax: dict[str, float] = field(default_factory=dict)          # HF module → input amax
    weight_amax: dict[str, float] = field(default_factory=dict)   # HF module → amax of its stored weight
    tokens: dict[str, int] = field(default_factory=dict)          # HF module → calibration tokens it saw
    kv_amax: dict[str, torch.Tensor] = field(default_factory=dict)


def _targets_by_layer(targets: list[str]) -> dict[int, dict[str, str]]:
    """layer → {path inside the block: HF module}."""
    by_layer: dict[int, dict[str, str]] = {}
    for hf in targets:
        m = _LAYER.match(hf)
        if m is None:
            raise NemoconvError(f"internal error: calibration target {hf!r} is outside the main layers")
        by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = hf
    return by_layer


def _calibrate_layer(block: nn.Module, i: int, spec, hidden: list[torch.Tensor], layer_targets: dict[str, str],
                     observer, seen: _Seen, kv: bool) -> list[torch.Tensor]:
    """Run every chunk through layer i with its targets observed; returns the layer's outputs (the next
    layer's inputs)."""
    ctx = _layer_context()
    counts: dict = {}
    counter = _router_counter(block, counts)
    kv_hooks = _kv_observers(block, i, seen.kv_amax) if kv else []
    outputs: list[torch.Tensor] = []
    finite = torch.ones((), dtype=torch.bool, device=hidden[0].device if hidden else "cpu")

    def loop(model):
        nonlocal finite
        outputs.clear()
        for h in hidden:
            out = model(h, ctx)
            finite = finite & torch.isfinite(out).all()
            outputs.append(out)

    if layer_targets:
        try:
            found = observer.calibrate(block, layer_targets, loop)
        except AssertionError as exc:  # ModelOpt's calibrator asserts on NaN amax
            if "nan" not in str(exc).lower():
                raise
            raise NemoconvError(_nonfinite(i, spec)) from None
    else:
        loop(block)
        found = {}
    if counter is not None:
        counter.remove()
    for h in kv_hooks:
        h.remove()
    if not bool(finite):
        raise NemoconvError(_nonfinite(i, spec))
    routed = counts["experts"].tolist() if counts.get("experts") is not None else None
    for hf in layer_targets.values():
        if hf in found:
            _check_finite(found[hf], hf)
            seen.amax[hf] = found[hf]
        m = _EXPERT.match(hf)
        seen.tokens[hf] = (routed[int(m.group(2))] if routed else 0) if m else seen.total_tokens
    return outputs


def _kv_observers(block: nn.Module, i: int, kv_amax: dict) -> list:
    """Forward hooks keeping the running amax of an attention layer's k_proj and v_proj outputs."""
    if getattr(block, "code", None) != ATTENTION:
        return []

    def observe(name):
        def hook(module, args, output):
            a = abs_max(output.detach())
            kv_amax[name] = a if name not in kv_amax else torch.maximum(kv_amax[name], a)
        return hook
    return [getattr(block.mixer, p).register_forward_hook(observe(f"backbone.layers.{i}.mixer.{p}"))
            for p in ("k_proj", "v_proj")]


def _weight_amax(tensors: list[tuple[str, torch.Tensor]], modules) -> dict[str, float]:
    """amax(|W|) of each targeted weight as stored (the value its weight_scale will come from, before any
    cast for the device), so a weight FP8 cannot scale is known before the plan is written. NaN/Inf is
    an error here, before it spreads into the activations."""
    weights = dict(tensors)
    found = {}
    for hf in modules:
        w = weights.get(f"{hf}.weight")
        if w is None:
            continue
        low, high = (float(v) for v in w.aminmax())  # no |W| copy; NaN propagates into both
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NemoconvError(f"weight {hf}.weight holds NaN/Inf values; cannot quantize it")
        found[hf] = max(-low, high)
    return found


def _nonfinite(i: int, spec) -> str:
    return (f"calibration: layer {i} ({LAYER_KIND_NAMES[spec.layer_codes[i]]}) produced NaN/Inf activations "
            f"(NaN/Inf weights, or values that overflow on this data)")


def _check_finite(value: float, hf: str) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise NemoconvError(f"calibration: the input of {hf} holds NaN/Inf values; cannot compute an FP8 scale")


def _fill_idle_experts(targets: list[str], amax: dict[str, float], tokens: dict[str, int]) -> dict[str, str]:
    """An expert no calibration token reached takes the largest amax of its layer's experts (same
    projection); serving engines use one input scale per MoE layer (the max), so this is neutral there."""
    filled: dict[str, str] = {}
    peers: dict[tuple[str, str], list[float]] = {}
    for hf in targets:
        m = _EXPERT.match(hf)
        if m and tokens.get(hf, 0) > 0 and hf in amax:
            peers.setdefault((m.group(1), m.group(3)), []).append(amax[hf])
    for hf in targets:
        if hf in amax and tokens.get(hf, 1) > 0:
            continue
        m = _EXPERT.match(hf)
        if m is None:
            raise NemoconvError(f"calibration: no input ever reached {hf}")
        seen = peers.get((m.group(1), m.group(3)))
        if not seen:
            raise NemoconvError(f"calibration: no calibration token reached any expert of {m.group(1)}")
        amax[hf] = max(seen)
        filled[hf] = f"no calibration token was routed to it; took the max of {len(seen)} experts of its layer"
    return filled


