"""`nemoconv verify`: the parity gate between a reference checkpoint and a converted or quantized candidate.

Both checkpoints run in the built-in model on one device and dtype, one after the other (so only one
model is in memory at a time), over the same prompts of exactly `seq_len` tokens. For every model:

  cached run   prefill(prompt[:S-k]) → k teacher-forced decode steps over prompt[S-k:] → greedy
               decode of `max_new_tokens` tokens; the logits of every cached step are kept;
  full forward over prompt + generated tokens (no cache), one call.

The full forward's prompt positions give the reference/candidate comparison (max/mean |Δ|, cosine,
KL(ref‖cand), top-1); the greedy tokens give the continuation match; the cached logits against the
full forward at the same positions give cache consistency. Thresholds come from a profile
(DESIGN.md §6): the user's, or the one the two checkpoints' tensors call for (`choose_profile`; never what
the candidate's manifest says). The tokenizers and generation ids must match (`prompts.tokenizer_differences`)
unless allowed. The verdict is recorded with full hashes of both sides' files (`nemoconv.record`), and every
override with it.

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

import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemoconv.checkpoint.hub import VERIFY_REPORT
from nemoconv.checkpoint.local import Checkpoint, natural_key, open_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.progress import Progress
from nemoconv.storage.config import ModelSpec
from nemoconv.storage.safetensors_io import FP8_NAMES
from nemoconv.stream.card import update_card_with_verify
from nemoconv.stream.pipeline import SCALE_SUFFIXES, is_lossless_cast
from nemoconv.verification.memory import choose_streaming, parse_memory_size
from nemoconv.verification.metrics import LogitStats, cache_consistency, first_divergence
from nemoconv.verification.prompts import (
    Prompt,
    builtin_prompts,
    find_tokenizer,
    fit_prompts,
    prompts_from_list,
    read_prompt_file,
    tokenizer_differences,
)
from nemoconv.verification.record import hash_checkpoint, make_record
from nemoconv.version import __version__

# ---- profiles ------------------------------------------------------------------------------------

PROFILE_NAMES = ("exact", "bf16", "fp8")
THRESHOLD_KEYS = ("min_cosine", "min_top1", "max_kl", "max_abs")
# None: not gated by this profile (still reported)
PROFILES: dict[str, dict] = {
    "exact": {"min_cosine": None, "min_top1": 1.0, "max_kl": None, "max_abs": 0.0, "same_greedy": True},
    "bf16": {"min_cosine": 0.999, "min_top1": 0.99, "max_kl": None, "max_abs": None, "same_greedy": False},
    "fp8": {"min_cosine": 0.99, "min_top1": 0.90, "max_kl": 0.05, "max_abs": None, "same_greedy": False},
}
CACHE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
CACHE_TOLERANCE_FP8 = 5e-2
EXACT_CUDA_ULPS = 2
TEACHER_FORCED_STEPS = 4       # prompt tokens fed one at a time after the prefill (cache hand-off check)
LOGITS_BATCH_BYTES = 1 << 30   # prompts per batch: keep one batch's logits under ~1 GiB
FULL_HASH_LIMIT = 2 << 30      # checkpoints up to 2 GiB are hashed whole, larger ones sampled
SAMPLE_STRIDE, SAMPLE_BLOCK = 64 << 20, 1 << 20
# Upper bounds of the run's sizes (the CLI uses the same): far above any real gate, far below a runaway allocation
MAX_NUM_PROMPTS, MAX_SEQ_LEN, MAX_NEW_TOKENS = 4096, 131072, 4096

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the report ----------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Everything `verify` measured and decided; `to_dict()` is what `--report` writes."""

    passed: bool
    profile: str
    profile_reason: str
    thresholds: dict
    checks: list[dict]
    overall: dict
    prompts: list[dict]
    cache: dict
    reference: dict
    candidate: dict
    device: str
    dtype: str
    settings: dict
    timings: dict
    notes: list[str] = field(default_factory=list)
    prefix_cache: dict | None = None
    tokenizer: dict = field(default_factory=dict)   # {"differences": [...], "allowed": bool}
    overrides: list[str] = field(default_factory=list)
    record: dict | None = None                       # nemoconv.record.make_record: the files this verdict binds

    def failed_checks(self) -> list[dict]:
        return [c for c in self.checks if not c["passed"]]

    def failure_line(self) -> str:
        """One line: the first failing metric with its value and threshold (and how many more failed)."""
        failed = self.failed_checks()
        if not failed:
            return f"all checks passed (profile {self.profile})"
        line = _describe_check(failed[0]) + f" (profile {self.profile})"
        if len(failed) > 1:
            line += f"; also failed: {', '.join(c['metric'] for c in failed[1:])}"
        return line

    def summary(self) -> dict:
        """The headline numbers, flat (what a model card or a CI log shows)."""
        keys = ("max_abs_diff", "mean_abs_diff", "cosine_mean", "cosine_min", "kl_mean", "top1_agreement",
                "greedy_identical_prompts", "prompts", "positions")
        return {**{k: self.overall[k] for k in keys}, "cache_relative_max": self.cache["candidate"]["relative_max"]}

    def to_dict(self) -> dict:
        return _json_safe({
            "tool": "nemoconv", "version": __version__, "passed": self.passed, "summary": self.summary(),
            "profile": self.profile, "profile_reason": self.profile_reason, "thresholds": self.thresholds,
            "checks": self.checks, "failure": None if self.passed else self.failure_line(),
            "overall": self.overall, "prompts": self.prompts, "cache_consistency": self.cache,
            "reference": self.reference, "candidate": self.candidate, "device": self.device, "dtype": self.dtype,
            "settings": self.settings, "timings_s": self.timings, "notes": self.notes,
            "tokenizer": self.tokenizer, "overrides": self.overrides,
            **({"record": self.record} if self.record is not None else {}),
            **({"prefix_cache": self.prefix_cache} if self.prefix_cache is not None else {}),
        })


def _describe_check(c: dict) -> str:
    if c["metric"] == "prefix_cache_identical":
        return c["detail"]
    if c["metric"] == "greedy_divergent_prompts":
        return (f"greedy continuation diverged in {c['value']} prompt(s) ({c.get('detail', '')}); "
                f"identical tokens required")
    if c["metric"] == "nonfinite_candidate_logits":
        return f"candidate produced {c['value']} non-finite logits"
    if c["metric"] == "tokenizer_differences":
        return f"tokenizer or generation ids differ: {c['detail']} (pass --allow-tokenizer-diff to accept)"
    op = "<" if c["op"] == ">=" else ">"
    threshold = repr(float(c["threshold"])) if isinstance(c["threshold"], float) else str(c["threshold"])
    line = f"{c['metric']} {_fmt(c['value'], differ_from=c['threshold'])} {op} {c['threshold_name']} {threshold}"
    return line + (f" ({c['detail']})" if c.get("detail") else "")


def _fmt(x, differ_from=None) -> str:
    """Short float text; with `differ_from`, as many digits as it takes not to print the threshold."""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x == 0:
            return "0"
        for digits in (6, 9, 12, 17):
            text = f"{x:.{digits}g}" if 1e-4 <= abs(x) < 1e6 else f"{x:.{digits - 3}e}"
            if differ_from is None or float(text) != float(differ_from):
                return text
        return repr(x)
    return str(x)


def _json_safe(obj):
    """Nested data → JSON-valid data: non-finite floats become strings ("nan", "inf")."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---- configuration checks ------------------------------------------------------------------------

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


# ---- profile selection ---------------------------------------------------------------------------


def _fp8_count(ck: Checkpoint) -> int:
    return sum(1 for e in ck.entries.values() if e.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))


PROFILE_ORDER = {"exact": 0, "bf16": 1, "fp8": 2}  # strictest first


def canonical_dtypes(ck: Checkpoint) -> dict[str, str]:
    """Every tensor of `ck` in `hf` names with the dtype it is stored in: the pipeline's planning pass (renames,
    expert merges, fusions), headers only. Without the manifest: a restore cast it would name undoes a widening
    (bf16 → fp32, exact) or widens what a scheme rounded (MAX's fp32 router gate kept in bf16), and in neither
    case do the values differ from what is stored."""
    from dataclasses import replace

    from nemoconv.stream.pipeline import stream_converted

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


# ---- fingerprints --------------------------------------------------------------------------------


def fingerprint(ck: Checkpoint, full_limit: int = FULL_HASH_LIMIT, stop: threading.Event | None = None) -> dict:
    """sha256 over sorted (name, dtype, shape) and the safetensors files' bytes, streamed.

    Checkpoints above `full_limit` bytes hash each file's header plus 1 MiB every 64 MiB (and the file
    size): the field is then `sha256_sampled`, so nobody mistakes it for a whole-file hash.
    """
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for name in sorted(ck.entries):
        e = ck.entries[name]
        h.update(f"{name}\t{str(e.dtype).removeprefix('torch.')}\t{list(e.shape)}\n".encode())
    files = sorted(ck.shard_files, key=lambda p: p.name)
    total = sum(f.stat().st_size for f in files)
    sampled = total > full_limit
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for f in files:
        if stop is not None and stop.is_set():
            return {"cancelled": True}
        h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
        with open(f, "rb", buffering=0) as fh:
            if not sampled:
                while (n := fh.readinto(view)) and not (stop is not None and stop.is_set()):
                    h.update(view[:n])
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(header_len))
            size = f.stat().st_size
            for offset in range(8 + header_len, size, SAMPLE_STRIDE):
                fh.seek(offset)
                h.update(fh.read(SAMPLE_BLOCK))
    key = "sha256_sampled" if sampled else "sha256_full"
    out = {key: h.hexdigest(), "bytes": total, "files": [f.name for f in files],
           "seconds": round(time.perf_counter() - t0, 3)}
    if sampled:
        out["sample"] = (f"tensor names/dtypes/shapes, each file's size and header, and {SAMPLE_BLOCK >> 20} MiB "
                         f"every {SAMPLE_STRIDE >> 20} MiB of data (checkpoint above {full_limit >> 30} GiB)")
    return out


# ---- running one model ---------------------------------------------------------------------------


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
    from nemoconv.model.cuda import warmup
    from nemoconv.model.loading import load_model

    model = load_model(path, device=device, dtype=dtype)
    warmup.wait_all()  # kernel warm-up hook (see verify()): done before the model runs anything
    return model


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
            t0 = time.perf_counter()
            for p in prompts:
                if len(p.ids) < seq_len:
                    ids = torch.tensor([p.ids], device=device)
                    out = model.generate(ids, max_new_tokens=seq_len - len(p.ids))
                    p.extended_from = len(p.ids)
                    p.ids = out[0].tolist()[:seq_len]
            _sync(device)
            timings["extend"] = time.perf_counter() - t0
        k = min(TEACHER_FORCED_STEPS, seq_len - 1)
        run = ModelRun([], [], [])
        timings["generate"] = timings["forward"] = 0.0
        per_batch = max(1, LOGITS_BATCH_BYTES // ((seq_len + new_tokens) * 4 * max(1, _vocab_of(model))))
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
        if prefix_cache:
            from nemoconv.serving.engine import check_prefix_caching

            t0 = time.perf_counter()
            # exact: bit-identical on the CPU; on CUDA within the exact profile's few ulps
            rule = (lambda largest: _exact_cuda_tolerance(largest, dtype)) if device.type == "cuda" else None
            run.prefix_cache = check_prefix_caching(model, shared_prefix_prompts(prompts, model.spec.chunk_size),
                                                    max(new_tokens, 1), tolerance=rule)
            _sync(device)
            timings["prefix_cache"] = time.perf_counter() - t0
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run.timings = timings
    return run


def shared_prefix_prompts(prompts: list[Prompt], block: int) -> list[list[int]]:
    """Prompts for the prefix-cache check: one long prefix (the prompts' own tokens, repeated to one
    prefill chunk of the engine, where the first Mamba state checkpoint lies, and half a KV block more,
    so it ends inside a block), then each prompt as its own suffix; the first prompt comes twice (an
    exact repeat)."""
    from nemoconv.serving.engine import resolve_prefill_chunk

    block = max(16, block)
    pool = [t for p in prompts for t in p.ids]
    length = resolve_prefill_chunk(None, block) + block // 2
    prefix = (pool * (length // len(pool) + 1))[:length]
    suffixes = [p.ids for p in prompts] + [prompts[0].ids]
    return [prefix + s for s in suffixes]


def _vocab_of(model) -> int:
    spec = getattr(model, "spec", None)
    return getattr(spec, "vocab_size", 0) or 0


# ---- the gate ------------------------------------------------------------------------------------


def _resolve_device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" or str(device).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise NemoconvError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise NemoconvError(f"--device must be auto, cpu or cuda, got {device!r}")


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise NemoconvError(f"unsupported compute dtype {dtype}")
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise NemoconvError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")


def cache_tolerance(dtype: torch.dtype, fp8_candidate: bool) -> float:
    """Largest allowed max |cached − full| / max |full| (see the module docstring for the numbers)."""
    tol = CACHE_TOLERANCE[dtype]
    return max(tol, CACHE_TOLERANCE_FP8) if fp8_candidate else tol


def _exact_cuda_tolerance(max_ref: float, dtype: torch.dtype) -> float:
    if max_ref <= 0 or not math.isfinite(max_ref):
        return 0.0
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    return EXACT_CUDA_ULPS * 2.0 ** (math.floor(math.log2(max_ref)) - mantissa)


def _evaluate(thresholds: dict, overall: dict, greedy: list[int | None], cache_rel: float, cache_tol: float,
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
        cache["detail"] = (f"the reference exceeds it too ({_fmt(ref_cache_rel)}): the model's cache path, "
                           f"not the checkpoint")
    checks.append(cache)
    return checks


def verify(reference, candidate, *, prompts=None, num_prompts: int = 4, seq_len: int = 64,
           max_new_tokens: int = 16, device="auto", dtype="auto", profile: str = "auto", report_path=None,
           overrides: dict | None = None, quiet: bool = True, record: bool = True,
           prefix_cache: bool = False, allow_tokenizer_diff: bool = False, stream_layers: str = "auto",
           max_gpu_memory=None, max_host_memory=None) -> VerifyReport:
    """Run both checkpoints on the same prompts and decide whether the candidate is faithful.

    prompts: a file (text lines, or JSONL with `text`/`input_ids`), or a list of texts / token-id
    lists; None uses `num_prompts` built-in prompts. Every prompt is cut or extended (by the
    reference's greedy continuation) to `seq_len` tokens. profile: auto|exact|bf16|fp8 (auto: from the
    tensors both checkpoints hold, see `choose_profile`); overrides: {min_cosine, min_top1, max_kl, max_abs,
    max_cache_relative}, None keeps the profile's value. The tokenizers and generation ids must be the same
    unless `allow_tokenizer_diff`. Every override is recorded.
    Bad input (unreadable checkpoints, different networks, bad prompts) raises NemoconvError; a
    candidate that misses a threshold returns a report with `passed=False` (and writes it too).
    record: also write the report, with the hashes of both checkpoints' files (nemoconv.record), as
    CANDIDATE/nemoconv-verify.json and into its model card (local dirs).
    prefix_cache: also generate prompts sharing a long prefix with the candidate under each prefix-caching
    mode (memory, state) and require the tokens of caching off (`model.engine.check_prefix_caching`).
    stream_layers: auto|on|off — run the models one layer at a time (`verification.streamed`); auto when the
    whole model does not fit max_gpu_memory (e.g. "6GB") or the device's free memory. max_host_memory caps the
    host memory a streamed run uses.
    """
    t_start = time.perf_counter()
    _check_sizes(num_prompts, seq_len, max_new_tokens)
    if profile != "auto" and profile not in PROFILES:
        raise NemoconvError(f"unknown profile {profile!r} (use auto, {', '.join(PROFILE_NAMES)})")
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    caps = {"max_gpu_memory": parse_memory_size(max_gpu_memory, "--max-gpu-memory"),
            "max_host_memory": parse_memory_size(max_host_memory, "--max-host-memory")}
    ref_ck, cand_ck = open_checkpoint(reference), open_checkpoint(candidate)
    notes = check_same_network(ref_ck, cand_ck)
    streaming, stream_reason = _decide_streaming(ref_ck, cand_ck, dev, dt, stream_layers, caps["max_gpu_memory"])
    if streaming and prefix_cache:
        raise NemoconvError("--prefix-cache needs the whole model: it cannot run with layer streaming "
                            f"({stream_reason})")
    if streaming:
        notes.append(stream_reason)
    chosen, reason, auto = _decide_profile(ref_ck, cand_ck, profile)
    thresholds = resolve_thresholds(chosen, overrides)
    if thresholds.get("max_cache_relative") is None:
        thresholds["max_cache_relative"] = cache_tolerance(dt, _fp8_count(cand_ck) > 0)
    cache_tol = thresholds["max_cache_relative"]
    tokenizer_diffs = tokenizer_differences(ref_ck.path, cand_ck.path, (ref_ck.config, cand_ck.config))
    override_list = _override_list(chosen, auto, thresholds, allow_tokenizer_diff, tokenizer_diffs)
    if report_path is not None:
        _check_report_path(Path(report_path))

    vocab = ref_ck.spec.vocab_size
    tok = find_tokenizer(ref_ck.path, cand_ck.path)
    if tok.note:
        notes.append(tok.note)
    if prompts is None:
        prompt_list = builtin_prompts(num_prompts, seq_len, tok.tokenizer, vocab)
        prompt_origin = "built-in " + ("texts" if tok.tokenizer is not None else "seeded token ids")
    elif isinstance(prompts, (list, tuple)):
        prompt_list, prompt_origin = prompts_from_list(prompts, tok.tokenizer, vocab), "given as a list"
    else:
        prompt_list, prompt_origin = read_prompt_file(prompts, tok.tokenizer, vocab), str(prompts)
    if len(prompt_list) > MAX_NUM_PROMPTS:
        raise NemoconvError(f"{len(prompt_list)} prompts: at most {MAX_NUM_PROMPTS} are compared in one run")
    prompt_list, short = fit_prompts(prompt_list, seq_len)

    # ---- kernel warm-up hook (nemoconv.model.warmup): on CUDA, compile the GPU kernels for these shapes on a
    # background thread while the reference loads; _load_model waits for it before the model runs. ----
    from nemoconv.model.cuda import warmup
    k_steps = min(TEACHER_FORCED_STEPS, seq_len - 1)
    rows = max(1, LOGITS_BATCH_BYTES // ((seq_len + max_new_tokens) * 4 * max(1, vocab)))  # as in run_model
    if not streaming:  # the streamed path runs other shapes, and the warm-up's memory would count against the cap
        warmup.start(ref_ck.spec, dev, dt, fp8=_fp8_count(cand_ck) > 0, batch=min(len(prompt_list), rows),
                     prefill=seq_len - k_steps, steps=k_steps + max_new_tokens,
                     forward=seq_len + max(max_new_tokens - 1, 0))
    # ---- end of the warm-up hook ----

    stop = threading.Event()  # set on an error, so the hashing threads end early
    with ThreadPoolExecutor(max_workers=2) as pool, Progress("", quiet=quiet) as progress, \
            _set_on_error(stop):
        # every bound file is hashed whole in the background while the models load and run (the record)
        fp_ref = pool.submit(hash_checkpoint, ref_ck, stop)
        fp_cand = pool.submit(hash_checkpoint, cand_ck, stop)
        progress.phase("verify: reference", total=len(prompt_list))
        if streaming:
            # in the function: verification.streamed imports ModelRun from here until it moves to verification/runner.py
            from nemoconv.verification.streamed import run_model_streamed

            ref_run = run_model_streamed(ref_ck.path, dev, dt, prompt_list, seq_len, max_new_tokens, bool(short),
                                         progress.advance, **caps)
        else:
            ref_run = run_model(ref_ck.path, dev, dt, prompt_list, seq_len, max_new_tokens, bool(short),
                                progress.advance)
        if ref_run.nonfinite:
            raise NemoconvError(f"{ref_ck.path}: the reference produces {ref_run.nonfinite} non-finite logits "
                                f"in {dt}; it cannot serve as a reference")
        progress.phase("verify: candidate", total=len(prompt_list))
        if streaming:  # teacher-forced on the reference's continuation: one pass, the same first divergence
            cand_run = run_model_streamed(cand_ck.path, dev, dt, prompt_list, seq_len, max_new_tokens, False,
                                          progress.advance, follow=ref_run.generated, **caps)
        else:
            cand_run = run_model(cand_ck.path, dev, dt, prompt_list, seq_len, max_new_tokens, False, progress.advance,
                                 prefix_cache=prefix_cache)
        progress.phase("verify: compare")
        t0 = time.perf_counter()
        overall_stats = LogitStats()
        per_prompt = []
        greedy = []
        for i, p in enumerate(prompt_list):
            stats = LogitStats().add(ref_run.prompt_logits[i].to(dev), cand_run.prompt_logits[i].to(dev))
            overall_stats.merge(stats)
            div = first_divergence(ref_run.generated[i], cand_run.generated[i])
            greedy.append(div)
            per_prompt.append({**p.to_dict(), "input_ids": p.ids, **stats.summary(), "greedy_first_divergence": div,
                               "reference_tokens": ref_run.generated[i], "candidate_tokens": cand_run.generated[i],
                               "cache_candidate": cand_run.cache[i], "cache_reference": ref_run.cache[i]})
        t_metrics = time.perf_counter() - t0
        hashes = fp_ref.result(), fp_cand.result()
    fingerprints = tuple(_fingerprint_of(ck, h) for ck, h in zip((ref_ck, cand_ck), hashes))

    overall = overall_stats.summary()
    overall["greedy_identical_prompts"] = sum(d is None for d in greedy)
    overall["prompts"] = len(prompt_list)
    cache = {"tolerance_relative": cache_tol,
             "candidate": _cache_summary(cand_run.cache), "reference": _cache_summary(ref_run.cache)}
    if chosen == "exact" and dev.type == "cuda" and "max_abs" not in thresholds["overridden"]:
        thresholds["max_abs"] = _exact_cuda_tolerance(overall["max_abs_reference_logit"], dt)
        thresholds["max_abs_rule"] = (f"{EXACT_CUDA_ULPS} ulps of {str(dt).removeprefix('torch.')} at the largest "
                                      f"|reference logit| (CUDA GEMMs may sum in another order)")
    checks = _evaluate(thresholds, overall, greedy, cache["candidate"]["relative_max"], cache_tol,
                       cand_run.nonfinite, cache["reference"]["relative_max"])
    checks.append(_tokenizer_check(tokenizer_diffs, allow_tokenizer_diff))
    if cand_run.prefix_cache is not None:
        pc = cand_run.prefix_cache
        checks.append({"metric": "prefix_cache_identical", "value": pc["passed"], "op": "==", "threshold": True,
                       "threshold_name": "required", "passed": pc["passed"], "detail": pc["failure"] or ""})
    if short:
        notes.append(f"{len(short)} prompt(s) shorter than --seq-len {seq_len} were extended with the "
                     f"reference's greedy continuation")
    passed = all(c["passed"] for c in checks)
    settings = {"seq_len": seq_len, "max_new_tokens": max_new_tokens, "num_prompts": len(prompt_list),
                "prompts": prompt_origin, "teacher_forced_steps": min(TEACHER_FORCED_STEPS, seq_len - 1),
                "tokenizer": str(tok.path) if tok.path else None,
                "stream_layers": {"mode": stream_layers, "streamed": streaming, "reason": stream_reason, **caps,
                                  **({"memory": {"reference": ref_run.memory, "candidate": cand_run.memory}}
                                     if streaming else {})}}
    timings = {
        "load_reference": ref_run.timings["load"], "load_candidate": cand_run.timings["load"],
        "load": ref_run.timings["load"] + cand_run.timings["load"],
        "forward": ref_run.timings["forward"] + cand_run.timings["forward"],
        "generate": ref_run.timings["generate"] + cand_run.timings["generate"],
        "extend_prompts": ref_run.timings.get("extend", 0.0),
        "metrics": t_metrics,
        "fingerprint_background": fingerprints[0]["seconds"] + fingerprints[1]["seconds"],
    }
    if "prefix_cache" in cand_run.timings:
        timings["prefix_cache"] = cand_run.timings["prefix_cache"]
    timings["total"] = time.perf_counter() - t_start
    timings = {k: round(v, 4) for k, v in timings.items()}
    report = VerifyReport(
        passed=passed, profile=chosen, profile_reason=reason, thresholds=thresholds, checks=checks,
        overall=overall, prompts=per_prompt, cache=cache,
        reference=_describe_ck(ref_ck, fingerprints[0]), candidate=_describe_ck(cand_ck, fingerprints[1]),
        device=str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        dtype=str(dt).removeprefix("torch."), settings=settings, timings=timings, notes=notes,
        prefix_cache=cand_run.prefix_cache, tokenizer={"differences": tokenizer_diffs, "allowed": allow_tokenizer_diff},
        overrides=override_list,
        record=make_record(reference, ref_ck.path, hashes[0], cand_ck.path, hashes[1],
                           {"name": chosen, "reason": reason, "given": profile != "auto", "auto": auto},
                           override_list),
    )
    if report_path is not None:
        write_report(report, Path(report_path))
    if record:
        _record_in_candidate(report, cand_ck, candidate)
    return report


def _decide_streaming(ref_ck: Checkpoint, cand_ck: Checkpoint, dev: torch.device, dt: torch.dtype, mode: str,
                      max_gpu_memory: int | None) -> tuple[bool, str]:
    """Stream both models when either needs it: both sides then run the same kernels (an exact comparison
    on CUDA compares like with like)."""
    decisions = [choose_streaming(ck.path, dev, mode, max_gpu_memory, dt) for ck in (ref_ck, cand_ck)]
    streamed = [d for d in decisions if d[0]]
    return (True, streamed[0][1]) if streamed else decisions[0]


def _check_sizes(num_prompts, seq_len, max_new_tokens) -> None:
    """Bound the run's sizes before anything is opened (a typo must not allocate for minutes)."""
    for flag, value, lo, hi in (("--num-prompts", num_prompts, 1, MAX_NUM_PROMPTS),
                                ("--seq-len", seq_len, 2, MAX_SEQ_LEN),
                                ("--max-new-tokens", max_new_tokens, 0, MAX_NEW_TOKENS)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise NemoconvError(f"{flag} must be an integer from {lo} to {hi}, got {value!r}")


def _decide_profile(ref_ck: Checkpoint, cand_ck: Checkpoint, profile: str) -> tuple[str, str, dict]:
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


def _override_list(chosen: str, auto: dict, thresholds: dict, allow_tokenizer_diff: bool,
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


def _tokenizer_check(diffs: list[str], allow: bool) -> dict:
    detail = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
    if diffs and allow:
        detail += " (allowed with --allow-tokenizer-diff)"
    return {"metric": "tokenizer_differences", "value": len(diffs), "op": "<=", "threshold": 0,
            "threshold_name": "max", "passed": not diffs or allow, "detail": detail}


def _fingerprint_of(ck: Checkpoint, hashes: dict) -> dict:
    """The report's short identity of a checkpoint: one sha256 over its bound files' full hashes."""
    return {"sha256_full": hashes["digest"], "bytes": sum(e["bytes"] for e in hashes["weights"].values()),
            "files": sorted(hashes["weights"]), "seconds": hashes["seconds"]}


def _record_in_candidate(report: VerifyReport, cand_ck: Checkpoint, candidate) -> None:
    """Keep the verdict beside a local candidate (`upload` requires a passing one) and put the metrics in its
    model card. A Hub snapshot in the cache is never written to."""
    if not Path(str(candidate)).expanduser().is_dir():
        return
    try:
        write_report(report, cand_ck.path / VERIFY_REPORT)
        update_card_with_verify(cand_ck.path, report.to_dict())
    except OSError as exc:  # a read-only candidate still gets its verdict on the console and in --report
        report.notes.append(f"could not record the report in {cand_ck.path}: {exc.strerror or exc}")


@contextmanager
def _set_on_error(event: threading.Event):
    try:
        yield
    except BaseException:
        event.set()
        raise


def _cache_summary(items: list[dict]) -> dict:
    return {"relative_max": max((c["relative"] for c in items), default=0.0),
            "max_abs_diff": max((c["max_abs_diff"] for c in items), default=0.0),
            "top1_agreement_min": min((c["top1_agreement"] for c in items), default=1.0),
            "positions": sum(c["positions"] for c in items)}


def _describe_ck(ck: Checkpoint, fp: dict) -> dict:
    q = ck.quantization()
    kv = sum(1 for n in ck.tensor_names() if n.endswith((".k_scale", ".v_scale")))
    return {"path": str(ck.path), "scheme": ck.scheme, "fingerprint": fp, "dtypes": ck.dtype_counts(),
            "quantization": q, "kv_cache_scales": kv, "manifest": None if ck.manifest is None else {
                k: ck.manifest.get(k) for k in ("source", "scheme_from", "scheme_to", "lossless", "dtype")}}


def _check_report_path(path: Path) -> None:
    """Fail before the (long) run when the report cannot be written there."""
    if path.is_dir():
        raise NemoconvError(f"--report {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise NemoconvError(f"--report {path}: directory {parent} is not writable")


def write_report(report: VerifyReport, path: Path) -> None:
    """Write the JSON report atomically: a temporary sibling, fsync, then rename over the target."""
    data = json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NemoconvError(f"--report {path}: cannot write ({exc.strerror or exc})") from None


# ---- progress and rendering ----------------------------------------------------------------------


def render_report(report: VerifyReport, console, fail_line: bool = True) -> None:
    """Per-prompt table and a PASS/FAIL summary line on a rich console (None: print nothing). The CLI passes
    `fail_line=False`: its one FAIL line goes to stderr, and a second copy on stdout would repeat it."""
    if console is None:
        return
    from rich import box
    from rich.table import Table

    console.print(f"[bold]verify[/bold] {report.reference['path']} → {report.candidate['path']} "
                  f"({report.device}, {report.dtype})")
    console.print(f"profile [cyan]{report.profile}[/cyan]: {report.profile_reason}")
    if report.candidate.get("kv_cache_scales"):
        console.print(f"candidate has an FP8 KV cache ({report.candidate['kv_cache_scales']} k_scale/v_scale tensors): "
                      f"its keys and values pass through FP8, so every number below includes the cache's effect",
                      highlight=False)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False, collapse_padding=True)
    for col in ("prompt", "max|Δ|", "mean|Δ|", "cos", "cos min", "KL", "top-1", "greedy", "cache"):
        table.add_column(col, justify="left" if col == "prompt" else "right", no_wrap=True)
    for i, p in enumerate(report.prompts):
        div = p["greedy_first_divergence"]
        table.add_row(f"#{i}", _short(p["max_abs_diff"]), _short(p["mean_abs_diff"]), f"{p['cosine_mean']:.6f}",
                      f"{p['cosine_min']:.6f}", _short(p["kl_mean"]), f"{p['top1_agreement']:.3f}",
                      "same" if div is None else f"≠@{div}", _short(p["cache_candidate"]["relative"]))
    o = report.overall
    table.add_row("overall", _short(o["max_abs_diff"]), _short(o["mean_abs_diff"]), f"{o['cosine_mean']:.6f}",
                  f"{o['cosine_min']:.6f}", _short(o["kl_mean"]), f"{o['top1_agreement']:.3f}",
                  f"{o['greedy_identical_prompts']}/{o['prompts']}", _short(report.cache["candidate"]["relative_max"]),
                  style="bold")
    console.print(table)
    if report.prefix_cache is not None:
        for mode, m in report.prefix_cache["modes"].items():
            st = m["stats"]
            bits = "bit-identical" if m["logits_bitwise"] else f"within {m['max_abs_diff']:.3g}"
            console.print(f"prefix cache [cyan]{mode}[/cyan]: {'same tokens' if m['identical'] else 'DIFFERENT tokens'}"
                          f" as without caching, logits {bits}; {st['hits']}/{st['requests']} requests hit, "
                          f"{st['kv_blocks_shared']} KV blocks shared ({st['kv_bytes_saved'] / 2**20:.1f} MiB), "
                          f"{st['tokens_skipped']} prompt tokens skipped")
    for note in report.notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    for override in report.overrides:
        console.print(f"[yellow]override[/yellow]: {override}", markup=True, highlight=False)
    if report.passed:
        gated = ", ".join(_describe_pass(c) for c in report.checks if c["metric"] != "nonfinite_candidate_logits")
        console.print(f"[bold green]PASS[/bold green] ({report.profile}): {gated}")
    elif fail_line:
        console.print(f"[bold red]FAIL[/bold red]: {report.failure_line()}")


def _short(x) -> str:
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return f"{x:.4g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
    return _fmt(x)


def _describe_pass(c: dict) -> str:
    if c["metric"] == "prefix_cache_identical":
        return "prefix-cached generation identical"
    if c["metric"] == "greedy_divergent_prompts":
        return "greedy tokens identical"
    if c["metric"] == "tokenizer_differences":
        if c["value"]:
            return f"{c['value']} tokenizer difference(s) allowed"
        return "tokenizer and generation ids identical"
    return f"{c['metric']} {_short(c['value'])} {'≥' if c['op'] == '>=' else '≤'} {_short(c['threshold'])}"
