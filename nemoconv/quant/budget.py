"""`quantize --max-kl B` / `--min-top1 T`: keep the mixers FP8 hurts most in bf16 until the model meets a
quality budget on held-out prompts.

1. rank   each quantized mixer (the unit quantize keeps or drops: Mamba in/out, MLP up/down, a MoE's
          experts) by the KL of the logits when only it is FP8, on a probe of the calibration tokens
          (sweep.compare_variants, layer by layer);
2. fit    evaluate, in one layer-by-layer sweep, every prefix of that ranking kept in bf16 (k = 0, 1, …,
          n−1 mixers kept; at least one stays FP8) on the HELD-OUT prompts, and take the smallest k that
          meets the budget. No ranking is assumed monotone: each k is measured.
The held-out prompts are exactly those `nemoconv verify` feeds by default (the built-in verify texts,
never used for calibration, HELDOUT_PROMPTS of them at HELDOUT_SEQ_LEN tokens), so
`nemoconv verify SRC OUT --num-prompts 8 --seq-len 64 --max-kl B` (printed by quantize, recorded in the
manifest as information only) checks the same numbers on the same device and dtype.
"""

from __future__ import annotations

import math
import shlex

import torch

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.quant.analyze import PROBE_FRACTION, max_streams
from nemoconv.quant.sweep import Variant, compare_variants
from nemoconv.quant.targets import Exclusion, TargetPlan, _group
from nemoconv.verification.prompts import builtin_prompts, find_tokenizer

HELDOUT_PROMPTS = 8
HELDOUT_SEQ_LEN = 64


def check_budget(max_kl, min_top1) -> None:
    for value, flag, top in ((max_kl, "--max-kl", math.inf), (min_top1, "--min-top1", 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= top:
            raise NemoconvError(f"{flag} must be a number in [0, {top}], got {value!r}")


def heldout_ids(ck: Checkpoint) -> tuple[torch.Tensor, dict]:
    """The verify gate's built-in prompts at HELDOUT_SEQ_LEN tokens (those long enough), [n, L]."""
    tok = find_tokenizer(ck.path)
    prompts = builtin_prompts(HELDOUT_PROMPTS, HELDOUT_SEQ_LEN, tok.tokenizer, ck.spec.vocab_size)
    rows = [p.ids[:HELDOUT_SEQ_LEN] for p in prompts if len(p.ids) >= HELDOUT_SEQ_LEN]
    if not rows:
        raise NemoconvError(f"no held-out prompt reaches {HELDOUT_SEQ_LEN} tokens with this tokenizer")
    return torch.tensor(rows, dtype=torch.int64), {
        "source": "the built-in verify prompts (never used for calibration)", "prompts": len(rows),
        "seq_len": HELDOUT_SEQ_LEN, "short_prompts_left_out": len(prompts) - len(rows)}


def fit_budget(ck: Checkpoint, plan: TargetPlan, calib, calib_ids: torch.Tensor, device: torch.device,
               dtype: torch.dtype, max_kl: float | None, min_top1: float | None, progress=None
               ) -> tuple[TargetPlan, dict]:
    """The plan with the fewest, most harmful mixers kept in bf16 that meets the budget, and what the
    manifest records about it. NemoconvError (exit 2) with the best numbers when no choice meets it."""
    groups: dict[str, list[str]] = {}
    for m in plan.quantized:
        groups.setdefault(_group(m), []).append(m)
    names = list(groups)

    # 1. rank the mixers on a probe of the calibration tokens
    probe = calib_ids[:max(1, calib_ids.shape[0] // PROBE_FRACTION)]
    alone = compare_variants(ck, probe, [Variant(g, frozenset(groups[g])) for g in names], calib.amax, device,
                             dtype, max_streams(calib_ids.numel(), probe.numel()), progress)
    harm = {g: alone[g].summary()["kl_mean"] for g in names}
    ranking = sorted(names, key=lambda g: harm[g], reverse=True)

    # 2. every prefix of the ranking kept in bf16, measured on the held-out prompts
    ids, heldout = heldout_ids(ck)
    prefixes = [Variant(str(k), frozenset(m for g in ranking[k:] for m in groups[g])) for k in range(len(ranking))]
    measured = compare_variants(ck, ids, prefixes, calib.amax, device, dtype,
                                max_streams(calib_ids.numel(), ids.numel()), progress)
    results = [_numbers(measured[str(k)].summary(), k) for k in range(len(ranking))]
    meets = [r for r in results if _meets(r, max_kl, min_top1)]
    budget = {"max_kl": max_kl, "min_top1": min_top1}
    if not meets:
        best_kl = min(results, key=lambda r: r["kl"])
        best_top1 = max(results, key=lambda r: r["top1_agreement"])
        raise NemoconvError(
            f"cannot meet {_describe(budget)} on the held-out prompts with any FP8 linear left: the preset gives "
            f"KL {results[0]['kl']:.3g}, top-1 {results[0]['top1_agreement']:.4f}; the best reachable is KL "
            f"{best_kl['kl']:.3g} ({best_kl['kept']} of {len(ranking)} mixers kept in bf16)"
            + (f", top-1 {best_top1['top1_agreement']:.4f} ({best_top1['kept']} kept)" if min_top1 is not None else
               f", top-1 {best_kl['top1_agreement']:.4f}"))
    chosen = meets[0]
    kept = ranking[:chosen["kept"]]
    new_plan = _keep(plan, {g: groups[g] for g in kept}, budget, harm, ranking)
    info = {
        **budget,
        "heldout": heldout,
        "preset_result": results[0],
        "result": chosen,
        "kept_in_bf16": [{"mixer": g, "modules": groups[g], "rank": ranking.index(g) + 1, "kl_alone": harm[g]}
                         for g in kept],
        "ranking": [{"mixer": g, "kl_alone": harm[g]} for g in ranking],
        "ranked_on": {"what": "the first calibration sequences", "tokens": int(probe.numel())},
        "note": "information only: verify never reads thresholds from a candidate; run the printed command",
    }
    return new_plan, info


def verify_command(src, out, budget: dict) -> str:
    flags = [f"--num-prompts {HELDOUT_PROMPTS}", f"--seq-len {HELDOUT_SEQ_LEN}"]
    if budget.get("max_kl") is not None:
        flags.append(f"--max-kl {budget['max_kl']:g}")
    if budget.get("min_top1") is not None:
        flags.append(f"--min-top1 {budget['min_top1']:g}")
    return f"nemoconv verify {shlex.quote(str(src))} {shlex.quote(str(out))} " + " ".join(flags)


def _numbers(summary: dict, kept: int) -> dict:
    return {"kept": kept, "kl": summary["kl_mean"], "top1_agreement": summary["top1_agreement"],
            "cosine_mean": summary["cosine_mean"]}


def _meets(r: dict, max_kl, min_top1) -> bool:
    return (max_kl is None or r["kl"] <= max_kl) and (min_top1 is None or r["top1_agreement"] >= min_top1)


def _describe(budget: dict) -> str:
    parts = [f"--max-kl {budget['max_kl']:g}" if budget["max_kl"] is not None else "",
             f"--min-top1 {budget['min_top1']:g}" if budget["min_top1"] is not None else ""]
    return " and ".join(p for p in parts if p)


def _keep(plan: TargetPlan, kept: dict[str, list[str]], budget: dict, harm: dict, ranking: list[str]) -> TargetPlan:
    """The plan with the kept mixers' linears excluded (reason "budget")."""
    dropped = {m: g for g, ms in kept.items() for m in ms}
    excluded = list(plan.excluded)
    for m, g in dropped.items():
        excluded.append(Exclusion(m, "budget", f"kept in bf16 to meet {_describe(budget)}: FP8 in this mixer alone "
                                               f"costs KL {harm[g]:.3g} (rank {ranking.index(g) + 1} of "
                                               f"{len(ranking)} mixers)"))
    order = {mod.name: k for k, mod in enumerate(plan.modules)}
    excluded.sort(key=lambda e: order[e.module])
    quantized = [m for m in plan.quantized if m not in dropped]
    return TargetPlan(plan.preset, plan.modules, quantized, excluded, list(plan.glob_notes))
