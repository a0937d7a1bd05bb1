"""The prefix-cache check of `verify --prefix-cache`: the serving engine's caching modes must change nothing.

Generates prompts that share a prefix with caching off, `memory` and `state` (`nemoconv.serving`), and
compares the tokens and the logits of every step.
"""

from __future__ import annotations

import torch

from nemoconv.model.modeling import NemotronHLM
from nemoconv.serving.engine import PrefixCachingEngine, resolve_prefill_chunk
from nemoconv.verification.metrics import first_divergence


def check_prefix_caching(model: NemotronHLM, prompts: list[list[int]], max_new_tokens: int,
                         block_size: int | None = None, prefill_chunk: int | None = None, tolerance=None) -> dict:
    """Generate `prompts` (which should share a prefix of at least one prefill chunk) with caching off,
    `memory` and `state`, each on a fresh engine with the engine's defaults: the modes must give the
    same tokens as off and the same logits at every step (max |Δ| ≤ tolerance(max |logit|), 0 when
    tolerance is None; by construction they are bit-identical, reported as `first_logits_bitwise`, for
    the prefill's output, and `logits_bitwise`, for every step), and `state` must have skipped prompt
    tokens (else it proved nothing).
    → {"passed", "failure", "modes": {mode: {identical, first_logits_bitwise, logits_bitwise,
       first_divergence, max_abs_diff, stats, ttft_s}}, …}"""
    B = block_size or max(16, model.spec.chunk_size)
    room = sum(-(-(len(p) + max_new_tokens) // B) * B for p in prompts)      # every prompt's blocks, unshared
    kw = dict(block_size=B, max_tokens=room, max_batch=min(8, len(prompts)), prefill_chunk=prefill_chunk)
    baseline = PrefixCachingEngine(model, mode="off", **kw).generate(prompts, max_new_tokens, return_logits=True)
    largest = max(float(x[0].abs().max()) for x in baseline.logits)
    limit = float(tolerance(largest)) if tolerance is not None else 0.0
    out = {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "max_new_tokens": max_new_tokens,
           "prefill_chunk": resolve_prefill_chunk(prefill_chunk, B),
           "max_abs_logit": largest, "max_abs_allowed": limit, "modes": {}, "failure": None}
    for mode in ("memory", "state"):
        got = PrefixCachingEngine(model, mode=mode, **kw).generate(prompts, max_new_tokens, return_logits=True)
        diverge = [first_divergence(a, b) for a, b in zip(baseline.tokens, got.tokens)]
        # the prefill's logits (first new token) carry everything the cache reused; decode steps follow
        # from the reused blocks and states too (rows stop comparing where their tokens diverge)
        diff = max(float((a[:n] - b[:n]).abs().max()) for a, b in zip(baseline.logits, got.logits)
                   for n in [min(len(a), len(b))])
        out["modes"][mode] = {"identical": all(d is None for d in diverge),
                              "first_logits_bitwise": all(torch.equal(a[0], b[0])
                                                          for a, b in zip(baseline.logits, got.logits)),
                              "logits_bitwise": all(torch.equal(a, b) for a, b in zip(baseline.logits, got.logits)),
                              "first_divergence": diverge,
                              "max_abs_diff": diff, "stats": got.stats.as_dict(),
                              "ttft_s": [round(t, 4) for t in got.ttft_s]}
        if out["failure"] is not None:
            continue
        if any(d is not None for d in diverge):
            row = next(i for i, d in enumerate(diverge) if d is not None)
            out["failure"] = (f"prefix cache ({mode}): prompt {row} generates other tokens than without caching "
                              f"from new token {diverge[row]}")
        elif not diff <= limit:
            out["failure"] = (f"prefix cache ({mode}): logits differ from caching off by {diff:.3g} "
                              f"(allowed {limit:.3g})")
    if out["failure"] is None and out["modes"]["state"]["stats"]["tokens_skipped"] == 0:
        warnings = out["modes"]["state"]["stats"]["warnings"]
        out["failure"] = ("prefix cache (state): no prompt token was skipped, so nothing was checked"
                          + (f" ({warnings[0]})" if warnings else ""))
    out["passed"] = out["failure"] is None
    out["ttft_off_s"] = [round(t, 4) for t in baseline.ttft_s]
    return out
