"""The gate's thresholds: the profiles, which one two checkpoints call for, the user's overrides (and which of
them loosen the gate: the record keeps those), and the tolerances that depend on the device and dtype.

Thresholds come from a profile (docs/DESIGN.md §6): the user's, or the one the two checkpoints' tensors call for
(`choose_profile`; never what the candidate's manifest says).

What "exact" means (the profile for lossless conversions): a lossless conversion yields bit-identical
weights, so the model computes bit-identical logits when the kernels are deterministic.
  * CPU (any dtype): max |Δ| must be 0, greedy tokens identical.
  * CUDA: the loader maps every scheme onto the same parameters, so the same kernels run on the same
    values and the logits are normally bit-identical too. But CUDA libraries do not promise bitwise
    run-to-run reproducibility (cuBLASLt heuristics see pointer alignment and workspace; reductions
    with atomics), and a false FAIL of a lossless conversion in CI is costly. So on CUDA exact allows a
    max |Δ| of two ulps of the compute dtype at the largest |reference logit| (bf16: 2·2^(e-7) for
    2^e ≤ max|logit| < 2^(e+1)), and still demands top-1 agreement 1.0 and identical greedy tokens.
    Each fault the tests plant (a norm scaled by 1.02, two layers swapped, an expert scaled, a conv
    bias zeroed) moves logits by far more than that.

Cache consistency (every profile): max |cached − full| / max |full| over the compared positions must
stay within `cache_tolerance`: 1e-3 in float32 (the chunked scan and the recurrent step sum in different
orders; we measure ~1e-6 on CPU), 5e-2 in bfloat16 (both paths round activations to bf16 at every
layer, in different places; 0 measured on CPU, not yet calibrated on CUDA kernels). A candidate with
FP8 linears gets at least 5e-2 in any dtype: its activations are quantized with a static scale, and a
1e-6 difference between the two paths can move an activation across an e4m3 rounding step (6-12 % of
its value); we measure up to 5.5e-3 in float32 on tiny models.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from nemoconv.checkpoint.local import Checkpoint, natural_key
from nemoconv.errors import NemoconvError
from nemoconv.storage.config import ModelSpec
from nemoconv.storage.safetensors_io import FP8_NAMES
from nemoconv.stream.pipeline import SCALE_SUFFIXES, is_lossless_cast, stream_converted

PROFILE_NAMES = ("exact", "bf16", "fp8")
THRESHOLD_KEYS = ("min_cosine", "min_top1", "max_kl", "max_abs")
# None: not gated by this profile (still reported)
PROFILES: dict[str, dict] = {
    "exact": {"min_cosine": None, "min_top1": 1.0, "max_kl": None, "max_abs": 0.0, "same_greedy": True},
    "bf16": {"min_cosine": 0.999, "min_top1": 0.99, "max_kl": None, "max_abs": None, "same_greedy": False},
    "fp8": {"min_cosine": 0.99, "min_top1": 0.90, "max_kl": 0.05, "max_abs": None, "same_greedy": False},
}
PROFILE_ORDER = {"exact": 0, "bf16": 1, "fp8": 2}  # strictest first
CACHE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
CACHE_TOLERANCE_FP8 = 5e-2
EXACT_CUDA_ULPS = 2


# ---- the same network ----------------------------------------------------------------------------

# ModelSpec fields that do not change the network: spelling, an init-only value, the cache's storage
_SPEC_IGNORED = {"raw", "pattern_field", "time_step_min", "mamba_ssm_cache_dtype"}


# MTP heads only draft tokens for speculative decoding; the model does not run them, so verify cannot
# compare them and a difference there is reported as a note, not as a different network
_MTP_FIELDS = {"mtp_codes", "num_mtp_layers"}


def network_differences(ref: ModelSpec, cand: ModelSpec) -> list[str]:
    """Human-readable differences between two configs that change the network (quantization excluded)."""
    diffs = []
    if ref.layer_codes != cand.layer_codes:
        diffs.append(f"different layer pattern: {ref.layer_codes} vs {cand.layer_codes}")
    for name in ModelSpec.__dataclass_fields__:
        if name in _SPEC_IGNORED or name in _MTP_FIELDS or name == "layer_codes":
            continue
        a, b = getattr(ref, name), getattr(cand, name)
        if a != b:
            diffs.append(f"different {name}: {a} vs {b}")
    return diffs


def check_same_network(ref: Checkpoint, cand: Checkpoint) -> list[str]:
    """Raise on a network difference; return notes (about the MTP heads, which are not compared)."""
    diffs = network_differences(ref.spec, cand.spec)
    if diffs:
        more = f" (and {len(diffs) - 1} more: {'; '.join(diffs[1:4])})" if len(diffs) > 1 else ""
        raise NemoconvError(f"reference and candidate are different networks: {diffs[0]}{more}")
    a, b = ref.spec, cand.spec
    if (a.num_mtp_layers, a.mtp_codes) != (b.num_mtp_layers, b.mtp_codes):
        return [f"MTP heads differ ({a.num_mtp_layers}x{a.mtp_codes or '-'} vs {b.num_mtp_layers}x"
                f"{b.mtp_codes or '-'}); verify runs and compares the main network only"]
    if a.num_mtp_layers:
        return ["MTP heads are not run: verify compares the main network only"]
    return []


# ---- choosing the profile ---------------------------------------------------------------------------


def fp8_count(ck: Checkpoint) -> int:
    return sum(1 for e in ck.entries.values() if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))


def canonical_dtypes(ck: Checkpoint) -> dict[str, str]:
    """Every tensor of `ck` in `hf` names with the dtype it is stored in: the pipeline's planning pass (renames,
    expert merges, fusions), headers only. Without the manifest: a restore cast it would name undoes a widening
    (bf16 → fp32, exact) or widens what a scheme rounded (MAX's fp32 router gate kept in bf16), and in neither
    case do the values differ from what is stored."""

    return {item.name: item.dtype for item in stream_converted(replace(ck, manifest=None), "hf", meta=True, host=True)}


def _not_compared(name: str) -> bool:
    # MTP heads are not run by the model; scales travel with FP8 weights (their dtypes still count when both
    # sides hold them), and MAX drops the KV-cache scales
    return name.startswith("mtp.") or name.rpartition(".")[2] in SCALE_SUFFIXES


def _examples(rows: list[str], limit: int = 3) -> str:
    return ", ".join(rows[:limit]) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def choose_profile(ref: Checkpoint, cand: Checkpoint) -> tuple[str, str]:
    """`auto`: the profile follows from what both checkpoints hold, tensor by tensor in `hf` names, never from
    text the candidate carries (its manifest is information only):
      FP8 on one side only → fp8; a narrowing cast (fp32 → bf16, MAX's router gate, --dtype) → bf16;
      identical dtypes, or only widening casts (bf16 → fp32 keeps every value) → exact.
    Tensor sets that differ beyond scales and MTP heads are bad input: no profile can say which thresholds a
    missing or extra tensor deserves, so the user must choose one with --profile."""
    a, b = canonical_dtypes(ref), canonical_dtypes(cand)
    only_ref = sorted((n for n in a.keys() - b.keys() if not _not_compared(n)), key=natural_key)
    only_cand = sorted((n for n in b.keys() - a.keys() if not _not_compared(n)), key=natural_key)
    if only_ref or only_cand:
        where = (f"{len(only_ref)} only in the reference ({_examples(only_ref)})" if only_ref else "") + \
            ("; " if only_ref and only_cand else "") + \
            (f"{len(only_cand)} only in the candidate ({_examples(only_cand)})" if only_cand else "")
        raise NemoconvError(f"profile auto: reference and candidate hold different tensors: {where}; "
                            f"pass --profile exact|bf16|fp8")
    fp8, narrowed, widened = [], [], []
    common = sorted((n for n in a.keys() & b.keys() if not n.startswith("mtp.")), key=natural_key)
    for name in common:
        x, y = a[name], b[name]
        if x == y:
            continue
        row = f"{name} {x} → {y}"
        if x in FP8_NAMES or y in FP8_NAMES:
            fp8.append(row)
        elif is_lossless_cast(x, y):
            widened.append(row)
        else:
            narrowed.append(row)
    if fp8:
        side = "candidate" if any(b[r.split(" ", 1)[0]] in FP8_NAMES for r in fp8) else "reference"
        return "fp8", (f"the {side} is quantized: {len(fp8)} tensor(s) FP8 on one side only "
                       f"(reference → candidate: {_examples(fp8)})")
    if narrowed:
        return "bf16", (f"lossy: {len(narrowed)} tensor(s) narrowed (reference → candidate: {_examples(narrowed)})"
                        + (f"; {len(widened)} widened" if widened else ""))
    if widened:
        return "exact", (f"lossless: the same {len(common)} tensors; {len(widened)} widened, a cast that loses "
                         f"nothing (reference → candidate: {_examples(widened)})")
    return "exact", f"lossless: the same {len(common)} tensors with identical dtypes"


def decide_profile(ref_ck: Checkpoint, cand_ck: Checkpoint, profile: str) -> tuple[str, str, dict]:
    """(profile used, why, what auto decides). The user's --profile wins; auto is still worked out, so that
    a looser choice is recorded as an override."""
    try:
        auto_name, auto_reason = choose_profile(ref_ck, cand_ck)
    except NemoconvError as exc:
        if profile == "auto":
            raise
        return profile, "given with --profile", {"name": None, "reason": str(exc)}
    auto = {"name": auto_name, "reason": auto_reason}
    if profile == "auto":
        return auto_name, auto_reason, auto
    return profile, f"given with --profile (auto would choose {auto_name})", auto


# ---- thresholds and overrides ----------------------------------------------------------------------


def resolve_thresholds(profile: str, overrides: dict | None) -> dict:
    if profile not in PROFILES:
        raise NemoconvError(f"unknown profile {profile!r} (use auto, {', '.join(PROFILE_NAMES)})")
    thresholds = dict(PROFILES[profile])
    overridden = []
    for key, value in (overrides or {}).items():
        if key not in THRESHOLD_KEYS and key != "max_cache_relative":
            raise NemoconvError(f"unknown threshold {key!r} (use {', '.join(THRESHOLD_KEYS)}, max_cache_relative)")
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise NemoconvError(f"threshold {key} must be a number, got {value!r}") from None
        if not math.isfinite(value) or value < 0 or (key in ("min_cosine", "min_top1") and value > 1):
            raise NemoconvError(f"threshold {key} = {value} is out of range")
        thresholds[key] = value
        overridden.append(key)
    thresholds["overridden"] = overridden
    return thresholds


def override_list(chosen: str, auto: dict, thresholds: dict, allow_tokenizer_diff: bool,
                   tokenizer_diffs: list[str]) -> list[str]:
    """Everything the user changed about the gate, one line each (the record keeps them; upload refuses
    them without --force)."""
    out = []
    if auto["name"] is None:
        out.append(f"--profile {chosen} where auto cannot decide ({auto['reason']})")
    elif PROFILE_ORDER[chosen] > PROFILE_ORDER[auto["name"]]:
        out.append(f"--profile {chosen}, looser than auto's {auto['name']}")
    for key in thresholds["overridden"]:
        if _tighter(key, thresholds[key], PROFILES[chosen].get(key)):
            continue  # a stricter gate (e.g. quantize --max-kl's budget) needs no permission: recorded in thresholds
        out.append(f"{key} = {thresholds[key]!r} (profile {chosen}: {PROFILES[chosen].get(key, 'by dtype')!r})")
    if allow_tokenizer_diff:
        out.append(f"--allow-tokenizer-diff ({len(tokenizer_diffs)} difference(s) accepted)")
    return out


def _tighter(key: str, value: float, profile_value) -> bool:
    """Whether an overridden threshold is at least as strict as the profile's own."""
    if profile_value is None:
        return False
    return value <= profile_value if key.startswith("max_") else value >= profile_value


# ---- tolerances of the device and dtype --------------------------------------------------------------


def cache_tolerance(dtype: torch.dtype, fp8_candidate: bool) -> float:
    """Largest allowed max |cached − full| / max |full| (see the module docstring for the numbers)."""
    tol = CACHE_TOLERANCE[dtype]
    return max(tol, CACHE_TOLERANCE_FP8) if fp8_candidate else tol


def exact_cuda_tolerance(max_ref: float, dtype: torch.dtype) -> float:
    """max |Δ| the exact profile allows on CUDA: EXACT_CUDA_ULPS ulps of `dtype` at the largest |reference logit|."""
    if max_ref <= 0 or not math.isfinite(max_ref):
        return 0.0
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    return EXACT_CUDA_ULPS * 2.0 ** (math.floor(math.log2(max_ref)) - mantissa)
