"""What `verify` decided, as data: the `VerifyReport`, its JSON (written atomically), and its record beside a
local candidate (the verify file and the model card). The console rendering lives in the CLI
(`nemoconv.cli.render_verify`); the one failure line lives here, because the JSON carries it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from nemoconv.checkpoint.hub import VERIFY_REPORT
from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.stream.card import update_card_with_verify
from nemoconv.version import __version__


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
        line = describe_check(failed[0]) + f" (profile {self.profile})"
        if len(failed) > 1:
            line += f"; also failed: {', '.join(c['metric'] for c in failed[1:])}"
        return line

    def summary(self) -> dict:
        """The headline numbers, flat (what a model card or a CI log shows)."""
        keys = ("max_abs_diff", "mean_abs_diff", "cosine_mean", "cosine_min", "kl_mean", "top1_agreement",
                "greedy_identical_prompts", "prompts", "positions")
        return {**{k: self.overall[k] for k in keys}, "cache_relative_max": self.cache["candidate"]["relative_max"]}

    def to_dict(self) -> dict:
        return json_safe({
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


def describe_check(c: dict) -> str:
    """A failed check as text: the metric, its value, the threshold it missed."""
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
    value = format_number(c["value"], differ_from=c["threshold"])
    line = f"{c['metric']} {value} {op} {c['threshold_name']} {threshold}"
    return line + (f" ({c['detail']})" if c.get("detail") else "")


def format_number(x, differ_from=None) -> str:
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


def json_safe(obj):
    """Nested data → JSON-valid data: non-finite floats become strings ("nan", "inf")."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


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


def record_in_candidate(report: VerifyReport, cand_ck: Checkpoint, candidate) -> None:
    """Keep the verdict beside a local candidate (`upload` requires a passing one) and put the metrics in its
    model card. A Hub snapshot in the cache is never written to."""
    if not Path(str(candidate)).expanduser().is_dir():
        return
    try:
        write_report(report, cand_ck.path / VERIFY_REPORT)
        update_card_with_verify(cand_ck.path, report.to_dict())
    except OSError as exc:  # a read-only candidate still gets its verdict on the console and in --report
        report.notes.append(f"could not record the report in {cand_ck.path}: {exc.strerror or exc}")
