"""Running one checkpoint in the built-in model over the prompt batch (one model in memory at a time).

For every prompt of exactly `seq_len` tokens:

  cached run   prefill(prompt[:S-k]) → k teacher-forced decode steps over prompt[S-k:] → greedy
               decode of `new_tokens` tokens; the logits of every cached step are kept;
  full forward over prompt + generated tokens (no cache), one call.

The full forward's prompt positions are what the gate compares between the two checkpoints; the cached logits
against the full forward at the same positions give cache consistency. `start_warmup` compiles the GPU kernels
for exactly these shapes while the first model loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemoconv.model.cuda import warmup
from nemoconv.model.loading import load_model
from nemoconv.serving.engine import resolve_prefill_chunk
from nemoconv.storage.config import ModelSpec
from nemoconv.verification.metrics import cache_consistency
from nemoconv.verification.prefix_check import check_prefix_caching
from nemoconv.verification.profiles import exact_cuda_tolerance
from nemoconv.verification.prompts import Prompt

TEACHER_FORCED_STEPS = 4       # prompt tokens fed one at a time after the prefill (cache hand-off check)
LOGITS_BATCH_BYTES = 1 << 30   # prompts per batch: keep one batch's logits under ~1 GiB


@dataclass
class ModelRun:
    """What one model produced over the prompt batch."""

    prompt_logits: list[torch.Tensor]       # per prompt [S, V], on CPU, model output dtype
    generated: list[list[int]]              # per prompt, the greedy continuation
    cache: list[dict]                       # per prompt, cache consistency vs its full forward
    nonfinite: int = 0
    timings: dict = field(default_factory=dict)
    prefix_cache: dict | None = None        # check_prefix_caching's result (--prefix-cache, candidate only)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_model(path: Path, device: torch.device, dtype: torch.dtype):
    model = load_model(path, device=device, dtype=dtype)
    warmup.wait_all()  # the kernel warm-up (start_warmup) is done before the model runs anything
    return model


def prompts_per_batch(seq_len: int, new_tokens: int, vocab: int) -> int:
    """How many prompts run together: one batch's float32 logits stay under LOGITS_BATCH_BYTES."""
    return max(1, LOGITS_BATCH_BYTES // ((seq_len + new_tokens) * 4 * max(1, vocab)))


def start_warmup(spec: ModelSpec, device: torch.device, dtype: torch.dtype, fp8: bool, num_prompts: int,
                 seq_len: int, new_tokens: int) -> None:
    """On CUDA, compile the GPU kernels for run_model's shapes on a background thread while the reference
    loads (nemoconv.model.cuda.warmup); _load_model waits for it before the model runs."""
    k_steps = min(TEACHER_FORCED_STEPS, seq_len - 1)
    batch = min(num_prompts, prompts_per_batch(seq_len, new_tokens, spec.vocab_size))
    warmup.start(spec, device, dtype, fp8=fp8, batch=batch,
                 prefill=seq_len - k_steps, steps=k_steps + new_tokens, forward=seq_len + max(new_tokens - 1, 0))


def cached_greedy(model, ids: torch.Tensor, k: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ids[:, :S-k], teacher-force ids[:, S-k:] one token at a time, then greedy-decode.

    Returns (generated [B, new_tokens], cached logits [B, k + max(new_tokens, 1), V]) where the cached
    logits are those of positions S-k-1 … S-1+max(new_tokens-1, 0), in order.
    """
    b, s = ids.shape
    cache = model.new_cache(b, s + max(new_tokens, 1))
    steps = [model.prefill(ids[:, : s - k], cache, last_only=True)]  # [B, V] at position S-k-1
    for j in range(s - k, s):
        steps.append(model.decode_step(ids[:, j], cache))           # [B, V] at position j
    generated = []
    for i in range(new_tokens):
        nxt = steps[-1].argmax(-1)                                  # greedy, first index on ties
        generated.append(nxt)
        if i < new_tokens - 1:
            steps.append(model.decode_step(nxt, cache))
    gen = torch.stack(generated, 1) if generated else ids.new_zeros(b, 0)
    return gen, torch.stack(steps, 1)


def run_model(path: Path, device: torch.device, dtype: torch.dtype, prompts: list[Prompt], seq_len: int,
              new_tokens: int, extend_short: bool, progress=None, prefix_cache: bool = False) -> ModelRun:
    """Load one checkpoint and run every prompt through the cached path and the full forward (and,
    with prefix_cache, generate prompts sharing a long prefix with each prefix-caching mode)."""
    t0 = time.perf_counter()
    model = _load_model(path, device, dtype)
    _sync(device)
    timings = {"load": time.perf_counter() - t0}
    with torch.inference_mode():
        if extend_short:  # the reference writes the missing tokens of short prompts (deterministic greedy)
            timings["extend"] = _extend_short_prompts(model, prompts, seq_len, device)
        run = _run_batches(model, prompts, seq_len, new_tokens, device, progress, timings)
        if prefix_cache:
            run.prefix_cache, timings["prefix_cache"] = _check_prefix_cache(model, prompts, new_tokens, device, dtype)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run.timings = timings
    return run


def _extend_short_prompts(model, prompts: list[Prompt], seq_len: int, device: torch.device) -> float:
    """Extend each prompt shorter than seq_len by the model's greedy continuation; the seconds it took."""
    t0 = time.perf_counter()
    for p in prompts:
        if len(p.ids) < seq_len:
            ids = torch.tensor([p.ids], device=device)
            out = model.generate(ids, max_new_tokens=seq_len - len(p.ids))
            p.extended_from = len(p.ids)
            p.ids = out[0].tolist()[:seq_len]
    _sync(device)
    return time.perf_counter() - t0


def _run_batches(model, prompts: list[Prompt], seq_len: int, new_tokens: int, device: torch.device, progress,
                 timings: dict) -> ModelRun:
    """The cached run and the full forward of every prompt, batch by batch; adds to timings' generate/forward."""
    k = min(TEACHER_FORCED_STEPS, seq_len - 1)
    run = ModelRun([], [], [])
    timings["generate"] = timings["forward"] = 0.0
    per_batch = prompts_per_batch(seq_len, new_tokens, _vocab_of(model))
    for start in range(0, len(prompts), per_batch):
        batch = prompts[start:start + per_batch]
        ids = torch.tensor([p.ids for p in batch], device=device)
        t0 = time.perf_counter()
        gen, cached = cached_greedy(model, ids, k, new_tokens)
        _sync(device)
        timings["generate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        full_ids = torch.cat([ids, gen[:, : max(new_tokens - 1, 0)]], 1)
        full = model(full_ids)                                   # [B, S + N - 1, V]
        _sync(device)
        timings["forward"] += time.perf_counter() - t0
        for r in range(len(batch)):
            run.cache.append(cache_consistency(cached[r], full[r, seq_len - k - 1:]))
            run.prompt_logits.append(full[r, :seq_len].to("cpu", copy=True))
            run.generated.append(gen[r].tolist())
            run.nonfinite += int((~torch.isfinite(full[r, :seq_len])).sum())
        if progress:
            progress(len(batch))
    return run


def _check_prefix_cache(model, prompts: list[Prompt], new_tokens: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[dict, float]:
    """check_prefix_caching over prompts sharing a long prefix: (its result, the seconds it took)."""
    t0 = time.perf_counter()
    # exact: bit-identical on the CPU; on CUDA within the exact profile's few ulps
    rule = (lambda largest: exact_cuda_tolerance(largest, dtype)) if device.type == "cuda" else None
    result = check_prefix_caching(model, shared_prefix_prompts(prompts, model.spec.chunk_size),
                                  max(new_tokens, 1), tolerance=rule)
    _sync(device)
    return result, time.perf_counter() - t0


def shared_prefix_prompts(prompts: list[Prompt], block: int) -> list[list[int]]:
    """Prompts for the prefix-cache check: one long prefix (the prompts' own tokens, repeated to one
    prefill chunk of the engine, where the first Mamba state checkpoint lies, and half a KV block more,
    so it ends inside a block), then each prompt as its own suffix; the first prompt comes twice (an
    exact repeat)."""

    block = max(16, block)
    pool = [t for p in prompts for t in p.ids]
    length = resolve_prefill_chunk(None, block) + block // 2
    prefix = (pool * (length // len(pool) + 1))[:length]
    suffixes = [p.ids for p in prompts] + [prompts[0].ids]
    return [prefix + s for s in suffixes]


def _vocab_of(model) -> int:
    spec = getattr(model, "spec", None)
    return getattr(spec, "vocab_size", 0) or 0
