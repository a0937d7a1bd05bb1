"""`nemoconv verify`: the parity gate between a reference checkpoint and a converted or quantized candidate.

Both checkpoints run in the built-in model on one device and dtype, one after the other (so only one model is
in memory at a time), over the same prompts of exactly `seq_len` tokens (`verification.runner`). The full
forward's prompt positions give the reference/candidate comparison (max/mean |Δ|, cosine, KL(ref‖cand),
top-1); the greedy tokens give the continuation match; each model's cached logits against its full forward
give cache consistency (`verification.gate`). Thresholds come from a profile (`verification.profiles`): the
user's, or the one the two checkpoints' tensors call for, never what the candidate's manifest says. The
tokenizers and generation ids must match (`prompts.tokenizer_differences`) unless allowed. The verdict is
recorded with full hashes of both sides' files (`verification.record`), and every override with it.

This module is the order of those steps; each step lives in `nemoconv/verification/`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nemoconv.checkpoint.local import Checkpoint, open_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.limits import MAX_NEW_TOKENS, MAX_PROMPTS, MAX_SEQ_LEN
from nemoconv.model.device import resolve_device, resolve_dtype
from nemoconv.progress import Progress
from nemoconv.storage.paths import check_report_path
from nemoconv.verification.fingerprint import describe_checkpoint, fingerprint_of
from nemoconv.verification.gate import Comparison, Gate, compare_runs, decide_gate, gate_checks
from nemoconv.verification.memory import choose_streaming, parse_memory_size
from nemoconv.verification.profiles import PROFILE_NAMES, PROFILES, check_same_network, fp8_count
from nemoconv.verification.prompts import (
    Prompt,
    builtin_prompts,
    find_tokenizer,
    fit_prompts,
    prompts_from_list,
    read_prompt_file,
)
from nemoconv.verification.record import hash_checkpoint, make_record
from nemoconv.verification.report import VerifyReport, record_in_candidate, write_report
from nemoconv.verification.runner import TEACHER_FORCED_STEPS, ModelRun, run_model, start_warmup
from nemoconv.verification.streamed import run_model_streamed


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
    mode (memory, state) and require the tokens of caching off (`check_prefix_caching`).
    stream_layers: auto|on|off — run the models one layer at a time (`verification.streamed`); auto when the
    whole model does not fit max_gpu_memory (e.g. "6GB") or the device's free memory. max_host_memory caps the
    host memory a streamed run uses.
    """
    t_start = time.perf_counter()
    _check_sizes(num_prompts, seq_len, max_new_tokens)
    if profile != "auto" and profile not in PROFILES:
        raise NemoconvError(f"unknown profile {profile!r} (use auto, {', '.join(PROFILE_NAMES)})")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    caps = {"max_gpu_memory": parse_memory_size(max_gpu_memory, "--max-gpu-memory"),
            "max_host_memory": parse_memory_size(max_host_memory, "--max-host-memory")}
    ref_ck, cand_ck = open_checkpoint(reference), open_checkpoint(candidate)
    notes = check_same_network(ref_ck, cand_ck)
    streaming = _decide_streaming(ref_ck, cand_ck, dev, dt, stream_layers, caps, prefix_cache, notes)
    gate = decide_gate(ref_ck, cand_ck, profile, overrides, dt, allow_tokenizer_diff)
    if report_path is not None:
        check_report_path(Path(report_path))
    batch = _prompts(ref_ck, cand_ck, prompts, num_prompts, seq_len, notes)
    if not streaming.on:  # the streamed path runs other shapes, and the warm-up's memory would count against a cap
        start_warmup(ref_ck.spec, dev, dt, fp8_count(cand_ck) > 0, len(batch.prompts), seq_len, max_new_tokens)

    run = _run_both(ref_ck, cand_ck, dev, dt, batch, seq_len, max_new_tokens, prefix_cache, gate, quiet, streaming)
    checks = gate_checks(gate, run.comparison, run.candidate, dev, dt)
    if batch.short:
        notes.append(f"{len(batch.short)} prompt(s) shorter than --seq-len {seq_len} were extended with the "
                     f"reference's greedy continuation")
    settings = {"seq_len": seq_len, "max_new_tokens": max_new_tokens, "num_prompts": len(batch.prompts),
                "prompts": batch.origin, "teacher_forced_steps": min(TEACHER_FORCED_STEPS, seq_len - 1),
                "tokenizer": batch.tokenizer, "stream_layers": streaming.describe(run)}
    report = _report(ref_ck, cand_ck, reference, gate, run, checks, dev, dt, settings, notes, t_start)
    if report_path is not None:
        write_report(report, Path(report_path))
    if record:
        record_in_candidate(report, cand_ck, candidate)
    return report


@dataclass
class Streaming:
    """Whether both models run one layer at a time (`verification.streamed`), why, and under which caps."""

    on: bool
    mode: str
    reason: str
    caps: dict

    def describe(self, run: "BothRuns") -> dict:
        memory = {"memory": {"reference": run.reference.memory, "candidate": run.candidate.memory}} if self.on else {}
        return {"mode": self.mode, "streamed": self.on, "reason": self.reason, **self.caps, **memory}


def _decide_streaming(ref_ck: Checkpoint, cand_ck: Checkpoint, dev: torch.device, dt: torch.dtype, mode: str,
                      caps: dict, prefix_cache: bool, notes: list[str]) -> Streaming:
    """Stream both models when either needs it: both sides then run the same kernels (an exact comparison on
    CUDA compares like with like)."""
    decisions = [choose_streaming(ck.path, dev, mode, caps["max_gpu_memory"], dt) for ck in (ref_ck, cand_ck)]
    on, reason = next((d for d in decisions if d[0]), decisions[0])
    if on and prefix_cache:
        raise NemoconvError(f"--prefix-cache needs the whole model: it cannot run with layer streaming ({reason})")
    if on:
        notes.append(reason)
    return Streaming(on, mode, reason, caps)


def _check_sizes(num_prompts, seq_len, max_new_tokens) -> None:
    """Bound the run's sizes before anything is opened (a typo must not allocate for minutes)."""
    for flag, value, lo, hi in (("--num-prompts", num_prompts, 1, MAX_PROMPTS),
                                ("--seq-len", seq_len, 2, MAX_SEQ_LEN),
                                ("--max-new-tokens", max_new_tokens, 0, MAX_NEW_TOKENS)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise NemoconvError(f"{flag} must be an integer from {lo} to {hi}, got {value!r}")


@dataclass
class PromptBatch:
    prompts: list[Prompt]        # each cut to seq_len, or to be extended by the reference
    short: list[Prompt]          # the ones the reference extends
    origin: str                  # where they came from (the report's settings)
    tokenizer: str | None        # the tokenizer file used, if any


def _prompts(ref_ck: Checkpoint, cand_ck: Checkpoint, prompts, num_prompts: int, seq_len: int,
             notes: list[str]) -> PromptBatch:
    """The prompts, encoded with the checkpoints' tokenizer (a note says which, or why none)."""
    vocab = ref_ck.spec.vocab_size
    tok = find_tokenizer(ref_ck.path, cand_ck.path)
    if tok.note:
        notes.append(tok.note)
    if prompts is None:
        prompt_list = builtin_prompts(num_prompts, seq_len, tok.tokenizer, vocab)
        origin = "built-in " + ("texts" if tok.tokenizer is not None else "seeded token ids")
    elif isinstance(prompts, (list, tuple)):
        prompt_list, origin = prompts_from_list(prompts, tok.tokenizer, vocab), "given as a list"
    else:
        prompt_list, origin = read_prompt_file(prompts, tok.tokenizer, vocab), str(prompts)
    if len(prompt_list) > MAX_PROMPTS:
        raise NemoconvError(f"{len(prompt_list)} prompts: at most {MAX_PROMPTS} are compared in one run")
    prompt_list, short = fit_prompts(prompt_list, seq_len)
    return PromptBatch(prompt_list, short, origin, str(tok.path) if tok.path else None)


@dataclass
class BothRuns:
    reference: ModelRun
    candidate: ModelRun
    comparison: Comparison
    hashes: tuple[dict, dict]    # record.hash_checkpoint of the reference and of the candidate


def _run_both(ref_ck: Checkpoint, cand_ck: Checkpoint, dev: torch.device, dt: torch.dtype, batch: PromptBatch,
              seq_len: int, max_new_tokens: int, prefix_cache: bool, gate: Gate, quiet: bool,
              streaming: Streaming) -> BothRuns:
    """The reference, then the candidate, then their comparison; meanwhile every bound file of both is hashed
    whole in the background (the record)."""
    n = len(batch.prompts)
    stop = threading.Event()  # set on an error, so the hashing threads end early
    with ThreadPoolExecutor(max_workers=2) as pool, Progress("", quiet=quiet) as progress, _set_on_error(stop):
        fp_ref = pool.submit(hash_checkpoint, ref_ck, stop)
        fp_cand = pool.submit(hash_checkpoint, cand_ck, stop)
        progress.phase("verify: reference", total=n)
        if streaming.on:
            ref_run = run_model_streamed(ref_ck.path, dev, dt, batch.prompts, seq_len, max_new_tokens,
                                         bool(batch.short), progress.advance, **streaming.caps)
        else:
            ref_run = run_model(ref_ck.path, dev, dt, batch.prompts, seq_len, max_new_tokens, bool(batch.short),
                                progress.advance)
        if ref_run.nonfinite:
            raise NemoconvError(f"{ref_ck.path}: the reference produces {ref_run.nonfinite} non-finite logits "
                                f"in {dt}; it cannot serve as a reference")
        progress.phase("verify: candidate", total=n)
        if streaming.on:  # teacher-forced on the reference's continuation: one pass, the same first divergence
            cand_run = run_model_streamed(cand_ck.path, dev, dt, batch.prompts, seq_len, max_new_tokens, False,
                                          progress.advance, follow=ref_run.generated, **streaming.caps)
        else:
            cand_run = run_model(cand_ck.path, dev, dt, batch.prompts, seq_len, max_new_tokens, False,
                                 progress.advance, prefix_cache=prefix_cache)
        progress.phase("verify: compare")
        comparison = compare_runs(batch.prompts, ref_run, cand_run, dev, gate.thresholds["max_cache_relative"])
        hashes = fp_ref.result(), fp_cand.result()
    return BothRuns(ref_run, cand_run, comparison, hashes)


@contextmanager
def _set_on_error(event: threading.Event):
    try:
        yield
    except BaseException:
        event.set()
        raise


def _report(ref_ck: Checkpoint, cand_ck: Checkpoint, reference, gate: Gate, run: BothRuns, checks: list[dict],
            dev: torch.device, dt: torch.dtype, settings: dict, notes: list[str], t_start: float) -> VerifyReport:
    fingerprints = tuple(fingerprint_of(ck, h) for ck, h in zip((ref_ck, cand_ck), run.hashes))
    ref_run, cand_run = run.reference, run.candidate
    return VerifyReport(
        passed=all(c["passed"] for c in checks), profile=gate.profile, profile_reason=gate.reason,
        thresholds=gate.thresholds, checks=checks, overall=run.comparison.overall,
        prompts=run.comparison.per_prompt, cache=run.comparison.cache,
        reference=describe_checkpoint(ref_ck, fingerprints[0]), candidate=describe_checkpoint(cand_ck, fingerprints[1]),
        device=str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        dtype=str(dt).removeprefix("torch."), settings=settings,
        timings=_timings(ref_run, cand_run, run.comparison.seconds, fingerprints, t_start), notes=notes,
        prefix_cache=cand_run.prefix_cache,
        tokenizer={"differences": gate.tokenizer_diffs, "allowed": gate.allow_tokenizer_diff},
        overrides=gate.overrides,
        record=make_record(reference, ref_ck.path, run.hashes[0], cand_ck.path, run.hashes[1], gate.profile_record(),
                           gate.overrides),
    )


def _timings(ref_run: ModelRun, cand_run: ModelRun, t_metrics: float, fingerprints: tuple[dict, dict],
             t_start: float) -> dict:
    """Seconds per step, rounded (the report's timings_s)."""
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
    return {k: round(v, 4) for k, v in timings.items()}
