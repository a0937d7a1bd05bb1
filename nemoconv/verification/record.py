"""The verify record: `nemoconv-verify.json` beside a candidate binds a verdict to the bytes it was given on.

`verify` hashes (sha256, whole files, never sampled) every file a serving stack reads from both checkpoints:
the weight files and the side files below. The record keeps those hashes, the reference's identity, the
profile and why, the thresholds and every override, and `passed` as a JSON boolean. `upload` reads it as
hostile input, hashes the files on disk again and refuses (one line, exit 2) anything that does not
belong: no record, `passed` not exactly `true`, a malformed record, files that changed or were swapped
after the PASS, a self-verification, or a PASS that needed an override. `--force` uploads anyway and says
why in the commit message.

The record is not signed: whoever can write the directory can write a record. What it does stop is a
verdict travelling to bytes it was never given on (an edit after the PASS, a record copied from elsewhere).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nemoconv.checkpoint.hub import VERIFY_REPORT
from nemoconv.errors import NemoconvError
from nemoconv.untrusted import load_json, want_dict, want_list, want_str

RECORD_FORMAT = 1
# Besides the weights, what a serving stack reads: the network, the tokenizer, the generation ids, the scales.
BOUND_SIDE_FILES = ("config.json", "model.safetensors.index.json", "generation_config.json", "hf_quant_config.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 8 << 20


# ---- hashing (verify runs this in the background while the models load) ------------------------------------


class Cancelled(Exception):
    """Hashing stopped because verify failed meanwhile."""


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            if stop is not None and stop.is_set():
                raise Cancelled
            h.update(view[:n])
    return h.hexdigest()


def bound_files(ck) -> tuple[list[Path], list[Path]]:
    """(weight files, side files present) of an opened checkpoint: what a record binds."""
    side = [ck.path / name for name in BOUND_SIDE_FILES if (ck.path / name).is_file()]
    return sorted(ck.shard_files, key=lambda p: p.name), side


def hash_checkpoint(ck, stop: threading.Event | None = None) -> dict:
    """Full sha256 and size of every bound file: {"weights": {name: {...}}, "files": {name: {...}}}."""
    t0 = time.perf_counter()
    weights, side = bound_files(ck)

    def table(paths: list[Path]) -> dict:
        return {p.name: {"sha256": sha256_file(p, stop), "bytes": p.stat().st_size} for p in paths}

    try:
        out = {"weights": table(weights), "files": table(side)}
    except Cancelled:
        return {"cancelled": True}
    out["digest"] = combined_digest(out)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def combined_digest(hashes: dict) -> str:
    """One sha256 naming the whole set: over sorted `kind/name<TAB>sha256` lines."""
    lines = sorted(f"{kind}/{name}\t{entry['sha256']}\n" for kind in ("weights", "files")
                   for name, entry in hashes[kind].items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def reference_identity(given, path: Path) -> str:
    """How a record names the reference: `org/name@commit` for a Hub snapshot, else its resolved path."""
    text = str(given)
    resolved = Path(path).resolve()
    if not Path(text).expanduser().exists() and "/" in text:
        repo_id = text.split("@", 1)[0]
        commit = resolved.name if resolved.parent.name == "snapshots" else text.partition("@")[2] or "?"
        return f"{repo_id}@{commit}"
    return str(resolved)


def make_record(reference_given, ref_path: Path, ref_hashes: dict, cand_path: Path, cand_hashes: dict,
                profile: dict, overrides: list[str]) -> dict:
    """The `record` section of a verify report (the report's top-level `passed` is the verdict)."""
    return {
        "format": RECORD_FORMAT,
        "reference": {"identity": reference_identity(reference_given, ref_path), "path": str(Path(ref_path).resolve()),
                      **_bound(ref_hashes)},
        "candidate": {"path": str(Path(cand_path).resolve()), **_bound(cand_hashes)},
        "profile": profile,
        "overrides": overrides,
    }


def _bound(hashes: dict) -> dict:
    return {"digest": hashes["digest"], "weights": hashes["weights"], "files": hashes["files"]}


# ---- checking a record (upload) ------------------------------------------------------------------------------


@dataclass
class RecordCheck:
    """What upload learned from the record: the commit message's verify clause and what --force overrode."""

    clause: str
    forced: list[str] = field(default_factory=list)


def check_record(directory: Path, ck, force: bool) -> RecordCheck:
    """Read DIR's record and check it against the files now on disk. Each problem raises NemoconvError
    (one line) unless `force`, which collects them for the commit message instead."""
    directory = Path(directory)
    problems: list[str] = []
    clause = "unverified"
    path = directory / VERIFY_REPORT
    if not path.is_file():
        problems.append(f"no verify record ({VERIFY_REPORT}); run `nemoconv verify REFERENCE {directory}` first")
    else:
        try:
            report = _parse(path)
        except NemoconvError as exc:
            problems.append(f"its verify record is malformed: {exc}")
        else:
            clause = _clause(report)
            problems += _problems(report, ck, directory)
    if problems and not force:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise NemoconvError(f"{directory}: {problems[0]}{more}; pass --force to upload anyway")
    return RecordCheck(clause, problems)


def _parse(path: Path) -> dict:
    """The fields upload relies on, type-checked (anything else in the report is information)."""
    what = path.name
    report = want_dict(load_json(path, what), what)
    passed = report.get("passed")
    if passed is not True and passed is not False:
        raise NemoconvError(f"{what}: 'passed' is {passed!r}, not a JSON boolean")
    record = want_dict(report.get("record"), f"{what}: record")
    if record.get("format") != RECORD_FORMAT:
        raise NemoconvError(f"{what}: record format {record.get('format')!r} is not {RECORD_FORMAT}")
    for side in ("reference", "candidate"):
        entry = want_dict(record.get(side), f"{what}: record.{side}")
        want_str(entry.get("path"), f"{what}: record.{side}.path")
        _want_sha(entry.get("digest"), f"{what}: record.{side}.digest")
        for kind in ("weights", "files"):
            for name, item in want_dict(entry.get(kind), f"{what}: record.{side}.{kind}").items():
                item = want_dict(item, f"{what}: record.{side}.{kind}[{name!r}]")
                _want_sha(item.get("sha256"), f"{what}: record.{side}.{kind}[{name!r}].sha256")
    want_str(record["reference"].get("identity"), f"{what}: record.reference.identity")
    profile = want_dict(record.get("profile"), f"{what}: record.profile")
    want_str(profile.get("name"), f"{what}: record.profile.name")
    for i, o in enumerate(want_list(record.get("overrides"), f"{what}: record.overrides")):
        want_str(o, f"{what}: record.overrides[{i}]")
    for i, c in enumerate(want_list(report.get("checks"), f"{what}: checks")):
        if not isinstance(want_dict(c, f"{what}: checks[{i}]").get("passed"), bool):
            raise NemoconvError(f"{what}: checks[{i}].passed is not a JSON boolean")
    if report.get("summary") is not None:
        want_dict(report["summary"], f"{what}: summary")
    return report


def _want_sha(value, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise NemoconvError(f"{what} is not a sha256 hex digest")
    return value


def _problems(report: dict, ck, directory: Path) -> list[str]:
    record = report["record"]
    problems = []
    if report["passed"] is not True:
        problems.append("its verify record says FAIL; fix the checkpoint and verify again")
    elif not all(c["passed"] is True for c in report["checks"]):
        problems.append("its verify record says passed, but one of its checks failed")
    now = hash_checkpoint(ck)
    cand = record["candidate"]
    problems += _binding_problems(cand, now)
    ref = record["reference"]
    same_path = Path(ref["path"]) == Path(directory).resolve()
    same_weights = sorted(e["sha256"] for e in ref["weights"].values()) == \
        sorted(e["sha256"] for e in now["weights"].values())
    if same_path or same_weights:
        problems.append(f"it was verified against itself ({'the same directory' if same_path else 'the same weights'}"
                        f", {ref['identity']}); verify against the checkpoint it was made from")
    if record["overrides"]:
        problems.append(f"its PASS needed overrides ({'; '.join(record['overrides'])})")
    return problems


def _binding_problems(recorded: dict, now: dict) -> list[str]:
    """The record's hashes against the files on disk now: same weight files, same side files, same bytes."""
    problems = []
    for kind, label in (("weights", "weight files"), ("files", "side files")):
        was, is_ = recorded[kind], now[kind]
        if set(was) != set(is_):
            added, gone = sorted(set(is_) - set(was)), sorted(set(was) - set(is_))
            parts = ([f"not in the record: {', '.join(added[:3])}"] if added else []) + \
                    ([f"recorded but gone: {', '.join(gone[:3])}"] if gone else [])
            problems.append(f"its {label} differ from the verify record ({'; '.join(parts)})")
        for name in sorted(set(was) & set(is_)):
            if was[name]["sha256"] != is_[name]["sha256"]:
                problems.append(f"{name} is not the file that was verified (changed since, or the record is "
                                f"another checkpoint's: recorded sha256 {was[name]['sha256'][:12]}…, on disk "
                                f"{is_[name]['sha256'][:12]}…)")
    return problems


def _clause(report: dict) -> str:
    """'verified against REF (sha256 ab12…) with profile P: PASS (cos …, top-1 …, KL …)'."""
    record = report["record"]
    ref = record["reference"]
    summary = report.get("summary") or {}
    metrics = [f"{label} {_num(summary.get(key))}" for key, label in
               (("cosine_mean", "cos"), ("top1_agreement", "top-1"), ("kl_mean", "KL"), ("max_abs_diff", "max|Δ|"))
               if isinstance(summary.get(key), (int, float)) and not isinstance(summary.get(key), bool)]
    verdict = "PASS" if report["passed"] is True else "FAIL"
    return (f"verified against {ref['identity']} (sha256 {ref['digest'][:12]}…) with profile "
            f"{record['profile']['name']}: {verdict}" + (f" ({', '.join(metrics)})" if metrics else ""))


def _num(x) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)
