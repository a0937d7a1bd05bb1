"""Verify a checkpoint larger than the device: the model runs one layer at a time over all prompts.

`run_model_streamed` computes what `run_model` computes (prompt logits, greedy continuation, cache consistency)
without ever holding the whole model. Design:

* Layer-major. A *pass* reads the checkpoint's layers in order; each layer is built on the device (by
  `model.layers`, i.e. by `build_model`: the same parameters, dtypes and scales as in the whole model), every
  prompt batch's hidden states go through it, and it is freed before the next one is built. The next layer's
  tensors are read on a thread meanwhile. The embeddings and the head (`ends`) stay on the device.
* Both checkpoints are run this way, one after the other (verify runs one model at a time anyway), over the
  same batches as the whole-model path (same rows per batch), so on the CPU every operation sees the same
  shapes and values: the logits are bit-identical to `run_model`'s (tests/test_streamed_verify.py). On CUDA
  the streamed blocks run the unfused path (no residual+norm fusion across layers), so the logits agree
  within the profile, not bitwise, with the whole-model path; reference and candidate both stream, so exact
  comparisons between them still compare like with like.
* Caches. The cached path needs a cache per layer: each layer gets its own one-layer `HybridCache` per batch
  (KV for attention, conv+SSM state for Mamba, nothing for MLP/MoE); they are small (tens of MiB per layer
  for an 8B model and a few prompts) and stay on the device between passes.
* Generation. Pass 1 does, per layer: the prefill of prompt[:S-k], the k teacher-forced decode steps, and the
  full forward (no cache). The first greedy token follows from pass 1; each further greedy token needs the
  whole network again, so the reference's free greedy continuation of N tokens costs N-1 more passes over
  the weights (one decode step of all prompts per pass), and then one pass for the full forward over
  prompt + continuation (N+1 passes in all). The candidate does not need its own free generation: given the
  reference's continuation (`follow`), it is teacher-forced on it in pass 1 (k + N-1 decode steps and the
  full forward over prompt + continuation), and its greedy token at each position is its argmax there. Up to
  the first position where that argmax differs from the reference's token the inputs are the same as in
  free greedy decoding, so the first divergence — what verify compares — is the same; only the tokens after
  it differ (they are the candidate's choices on the reference's prefix). One pass instead of N+1.
  With few prompts a decode pass is bound by reading the weights; on a GPU with enough host memory the
  layers read once are kept in host memory (`weights_kept_in_host`), so later passes copy from there.
* Memory. The device holds the ends, one built layer, the estimated activations of a layer call, and the
  hidden states and caches of every batch; on the CPU also the next layer's tensors being read (two layers).
  When the hidden states and caches do not fit under the cap they are spilled to host memory, and each batch
  is brought in for its turn at a layer. Every resident tensor is entered in a `Ledger` (real bytes); a cap
  is enforced there and checked before the run (`_Plan`): a cap that cannot hold one layer plus its
  activations and one batch is a NemoconvError with one line.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.model import layers
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.verification.memory import Ledger, Plan, available_memory
from nemoconv.verification.metrics import cache_consistency
from nemoconv.verification.prompts import Prompt

# The one place this module reaches into the verify command (ModelRun and its constants move to
# nemoconv/verification/runner.py).
from nemoconv.verification.runner import TEACHER_FORCED_STEPS, ModelRun, prompts_per_batch


@dataclass
class StreamedRun(ModelRun):
    memory: dict = field(default_factory=dict)   # the ledgers' caps and peaks, spill, passes over the weights


@dataclass
class _Batch:
    ids: torch.Tensor                                  # [B, S] on the CPU
    pre: torch.Tensor | None = None                    # hidden states of the prefill's tokens
    steps: list = field(default_factory=list)          # hidden [B, 1, h] of each teacher-forced token
    full: torch.Tensor | None = None                   # hidden states of the full forward's tokens
    caches: dict = field(default_factory=dict)         # layer → its HybridCache for this batch
    logits: list = field(default_factory=list)         # cached logits [B, V] on the CPU, in position order
    generated: list = field(default_factory=list)      # greedy tokens [B]

    def tensors(self):
        yield from (t for t in [self.pre, self.full, *self.steps] if t is not None)
        for c in self.caches.values():
            yield from (c.kv, c.conv, c.ssm, c.valid)


class _Streamer:
    """The layers of one checkpoint, streamed onto a device, with the memory they and the states hold."""

    def __init__(self, path, device: torch.device, dtype: torch.dtype, max_gpu: int | None, max_host: int | None):
        self.ck = open_checkpoint(path)
        self.spec, self.device, self.dtype = self.ck.spec, device, dtype
        self.index = layers.piece_names(self.ck)
        if device.type == "cpu":  # one memory: both caps apply to it
            caps = [c for c in (max_gpu, max_host) if c is not None]
            self.dev = self.host = Ledger("host", min(caps) if caps else None, "--max-gpu-memory/--max-host-memory")
        else:
            self.dev = Ledger(str(device), max_gpu, "--max-gpu-memory")
            self.host = Ledger("host", max_host, "--max-host-memory")
        self.max_host = max_host
        self.plan: Plan | None = None
        self.kept: dict = {}           # piece → its tensors, read once (weights kept in host memory)
        self.passes = 0
        self.load_s = 0.0
        self.keep_weights = False
        self.reader = TensorReader()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemoconv-stream")
        self.ends = None               # built by the first `prepare`, once the plan has passed the caps

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.reader.close()
        if self.ends is not None:
            layers.release(self.ends)

    # ---- memory ------------------------------------------------------------------------------------
    def prepare(self, batches: list[_Batch], hidden_tokens: int, positions: int, cache_length: int,
                keep_caches: bool) -> None:
        """Check that the run fits the caps, and decide the spill and the host copy of the weights."""
        self.plan = Plan.make(self.ck, self.index, self.dtype, self.device, [len(b.ids) for b in batches],
                              hidden_tokens, positions, cache_length, keep_caches, self.dev.cap, self.host.cap)
        self.dev.set("activations (estimated)", self.plan.activations)
        if self.device.type != "cpu" and not self.kept:
            budget = self.max_host if self.max_host is not None else available_memory(torch.device("cpu")) // 2
            self.keep_weights = self.plan.host_need + self.plan.all_source <= budget
        if self.ends is None:
            t0 = time.perf_counter()
            self.ends = layers.build_ends(self.spec, self._read(layers.ENDS), self.device, self.dtype)
            self.dev.set("ends", layers.module_bytes(self.ends))
            self.load_s += time.perf_counter() - t0

    @property
    def home(self) -> torch.device:
        """Where hidden states and caches live between their turns."""
        return torch.device("cpu") if self.plan is not None and self.plan.spill else self.device

    def account(self, batches: list[_Batch]) -> None:
        """Enter the bytes every batch's states hold, by the memory they are in."""
        on_dev = on_host = 0
        for b in batches:
            for t in b.tensors():
                n = t.numel() * t.element_size()
                if t.device == self.device:
                    on_dev += n
                else:
                    on_host += n
        self.dev.set("hidden states and caches", on_dev)
        if self.host is not self.dev:
            self.host.set("spilled hidden states and caches", on_host)

    # ---- weights -----------------------------------------------------------------------------------
    def _read(self, piece) -> list:
        if piece in self.kept:
            return self.kept[piece]
        tensors = layers.read_piece(self.ck, self.index.get(piece, []), self.reader)
        if self.keep_weights:
            self.kept[piece] = tensors
            self.host.set("weights kept in host memory", sum(t.numel() * t.element_size() for _, t in
                                                             (x for v in self.kept.values() for x in v)))
        return tensors

    def layers(self):
        """(i, layer i built on the device) for every layer, each freed when the next is asked for."""
        self.passes += 1
        n = self.spec.num_layers
        pending = self._read_ahead(0)
        for i in range(n):
            t0 = time.perf_counter()
            tensors = pending.result()
            block = layers.build_layer(self.spec, i, tensors, self.device, self.dtype)
            del tensors
            self.host.drop(("read-ahead", i))
            self.dev.set(("layer", i), layers.module_bytes(block))
            # the next layer is read while this one runs (after the build: never three layers at once)
            pending = self._read_ahead(i + 1) if i + 1 < n else None
            self.load_s += time.perf_counter() - t0
            yield i, block
            layers.release(block)
            self.dev.drop(("layer", i))

    def _read_ahead(self, i: int):
        if i not in self.kept:
            self.host.set(("read-ahead", i), self.plan.source_bytes[i])
        return self.pool.submit(self._read, i)

    def summary(self) -> dict:
        out = {"device": self.dev.summary(), "weight_passes": self.passes,
               "spilled": bool(self.plan and self.plan.spill), "weights_kept_in_host": bool(self.kept)}
        if self.host is not self.dev:
            out["host"] = self.host.summary()
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


# ---- the passes ----------------------------------------------------------------------------------


def _first_pass(st: _Streamer, batches: list[_Batch], keep_caches: bool) -> None:
    """Per layer and batch: prefill, teacher-forced decode steps, full forward; then the cached logits."""
    dev, home = st.device, st.home
    for i, block in st.layers():
        for b in batches:
            cache = layers.layer_cache(st.spec, i, len(b.ids), st.plan.cache_length, dev, st.dtype)
            b.pre = layers.layer_prefill(block, b.pre.to(dev), cache).to(home)
            b.steps = [layers.layer_decode(block, h.to(dev), cache).to(home) for h in b.steps]
            if b.full is not None:
                b.full = layers.layer_forward(block, b.full.to(dev)).to(home)
            b.caches[i] = layers.move_cache(cache, home)
            st.account(batches)
            if not keep_caches:  # nothing decodes after this pass: the cache was only for the k steps
                del b.caches[i]
    for b in batches:
        b.logits = [layers.head_logits(st.ends, b.pre.to(dev), "position").cpu()]
        b.logits += [layers.head_logits(st.ends, h.to(dev), "step").cpu() for h in b.steps]
        b.pre, b.steps = None, []
    st.account(batches)


def _decode_pass(st: _Streamer, batches: list[_Batch], last: bool) -> None:
    """One greedy step of every batch: the last token through every layer's cache, one pass over the weights."""
    dev, home = st.device, st.home
    hidden = [layers.embed(st.ends, b.generated[-1].reshape(-1, 1)).to(home) for b in batches]
    for i, block in st.layers():
        for j, b in enumerate(batches):
            cache = layers.move_cache(b.caches[i], dev)
            hidden[j] = layers.layer_decode(block, hidden[j].to(dev), cache).to(home)
            b.caches[i] = layers.move_cache(cache, home)
            st.account(batches)
            if last:  # the last decode step: this layer's cache is done with
                del b.caches[i]
    for b, h in zip(batches, hidden):
        b.logits.append(layers.head_logits(st.ends, h.to(dev), "step").cpu())
        b.generated.append(b.logits[-1].argmax(-1))


def _full_pass(st: _Streamer, batches: list[_Batch]) -> None:
    dev, home = st.device, st.home
    for _, block in st.layers():
        for b in batches:
            b.full = layers.layer_forward(block, b.full.to(dev)).to(home)
            st.account(batches)


def _greedy(st: _Streamer, batches: list[_Batch], k: int, new_tokens: int, follow: list | None,
            full: bool) -> None:
    """`cached_greedy` for every batch, layer-major: prefill ids[:S-k], k teacher-forced steps, greedy decoding
    (b.logits, b.generated); with `full`, also the full forward's hidden states over prompt + continuation
    (b.full). `follow` (per batch [B, N]): teacher-force that continuation instead of decoding (one pass)."""
    s = batches[0].ids.shape[1]
    more = max(new_tokens - 1, 0)                       # continuation tokens fed back into the model
    given = follow if follow is not None else [None] * len(batches)
    one_pass = follow is not None or new_tokens <= 1
    teacher = [b.ids[:, s - k:] if f is None else torch.cat([b.ids[:, s - k:], f[:, :more]], 1)
               for b, f in zip(batches, given)]
    full_now = full and one_pass
    st.prepare(batches, hidden_tokens=s + teacher[0].shape[1] + (s + more if full_now else 0),
               positions=s + more if full else s, cache_length=s + max(new_tokens, 1), keep_caches=not one_pass)
    for b, t, f in zip(batches, teacher, given):
        b.pre = layers.embed(st.ends, b.ids[:, :s - k]).to(st.home)
        b.steps = [layers.embed(st.ends, t[:, j:j + 1]).to(st.home) for j in range(t.shape[1])]
        if full_now:
            b.full = layers.embed(st.ends, torch.cat([b.ids, f[:, :more]], 1) if f is not None else b.ids).to(st.home)
    _first_pass(st, batches, keep_caches=not one_pass)
    for b in batches:
        if follow is not None:
            b.generated = [lg.argmax(-1) for lg in b.logits[k:k + new_tokens]]
        elif new_tokens:
            b.generated = [b.logits[-1].argmax(-1)]
    if one_pass:
        return
    for step in range(1, new_tokens):
        _decode_pass(st, batches, last=step == new_tokens - 1)
    if full:
        for b in batches:
            gen = torch.stack(b.generated, 1)[:, :more]
            b.full = layers.embed(st.ends, torch.cat([b.ids, gen], 1)).to(st.home)
        _full_pass(st, batches)


# ---- the runner ----------------------------------------------------------------------------------


def _extend_prompts(st: _Streamer, prompts: list[Prompt], seq_len: int) -> None:
    """The reference writes the missing tokens of short prompts, one prompt at a time as `model.generate`."""
    for p in prompts:
        if len(p.ids) < seq_len:
            b = _Batch(torch.tensor([p.ids]))
            _greedy(st, [b], 0, seq_len - len(p.ids), None, full=False)
            p.extended_from = len(p.ids)
            p.ids = (p.ids + torch.stack(b.generated, 1)[0].tolist())[:seq_len]


def _batches(prompts: list[Prompt], seq_len: int, new_tokens: int, vocab: int) -> list[list[Prompt]]:
    per_batch = prompts_per_batch(seq_len, new_tokens, vocab)   # the same batches as run_model
    return [prompts[i:i + per_batch] for i in range(0, len(prompts), per_batch)]


def run_model_streamed(path, device: torch.device, dtype: torch.dtype, prompts: list[Prompt], seq_len: int,
                       new_tokens: int, extend_short: bool, progress=None, prefix_cache: bool = False, *,
                       max_gpu_memory: int | None = None, max_host_memory: int | None = None,
                       follow: list[list[int]] | None = None) -> StreamedRun:
    """`run_model` for a checkpoint streamed layer by layer (see the module docstring). `follow`: the
    reference's greedy continuation of each prompt, to teacher-force instead of decoding freely (one pass
    over the weights instead of new_tokens + 1; the same first divergence)."""
    if prefix_cache:
        raise NemoconvError("--prefix-cache needs the whole model: it cannot run with layer streaming")
    if follow is not None and (len(follow) != len(prompts) or any(len(f) != new_tokens for f in follow)):
        raise NemoconvError(f"follow: expected {len(prompts)} continuations of {new_tokens} tokens")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    st = _Streamer(path, device, dtype, max_gpu_memory, max_host_memory)
    timings = {"generate": 0.0, "forward": 0.0}
    run = StreamedRun([], [], [])
    try:
        with torch.inference_mode():
            if extend_short:
                t0 = time.perf_counter()
                _extend_prompts(st, prompts, seq_len)
                timings["extend"] = time.perf_counter() - t0
            k = min(TEACHER_FORCED_STEPS, seq_len - 1)
            groups = _batches(prompts, seq_len, new_tokens, st.spec.vocab_size)
            batches = [_Batch(torch.tensor([p.ids for p in g])) for g in groups]
            given = None
            if follow is not None:
                rows = iter(follow)
                given = [torch.tensor([next(rows) for _ in g], dtype=torch.int64).reshape(len(g), -1) for g in groups]
            t0, load0 = time.perf_counter(), st.load_s
            _greedy(st, batches, k, new_tokens, given, full=True)
            timings["generate"] = time.perf_counter() - t0 - (st.load_s - load0)   # reading layers is "load"
            t0 = time.perf_counter()
            for b in batches:
                _collect(st, b, run, seq_len, k, new_tokens)
                if progress:
                    progress(len(b.ids))
            timings["forward"] = time.perf_counter() - t0
    finally:
        st.close()
    timings["load"] = st.load_s
    run.timings, run.memory = timings, st.summary()
    return run


def _collect(st: _Streamer, b: _Batch, run: StreamedRun, seq_len: int, k: int, new_tokens: int) -> None:
    """The head over the full forward, and the batch's rows into the run, as `run_model` writes them."""
    full = layers.head_logits(st.ends, b.full.to(st.device))                 # [B, S + N - 1, V]
    cached = torch.stack(b.logits, 1).to(full.device)
    gen = torch.stack(b.generated, 1) if b.generated else b.ids.new_zeros(len(b.ids), 0)
    for r in range(len(b.ids)):
        run.cache.append(cache_consistency(cached[r], full[r, seq_len - k - 1:]))
        run.prompt_logits.append(full[r, :seq_len].to("cpu", copy=True))
        run.generated.append(gen[r].tolist())
        run.nonfinite += int((~torch.isfinite(full[r, :seq_len])).sum())
    b.full = None
