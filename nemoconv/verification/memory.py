"""Memory for layer-streamed verify: size flags, what a run needs, the ledger that enforces a cap, and the choice
between the whole model and streaming (`choose_streaming`).

The ledger counts real bytes: every tensor a streamed run keeps (a built layer's parameters, the read-ahead
layer's tensors, hidden states, per-layer caches, the ends) is entered with its numel × element size when it
becomes resident and removed when it is freed. Transient activations inside one layer call cannot be counted
that way; they are entered as an estimate (`activation_bytes`), reserved for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.model.layers import ENDS, cache_bytes, layer_cache, piece_bytes, piece_names
from nemoconv.storage.config import ATTENTION, MAMBA, MOE, ModelSpec
from nemoconv.stream.output import parse_size

# The whole-model path also holds a batch's logits (up to 1 GiB), its cache, allocator slack and kernel
# workspaces: 10 % of the weights plus up to 2 GiB (less for a model smaller than that).
WHOLE_MODEL_MARGIN = 0.10
WHOLE_MODEL_EXTRA = 2 << 30


def parse_memory_size(text, flag: str) -> int | None:
    """`6GB`, `512MiB`, `1.5GiB`, a byte count → bytes; None stays None (no cap). 0, negatives and
    garbage are a NemoconvError naming the flag."""
    if text is None:
        return None
    try:
        return parse_size(text)
    except NemoconvError:
        raise NemoconvError(f"{flag}: invalid size {str(text)[:40]!r} (use e.g. 6GB, 512MiB, 1.5GiB; "
                            f"more than 0)") from None


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class Ledger:
    """Bytes held in one memory (the device, or the host), by item; the peak; a cap that is enforced."""

    def __init__(self, where: str, cap: int | None, flag: str):
        self.where, self.cap, self.flag = where, cap, flag
        self.held: dict[object, int] = {}
        self.peak = 0
        self.peak_items: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.held.values())

    def set(self, key, nbytes: int) -> None:
        """Hold `nbytes` under `key` (replacing what it held); a total above the cap is an error."""
        previous = self.held.get(key, 0)
        self.held[key] = int(nbytes)
        total = self.total
        if self.cap is not None and total > self.cap:
            self.held[key] = previous
            raise NemoconvError(f"{self.flag} {fmt_bytes(self.cap)}: the streamed run needs {fmt_bytes(total)} of "
                                f"{self.where} memory here ({_describe(self.held | {key: nbytes})})")
        if total > self.peak:
            self.peak = total
            self.peak_items = _by_kind(self.held)

    def drop(self, key) -> None:
        self.held.pop(key, None)

    def summary(self) -> dict:
        return {"cap_bytes": self.cap, "peak_bytes": self.peak, "peak_by_kind": self.peak_items}


def _by_kind(held: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in held.items():
        kind = key[0] if isinstance(key, tuple) else str(key)
        out[kind] = out.get(kind, 0) + n
    return out


def _describe(held: dict) -> str:
    return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(_by_kind(held).items(), key=lambda kv: -kv[1]) if v)


# ---- estimates -----------------------------------------------------------------------------------


def activation_bytes(spec: ModelSpec, rows: int, positions: int, dtype: torch.dtype) -> int:
    """An upper estimate of the transient tensors of one layer call on [rows, positions] (the largest layer
    kind present), or of the head's logits, whichever is larger."""
    es = torch.empty((), dtype=dtype).element_size()
    t = rows * positions
    hidden = 4 * t * spec.hidden_size * 4                       # residual (fp32), normed, output, input
    kinds = set(spec.layer_codes)
    per_kind = [2 * t * spec.intermediate_size * es]            # MLP: up, relu²
    if MAMBA in kinds:
        scan = 3 * t * spec.mamba_intermediate * 4 + rows * (positions // max(1, spec.chunk_size) + 1) * \
            spec.mamba_num_heads * spec.mamba_head_dim * spec.ssm_state_size * 4
        per_kind.append(t * spec.in_proj_size * es + 2 * t * spec.conv_dim * es + scan)
    if ATTENTION in kinds:                                      # the reference attention's score matrix
        per_kind.append(2 * rows * spec.num_attention_heads * positions * positions * 4 +
                        3 * t * spec.num_attention_heads * spec.head_dim * es)
    if MOE in kinds:
        per_kind.append(t * spec.num_experts_per_tok * (2 * spec.moe_intermediate_size * es + spec.hidden_size * 4)
                        + 2 * t * spec.moe_shared_expert_intermediate_size * es)
    logits = 2 * t * spec.vocab_size * 4
    return max(hidden + max(per_kind), logits)


def whole_model_bytes(path, dtype: torch.dtype) -> tuple[int, int]:
    """(weights in `dtype` as the whole model holds them, an estimate of its caches and activations)."""
    ck = open_checkpoint(path)
    names = [n for names in piece_names(ck).values() for n in names]
    weights = piece_bytes(ck, names, dtype)
    return weights, int(weights * WHOLE_MODEL_MARGIN) + min(WHOLE_MODEL_EXTRA, weights)


def piece_sizes(ck, dtype: torch.dtype) -> tuple[int, int, int]:
    """(bytes of the ends, of the largest layer, of all layers) once built in `dtype`."""
    index = piece_names(ck)
    layers = [piece_bytes(ck, index.get(i, []), dtype) for i in range(ck.spec.num_layers)]
    return piece_bytes(ck, index.get(ENDS, []), dtype), max(layers, default=0), sum(layers)


def available_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device, or the host's available memory (/proc/meminfo) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not stream on that ground


def choose_streaming(path, device, mode: str, max_gpu_memory: int | None,
                     dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether verify streams layers, and why (one line for the console and the report).

    mode "on"/"off" decide; "auto" streams when the whole model (its weights in the compute dtype, from the
    headers, plus a margin for caches and activations) does not fit the cap, or the free memory without one.
    "off" with a cap the whole model cannot fit is an error: the whole-model path cannot keep to a cap."""
    if mode not in ("auto", "on", "off"):
        raise NemoconvError(f"--stream-layers must be auto, on or off, got {mode!r}")
    device = torch.device(device)
    if mode == "on":
        return True, "layer streaming on (--stream-layers on)"
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    weights, extra = whole_model_bytes(path, dtype)
    need = weights + extra
    if max_gpu_memory is not None:
        budget, what = max_gpu_memory, f"the --max-gpu-memory cap of {fmt_bytes(max_gpu_memory)}"
    else:
        budget = available_memory(device)
        what = f"the free memory of {device} ({fmt_bytes(budget)})"
    detail = (f"the whole model needs about {fmt_bytes(need)} (weights {fmt_bytes(weights)} in "
              f"{str(dtype).removeprefix('torch.')} + {fmt_bytes(extra)} for caches and activations)")
    if mode == "off":
        if max_gpu_memory is not None and need > max_gpu_memory:
            raise NemoconvError(f"--stream-layers off: {detail}, more than {what}; only layer streaming keeps to "
                                f"a cap (use --stream-layers auto)")
        return False, "whole model (--stream-layers off)"
    if need > budget:
        return True, f"streaming layers: {detail}, more than {what}"
    return False, f"whole model: {detail}, within {what}"


# ---- the plan of a streamed run ------------------------------------------------------------------


@dataclass
class Plan:
    """What a streamed run will hold (bytes), checked against the caps before anything is built."""

    activations: int          # estimated transients of one layer call (or of the head's logits)
    source_bytes: list[int]   # per layer: its tensors as read from disk (the read-ahead)
    all_source: int           # every piece's tensors as read (what keeping them in host memory costs)
    cache_length: int
    spill: bool               # hidden states and caches live in host memory between their turns
    host_need: int            # host memory the run needs besides kept weights

    @classmethod
    def make(cls, ck, index: dict, dtype: torch.dtype, device: torch.device, rows: list[int], hidden_tokens: int,
             positions: int, cache_length: int, keep_caches: bool, dev_cap: int | None,
             host_cap: int | None) -> "Plan":
        spec = ck.spec
        ends = piece_bytes(ck, index.get(ENDS, []), dtype)
        built = [piece_bytes(ck, index.get(i, []), dtype) for i in range(spec.num_layers)]
        source = [sum(ck.entries[n].nbytes for n in index.get(i, [])) for i in range(spec.num_layers)]
        all_source = sum(source) + sum(ck.entries[n].nbytes for n in index.get(ENDS, []))
        activations = activation_bytes(spec, max(rows), positions, dtype)
        hidden_size = max(4, torch.empty((), dtype=dtype).element_size())   # residuals may be fp32
        states = []                                                          # (all layers, one layer) per batch
        for r in rows:
            per_layer = [cache_bytes(layer_cache(spec, i, r, cache_length, "meta", dtype))
                         for i in range(spec.num_layers)]
            hidden = r * hidden_tokens * spec.hidden_size * hidden_size
            states.append((hidden + (sum(per_layer) if keep_caches else max(per_layer, default=0)),
                           hidden + max(per_layer, default=0)))
        states_all = sum(s[0] for s in states)
        states_one = max(s[1] for s in states)
        read_ahead = max(source, default=0)
        fixed = ends + max(built, default=0) + activations + (read_ahead if device.type == "cpu" else 0)
        parts = (f"embeddings and head {fmt_bytes(ends)}, largest layer {fmt_bytes(max(built, default=0))}"
                 + (f", the next layer read ahead {fmt_bytes(read_ahead)}" if device.type == "cpu" else "")
                 + f", activations ~{fmt_bytes(activations)}")
        spill = False
        if dev_cap is not None and fixed + states_all > dev_cap:
            if device.type == "cpu" or fixed + states_one > dev_cap:
                least = fixed + (states_all if device.type == "cpu" else states_one)
                what = "all hidden states and caches" if device.type == "cpu" else "one batch's hidden states and caches"
                flag = "--max-gpu-memory/--max-host-memory" if device.type == "cpu" else "--max-gpu-memory"
                raise NemoconvError(f"{flag} {fmt_bytes(dev_cap)} cannot hold one layer with its activations: at "
                                    f"least {fmt_bytes(least)} is needed ({parts}, {what} "
                                    f"{fmt_bytes(least - fixed)})")
            spill = True
        host_need = (read_ahead + (states_all if spill else 0)) if device.type != "cpu" else 0
        if host_cap is not None and device.type != "cpu" and host_need > host_cap:
            raise NemoconvError(f"--max-host-memory {fmt_bytes(host_cap)}: the streamed run needs at least "
                                f"{fmt_bytes(host_need)} of host memory (the next layer read ahead "
                                f"{fmt_bytes(read_ahead)}" + (f", spilled hidden states and caches "
                                                              f"{fmt_bytes(states_all)}" if spill else "") + ")")
        return cls(activations, source, all_source, cache_length, spill, host_need)
