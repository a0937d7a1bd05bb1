"""The gate: which thresholds apply to this pair (`decide_gate`), what the two runs measured against each
other (`compare_runs`), and the checks that decide PASS or FAIL (`gate_checks`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.verification.metrics import LogitStats, first_divergence
from nemoconv.verification.profiles import (
    EXACT_CUDA_ULPS,
    cache_tolerance,
    decide_profile,
    exact_cuda_tolerance,
    fp8_count,
    override_list,
    resolve_thresholds,
)
from nemoconv.verification.prompts import Prompt, tokenizer_differences
from nemoconv.verification.report import format_number
from nemoconv.verification.runner import ModelRun


@dataclass
class Gate:
    """The thresholds this pair is held to, and how they came to be (the record keeps both)."""

    profile: str                 # the profile used
    reason: str                  # why
    given: bool                  # chosen with --profile, not auto
    auto: dict                   # what auto decides: {"name", "reason"} (name None where it cannot)
    thresholds: dict             # resolve_thresholds' result, with max_cache_relative
    tokenizer_diffs: list[str]
    allow_tokenizer_diff: bool
    overrides: list[str]         # everything the user changed about the gate, one line each

    def profile_record(self) -> dict:
        return {"name": self.profile, "reason": self.reason, "given": self.given, "auto": self.auto}


def decide_gate(ref_ck: Checkpoint, cand_ck: Checkpoint, profile: str, overrides: dict | None, dtype: torch.dtype,
                allow_tokenizer_diff: bool) -> Gate:
    """The profile (given or auto), its thresholds with the user's overrides, and the tokenizer differences."""
    chosen, reason, auto = decide_profile(ref_ck, cand_ck, profile)
    thresholds = resolve_thresholds(chosen, overrides)
    if thresholds.get("max_cache_relative") is None:
        thresholds["max_cache_relative"] = cache_tolerance(dtype, fp8_count(cand_ck) > 0)
    diffs = tokenizer_differences(ref_ck.path, cand_ck.path, (ref_ck.config, cand_ck.config))
    return Gate(chosen, reason, profile != "auto", auto, thresholds, diffs, allow_tokenizer_diff,
                override_list(chosen, auto, thresholds, allow_tokenizer_diff, diffs))


@dataclass
class Comparison:
    """The reference and candidate runs, side by side."""

    overall: dict                # LogitStats over every prompt, with greedy_identical_prompts and prompts
    per_prompt: list[dict]       # the report's rows
    greedy: list[int | None]     # per prompt, the first new token where the greedy continuations differ
    cache: dict                  # cache consistency of both runs, with the tolerance
    seconds: float


def compare_runs(prompts: list[Prompt], ref_run: ModelRun, cand_run: ModelRun, device: torch.device,
                 cache_tol: float) -> Comparison:
    t0 = time.perf_counter()
    overall_stats = LogitStats()
    per_prompt = []
    greedy = []
    for i, p in enumerate(prompts):
        stats = LogitStats().add(ref_run.prompt_logits[i].to(device), cand_run.prompt_logits[i].to(device))
        overall_stats.merge(stats)
        div = first_divergence(ref_run.generated[i], cand_run.generated[i])
        greedy.append(div)
        per_prompt.append({**p.to_dict(), "input_ids": p.ids, **stats.summary(), "greedy_first_divergence": div,
                           "reference_tokens": ref_run.generated[i], "candidate_tokens": cand_run.generated[i],
                           "cache_candidate": cand_run.cache[i], "cache_reference": ref_run.cache[i]})
    seconds = time.perf_counter() - t0
    overall = overall_stats.summary()
    overall["greedy_identical_prompts"] = sum(d is None for d in greedy)
    overall["prompts"] = len(prompts)
    cache = {"tolerance_relative": cache_tol,
             "candidate": _cache_summary(cand_run.cache), "reference": _cache_summary(ref_run.cache)}
    return Comparison(overall, per_prompt, greedy, cache, seconds)


def gate_checks(gate: Gate, comparison: Comparison, cand_run: ModelRun, device: torch.device,
                dtype: torch.dtype) -> list[dict]:
    """Every check of the gate, each with its value, threshold and verdict (a PASS needs all of them)."""
    thresholds = gate.thresholds
    if gate.profile == "exact" and device.type == "cuda" and "max_abs" not in thresholds["overridden"]:
        thresholds["max_abs"] = exact_cuda_tolerance(comparison.overall["max_abs_reference_logit"], dtype)
        thresholds["max_abs_rule"] = (f"{EXACT_CUDA_ULPS} ulps of {str(dtype).removeprefix('torch.')} at the largest "
                                      f"|reference logit| (CUDA GEMMs may sum in another order)")
    cache = comparison.cache
    checks = evaluate(thresholds, comparison.overall, comparison.greedy, cache["candidate"]["relative_max"],
                      thresholds["max_cache_relative"], cand_run.nonfinite, cache["reference"]["relative_max"])
    checks.append(tokenizer_check(gate.tokenizer_diffs, gate.allow_tokenizer_diff))
    if cand_run.prefix_cache is not None:
        pc = cand_run.prefix_cache
        checks.append({"metric": "prefix_cache_identical", "value": pc["passed"], "op": "==", "threshold": True,
                       "threshold_name": "required", "passed": pc["passed"], "detail": pc["failure"] or ""})
    return checks


def evaluate(thresholds: dict, overall: dict, greedy: list[int | None], cache_rel: float, cache_tol: float,
              nonfinite: int, ref_cache_rel: float = 0.0) -> list[dict]:
    checks = [{"metric": "nonfinite_candidate_logits", "value": nonfinite, "op": "<=", "threshold": 0,
               "threshold_name": "max", "passed": nonfinite == 0}]

    def gate(metric: str, key: str, op: str):
        limit = thresholds.get(key)
        if limit is None:
            return
        value = overall[metric]
        ok = value >= limit if op == ">=" else value <= limit  # NaN compares False: a NaN fails
        checks.append({"metric": metric, "value": value, "op": op, "threshold": limit, "threshold_name": key,
                       "passed": bool(ok)})

    gate("max_abs_diff", "max_abs", "<=")
    gate("cosine_mean", "min_cosine", ">=")
    gate("top1_agreement", "min_top1", ">=")
    gate("kl_mean", "max_kl", "<=")
    if thresholds.get("same_greedy"):
        diverged = [(i, d) for i, d in enumerate(greedy) if d is not None]
        detail = f"first: prompt {diverged[0][0]} at new token {diverged[0][1]}" if diverged else ""
        checks.append({"metric": "greedy_divergent_prompts", "value": len(diverged), "op": "<=", "threshold": 0,
                       "threshold_name": "max", "passed": not diverged, "detail": detail})
    cache = {"metric": "cache_relative_diff", "value": cache_rel, "op": "<=", "threshold": cache_tol,
             "threshold_name": "max_cache_relative", "passed": bool(cache_rel <= cache_tol)}
    if not ref_cache_rel <= cache_tol:  # then the model's cached path is at fault, not the candidate
        cache["detail"] = (f"the reference exceeds it too ({format_number(ref_cache_rel)}): the model's cache path, "
                           f"not the checkpoint")
    checks.append(cache)
    return checks


def tokenizer_check(diffs: list[str], allow: bool) -> dict:
    detail = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    if diffs and allow:
        detail += " (allowed with --allow-tokenizer-diff)"
    return {"metric": "tokenizer_differences", "value": len(diffs), "op": "<=", "threshold": 0,
            "threshold_name": "max", "passed": not diffs or allow, "detail": detail}


def _cache_summary(items: list[dict]) -> dict:
    return {"relative_max": max((c["relative"] for c in items), default=0.0),
            "max_abs_diff": max((c["max_abs_diff"] for c in items), default=0.0),
            "top1_agreement_min": min((c["top1_agreement"] for c in items), default=1.0),
            "positions": sum(c["positions"] for c in items)}
