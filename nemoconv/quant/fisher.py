"""Second-order (Fisher) estimate of every linear's FP8 effect on the logits, in a few passes whatever their number.

The exact answer (sweep.compare_variants) propagates one stream per linear through the rest of the network, so
its cost grows with the number of linears (a MoE has one pair per expert). This estimate costs one forward and
one backward pass on the probe, with S label samples, for all of them at once.

Theory. For a small change δz_t of the logits at position t, KL(p_t‖q_t) ≈ ½ δz_tᵀ F_t δz_t with
F_t = diag(p_t) − p_t p_tᵀ, the Fisher information of the softmax. Draw labels y_t ~ p_t (the model's own
distribution) at every position; the score s_t = onehot(y_t) − p_t has E[s_t s_tᵀ] = F_t, and scores of
different positions are independent and zero-mean. With ε_L = L_fp8(x) − L(x) the change FP8 makes to a
linear's OUTPUT and g_L = ∂(Σ_t log p(y_t))/∂(that output), gᵀε = Σ_t s_tᵀ (J ε)_t (first order), so
    E_y[(g_Lᵀ ε_L)²] = Σ_t (J ε_L)_tᵀ F_t (J ε_L)_t ≈ 2 Σ_t KL_t.
Rows of the batch never interact, so each row's own sum X_r = Σ_{t in r} g_tᵀ ε_t is an independent sample:
    est_kl(L) = Σ_{rows r, samples s} X_{r,s}² / (2 · S · positions)        (mean KL per position)
A mixer's estimate (all its linears FP8 together) is the same with X_r summed over its linears first.
ε is exactly what quantize writes: quant.fp8.quantize_weight, input_scale = calibrated amax / 448, computed by
the model's own FP8 linear on the input the linear sees in the recompute. Routing (a MoE's top-k choice) is
held fixed, as a linearization does (the choice has no gradient; the routing weights keep theirs).

Passes and memory (layer by layer, one layer's weights at a time, as calibration):
  forward    the probe through every layer without autograd, keeping each layer's INPUT hidden state:
             (n_layers + 1) × probe_tokens × hidden values in the compute dtype (`saved_bytes`). The probe is
             the first calibration sequences, so --analyze has calibration keep them (run_calibration's
             keep_rows) and this pass only runs the layers calibration did not;
  head       logits per slice of positions, S labels per position from a seeded generator (the same probe
             gives the same estimate), and the gradient at the last hidden state: S × probe_tokens × hidden;
  backward   from the last layer down to the first targeted one: rebuild it, rerun its forward once from the
             saved input with autograd (calibration's batch size of probe rows at a time), then one backward
             pass per label set through that graph (the S sets differ only in the output gradient), taking the
             gradient at its input (the previous layer's output gradient for set k) and at every target
             linear's output (forward hooks give x and L(x); ε is computed once and serves the S passes).
             The saved states stay (`hidden`): the exact sweep of the worst linears takes its reference from
             them instead of running it again.
  So at most (n_layers + 1 + 2·S) × probe_tokens hidden states plus one chunk's autograd graph; the probe
  size caps it (with the default probe, 1/32 of the calibration tokens, that is below calibration's 2 ×
  calibration tokens for up to ~55 layers at S = 4: 52 layers hold 1.9 ×).
Cost: one probe pass (the layers calibration did not run) + for every layer one forward and S backward passes
of the probe: about (2 + 2·S) × probe_tokens token-layer passes (a backward ≈ 2 forwards), independent of the
number of linears. (Running S copies of the probe forward instead, as this once did, cost (1 + 3·S).)
Devices: the backward needs autograd through every op; the Triton kernels used on CUDA have none, so the
recompute runs with the torch reference ops (settings.override(kernels="reference")) on every device, and
ε with the device's own FP8 product (torch._scaled_mm on CUDA where the shapes allow), the FP8 weights
quantized on the device. (mamba-ssm's chunk scan has a Triton backward, 4.4 against 27.5 ms per 8B layer for
16 × 512 tokens on an H200, but autotuning it took ~60 s in every new process: more than the whole analysis.)
The saved states calibration kept were computed with the device's kernels (equal to the reference up to
rounding).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nemoconv import settings
from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import fp8_linear
from nemoconv.quant.calibrate import _EXPERT, TOKENS_PER_BATCH, _build_block, _layer_context, _source_index
from nemoconv.quant.layer_reads import layer_reader, read_ahead, read_hf
from nemoconv.quant.sweep import COMPARE_ELEMENTS, _final_weights, _fp8_weights, layer_of
from nemoconv.storage.safetensors_io import TensorReader

LABEL_SAMPLES = 4          # label sets drawn per probe row (the estimate's noise falls as 1/√(rows × samples))
SEED = 20250119            # the label sampler's seed: the same probe gives the same estimate


@dataclass
class FisherEstimate:
    kl: dict[str, float]                      # linear → estimated mean KL per position, only it FP8
    group_kl: dict[str, float]                # group → estimated mean KL, all its linears FP8
    label_samples: int
    positions: int
    saved_bytes: int                          # the forward's saved hidden states (see the module docstring)
    row_sums: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)   # linear → X_r [S·rows]
    # the unquantized hidden states at every layer boundary (compare_variants' `reference`; drop them after)
    hidden: list[torch.Tensor] = field(default_factory=list, repr=False)


def estimate_kl(ck: Checkpoint, ids: torch.Tensor, linears: list[str], input_amax: dict[str, float],
                device: torch.device, dtype: torch.dtype, groups: dict[str, str] | None = None,
                label_samples: int = LABEL_SAMPLES, seed: int = SEED, progress=None,
                sqnr: dict[str, float] | None = None, kept: list[torch.Tensor] | None = None,
                kept_layers=None) -> FisherEstimate:
    """The estimate for every linear in `linears` (HF names; each needs an input amax) on `ids` [n, s];
    `groups` (linear → group name) also gives each group's estimate; `sqnr`, when given, receives every FP8
    weight's SQNR in dB. `kept` (run_calibration's, with keep_rows = n) spares the forward pass up to the last
    layer calibration ran: the forward continues from there. `kept_layers` (layer_reads.KeptLayers): layers
    already on the GPU."""
    if isinstance(label_samples, bool) or not isinstance(label_samples, int) or label_samples < 1:
        raise NemoconvError(f"label samples must be a positive integer, got {label_samples!r}")
    spec = ck.spec
    n_layers = len(spec.layer_codes)
    by_layer: dict[int, set[str]] = {}
    for m in linears:
        by_layer.setdefault(layer_of(m), set()).add(m)
    index = _source_index(ck)
    rows = max(1, TOKENS_PER_BATCH.get(device.type, 2048) // ids.shape[1])
    slots = label_samples * ids.shape[0]                 # row k·n + j: probe row j under label set k
    sums = {m: torch.zeros(slots, dtype=torch.float64, device=device) for m in linears}
    steps = 2 * n_layers + 1
    with layer_reader(device) as reader:
        # the forward with the device's kernels (as calibration and the exact sweep, which reuses the states);
        # the backward with ops autograd can differentiate
        saved = _forward(ck, ids, index, reader, device, dtype, list(kept or []),
                         lambda d: progress and progress(d, steps), kept_layers)
        saved_bytes = sum(h.numel() * h.element_size() for h in saved)
        with settings.override(kernels="reference"):
            grad = _head_gradient(ck, reader, saved[-1], label_samples, seed, device, dtype, kept_layers)
            if progress:
                progress(n_layers + 1, steps)
            first = min(by_layer, default=n_layers)                                  # none below the first target
            for i, tensors in read_ahead(ck, index, reader, range(n_layers - 1, first - 1, -1), kept_layers):
                weights = _fp8_weights(tensors, by_layer.get(i, set()), input_amax, device, sqnr, widen=True)
                block = _build_block(spec, i, tensors, device, dtype)
                del tensors
                grad = _backward_layer(block, i, saved[i], grad, weights, rows, sums)
                block.to_empty(device="meta")
                del block
                if progress:
                    progress(steps - i, steps)
        if progress:
            progress(steps, steps)
    positions = ids.numel()
    scale = 1.0 / (2 * label_samples * positions)
    kl = {m: float(x.pow(2).sum()) * scale for m, x in sums.items()}
    group_kl: dict[str, float] = {}
    if groups:
        members: dict[str, torch.Tensor] = {}
        for m, g in groups.items():
            if m in sums:
                members[g] = members[g] + sums[m] if g in members else sums[m].clone()
        group_kl = {g: float(x.pow(2).sum()) * scale for g, x in members.items()}
    return FisherEstimate(kl, group_kl, label_samples, positions, saved_bytes, sums, saved)


def _forward(ck: Checkpoint, ids: torch.Tensor, index: dict, reader: TensorReader, device, dtype,
             saved: list[torch.Tensor], progress, kept_layers=None) -> list[torch.Tensor]:
    """Every layer's input hidden state on the probe, and the last layer's output: n_layers + 1 tensors
    (continuing after those already `saved`)."""
    spec = ck.spec
    ctx = _layer_context()
    if saved and (len(saved) > len(spec.layer_codes) + 1 or saved[0].shape[:2] != ids.shape):
        raise NemoconvError("internal error: the kept calibration states do not match the probe")
    with torch.no_grad():
        if not saved:
            embed = dict(read_hf(ck, index.get("embed", []), reader))["backbone.embeddings.weight"]
            saved.append(F.embedding(ids.to(device), embed.to(device=device, dtype=dtype)))
            del embed
        for i, tensors in read_ahead(ck, index, reader, range(len(saved) - 1, len(spec.layer_codes)), kept_layers):
            block = _build_block(spec, i, tensors, device, dtype)
            del tensors
            rows = max(1, TOKENS_PER_BATCH.get(device.type, 2048) // ids.shape[1])
            saved.append(torch.cat([block(h, ctx) for h in saved[-1].split(rows)]))
            block.to_empty(device="meta")
            del block
            progress(i + 1)
    return saved


def _head_gradient(ck: Checkpoint, reader: TensorReader, hidden: torch.Tensor, samples: int, seed: int,
                   device, dtype, kept_layers=None) -> torch.Tensor:
    """∂ Σ_t log p(y_t) / ∂ hidden for S label sets y ~ p drawn per position: [S·n, s, width], copy k at rows
    k·n … (k+1)·n − 1. Through the logits z = head(norm_f(h)): ∂/∂normed = W[y] − pᵀW, then norm_f's VJP."""
    norm_w, head_w = _final_weights(ck, reader, device, dtype, kept_layers)
    eps = ck.spec.layer_norm_epsilon
    n, s, width = hidden.shape
    flat = hidden.reshape(-1, width)
    head32 = head_w.float()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(samples, n * s, width, dtype=dtype, device=device)
    span = max(1, COMPARE_ELEMENTS.get(device.type, COMPARE_ELEMENTS["cpu"]) // head_w.shape[0])
    for a in range(0, flat.shape[0], span):
        h = flat[a:a + span]
        with torch.no_grad():
            logits = F.linear(kernels.rmsnorm(h.to(norm_w.dtype), norm_w, eps), head_w).float()
            p = torch.softmax(logits, dim=-1)
            labels = _draw_labels(p, samples, gen)                                         # [t, S]
            d_normed = head32[labels.t()] - (p @ head32)                                   # [S, t, width]
        x = h.detach().expand(samples, -1, -1).clone().requires_grad_(True)
        with torch.enable_grad():
            normed = kernels.rmsnorm(x.to(norm_w.dtype), norm_w, eps)
            (g,) = torch.autograd.grad((normed * d_normed.to(normed.dtype)).sum(), x)
        out[:, a:a + span] = g
    return out.view(samples * n, s, width)


def _draw_labels(p: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
    """`samples` labels per position from the model's own distribution p [t, V] → [t, S]."""
    return torch.multinomial(p, samples, replacement=True, generator=gen)


def _backward_layer(block, i: int, h_in: torch.Tensor, grad: torch.Tensor, weights: dict, rows: int,
                    sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient at layer i's input (same layout as `grad`, the gradient at its output: row k·n + j is probe
    row j under label set k), adding each target linear's per-row gᵀε to `sums`. The forward is rerun from
    the saved input `h_in` [n, s, width] with autograd, `rows` probe rows at a time, once: the S label sets
    differ only in the output gradient, so each is one backward pass through the same graph (S copies of
    the rows, as before, cost S forwards and S times the graph's memory). ε, each target linear's FP8 error
    on its input, is computed once per chunk and shared by the S passes."""
    ctx = _layer_context()
    n = h_in.shape[0]
    label_sets = grad.shape[0] // n
    taps = _Taps(block, i, set(weights))
    out_grad = torch.empty_like(grad)
    try:
        for j0 in range(0, n, rows):
            j1 = min(n, j0 + rows)
            x = h_in[j0:j1].detach().requires_grad_(True)
            taps.clear()
            with torch.enable_grad():
                y = block(x, ctx)
            records = list(taps.records)
            outs = [r.output for r in records]
            with torch.no_grad():
                errors = [_fp8_error(r, weights[r.module]) for r in records]
                probe_rows = [taps.token_rows(r, x.shape[1]) + j0 for r in records]   # of each input position
            for k in range(label_sets):
                with torch.enable_grad():
                    # a scalar's gradient: no grad_outputs, whose shape check imports sympy (~1 s of CPU) once
                    grads = torch.autograd.grad((y * grad[k * n + j0:k * n + j1].to(y.dtype)).sum(), [x] + outs,
                                                retain_graph=k < label_sets - 1, allow_unused=True)
                out_grad[k * n + j0:k * n + j1] = grads[0]
                with torch.no_grad():
                    for record, eps, at, g in zip(records, errors, probe_rows, grads[1:]):
                        if g is not None:
                            dots = (g.reshape(-1, g.shape[-1]).float() * eps).sum(-1)
                            sums[record.module].index_add_(0, at + k * n, dots.double())
    finally:
        taps.remove()
    return out_grad


def _fp8_error(record, fp8_weight: tuple) -> torch.Tensor:
    """ε = L_fp8(x) − L(x) [positions, out] in float32 for one linear call, x the input it saw."""
    q, weight_scale, input_scale = fp8_weight
    x = record.input.reshape(-1, record.input.shape[-1])
    out = record.output.detach()
    out = out.reshape(-1, out.shape[-1])
    return fp8_linear(x, q, weight_scale, input_scale, record.linear.bias).float() - out.float()


@dataclass
class _Record:
    module: str
    linear: torch.nn.Module
    input: torch.Tensor
    output: torch.Tensor
    expert: int | None


class _Taps:
    """Forward hooks on a block's target linears (their input and output in the autograd graph) and on a
    MoE's router (its expert choice, to know which token each expert row is)."""

    def __init__(self, block, i: int, modules: set[str]):
        self.records: list[_Record] = []
        self.routes: torch.Tensor | None = None
        self._by_expert: tuple[torch.Tensor, list[int]] | None = None   # token order by expert, expert starts
        self.handles = []
        prefix = f"backbone.layers.{i}."
        for m in sorted(modules):
            lin = block.get_submodule(m[len(prefix):])
            e = _EXPERT.match(m)
            self.handles.append(lin.register_forward_hook(self._keep(m, int(e.group(2)) if e else None)))
        gate = getattr(block.mixer, "gate", None)
        if gate is not None and hasattr(block.mixer, "experts"):
            self.experts = len(block.mixer.experts)
            self.handles.append(gate.register_forward_hook(self._route))

    def _keep(self, module: str, expert: int | None):
        def hook(lin, args, output):
            self.records.append(_Record(module, lin, args[0].detach(), output, expert))
        return hook

    def _route(self, gate, args, output):
        self.routes = output[1].detach()
        self._by_expert = None

    def clear(self) -> None:
        self.records.clear()
        self.routes = None
        self._by_expert = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def token_rows(self, record: _Record, seq: int) -> torch.Tensor:
        """The chunk row of each position of the linear's input. A routed expert sees the tokens that chose
        it, in the order MoE._routed_loop visits them: sorted by expert, stable."""
        count = record.input.numel() // record.input.shape[-1]
        device = record.input.device
        if record.expert is None:
            return torch.arange(count, device=device) // seq
        if self._by_expert is None:   # once per routing, for all of the layer's expert linears
            flat = self.routes.reshape(-1)
            counts = torch.bincount(flat, minlength=self.experts).tolist()
            self._by_expert = (torch.argsort(flat, stable=True), [0, *itertools.accumulate(counts)])
        order, starts = self._by_expert
        start, chose = starts[record.expert], starts[record.expert + 1] - starts[record.expert]
        if chose != count:
            raise NemoconvError(f"internal error: {record.module} saw {count} tokens, its router chose {chose}")
        return order[start:start + count] // self.routes.shape[1] // seq


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        return math.nan

    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(t):           # ties share their mean rank
            same = t == value
            r[same] = r[same].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


__all__ = ["LABEL_SAMPLES", "FisherEstimate", "estimate_kl", "spearman"]
