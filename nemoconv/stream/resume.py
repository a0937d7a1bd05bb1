"""Resumable outputs: an interrupted convert or quantize continues from its last completed shard.

The output is written into `.OUT.nemoconv-partial-<key>` (beside OUT, never visible as OUT), where `<key>` is a
digest of the command, its inputs (every source file's size, mtime and a hash of its head and tail) and every
option that changes the output. `nemoconv-resume.jsonl` in it is the journal: a header (the key's parts and
a digest of the planned content), then one line per completed shard (name and fingerprint: size, mtime and a
hash of its head and tail; and the command's state, e.g. quantize's per-module scales), each appended only after
the shard is fsync'ed, and fsync'ed itself. A shard is journaled once the next one is complete, or on an
interrupt; the last one never is (a SIGKILL costs at most one complete shard more, an uninterrupted run never
waits for the disk). (A fingerprint, not a hash of every byte: rereading a written shard
to hash it cost more than a third of a conversion, and a shard changed after its journal line changes its size
or mtime. Whoever can rewrite a shard and restore its mtime can rewrite the journal too.)

A rerun of the same command finds its partial by name, checks the header and every journaled shard (its
fingerprint) and writes only the shards after them; the journal is removed and the directory published at
OUT by the same no-replace rename or exchange as any output (`output.publish`). A partial of another
command, other inputs or other options is removed (one line on stderr says why) and never mixed in. Each
run holds an flock on its partial: a partial in use by a live run is left alone (a second run of the same
command writes into a private temporary directory instead, as a non-resumable run does).

On an interrupt (SIGINT, SIGTERM, a KeyboardInterrupt) or an I/O error with at least one shard completed,
the partial is kept for the next run; otherwise it is removed as any temporary output. SIGKILL and power
loss keep it by nature: the journal only ever names shards that are on disk whole.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from nemoconv.errors import Interrupted, NemoconvError
from nemoconv.stream.output import (
    _io_error,
    _new_temp_dir,
    prepare_output,
    publish,
)
from nemoconv.untrusted import parse_json

PARTIAL_TAG = ".nemoconv-partial-"
JOURNAL_NAME = "nemoconv-resume.jsonl"
_HEAD_BYTES = 1 << 16


def file_fingerprint(path: Path) -> list:
    """[size, mtime_ns, sha256 of the first and last 64 KiB]: a changed file differs in one of them."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
        if st.st_size > _HEAD_BYTES:
            f.seek(max(_HEAD_BYTES, st.st_size - _HEAD_BYTES))
            h.update(f.read(_HEAD_BYTES))
    return [st.st_size, st.st_mtime_ns, h.hexdigest()[:32]]


def source_fingerprint(directory: Path, extra: list[Path] = ()) -> dict[str, list]:
    """Every regular file at the top of a source directory, and `extra` files (shards elsewhere, a calibration
    file, a config), by path."""
    files = {p for p in Path(directory).iterdir() if p.is_file()} | {Path(p) for p in extra if p is not None}
    return {os.path.abspath(p): file_fingerprint(p) for p in sorted(files)}


@dataclass
class ResumeKey:
    """What an output depends on. `inputs`: file → fingerprint; `options`: flag → value (JSON values);
    `content`: a digest of what was planned and computed (checked on resume, not part of the name)."""

    command: str
    inputs: dict
    options: dict
    content: str = ""

    def header(self) -> dict:
        return {"nemoconv_resume": 1, "command": self.command, "inputs": self.inputs, "options": self.options}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode()).hexdigest()[:16]


def digest_of(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Partial:
    """An open partial output: its directory, the shards already complete (name, fingerprint) and the state
    journaled with the last of them."""

    directory: Path
    key: ResumeKey | None  # None: a private temporary directory (no journal, not resumable)
    done: list[dict] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    _journal: object = None

    _pending: tuple | None = None  # (path, journal line) of the last completed shard, not journaled yet

    def shard_done(self, path: Path, state: dict | None) -> None:
        """A shard is complete. Its journal line waits until the next shard is complete (by then its bytes have
        had a shard's time to reach the disk, so the fsync rarely waits) or the run is interrupted. The last
        shard is never journaled: only the publish follows it, and a run killed in between rewrites that one
        shard, where an fsync of it would make every run wait for the disk, which cp never does."""
        if self.key is None:
            return
        self.journal_pending()
        self._pending = (path, {"shard": path.name, "state": json.loads(json.dumps(state or {}))})

    def journal_pending(self) -> None:
        """Journal the completed shard still waiting: its bytes reach the disk first, then the journal line."""
        if self._pending is None:
            return
        path, line = self._pending
        self._pending = None
        line = {**line, "fingerprint": _synced_fingerprint(path)}
        self._journal.write((json.dumps(line, sort_keys=True) + "\n").encode())
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.done.append(line)


def _synced_fingerprint(path: Path) -> list:
    """The shard's bytes on disk first (fsync), then its fingerprint (the mtime is final once it is synced)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return file_fingerprint(path)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextmanager
def resumable_output(out: str | Path, overwrite: bool, key: ResumeKey, shard_names: list[str],
                     fresh: bool = False) -> Iterator[Partial]:
    """Like `output.atomic_output`, in a partial directory that survives an interrupt and is resumed by the same
    command (`fresh`: any partial of OUT is discarded first, as --no-resume asks)."""
    out = Path(os.path.realpath(Path(out).expanduser()))
    prepare_output(out, overwrite)
    lock_fd, partial = _claim(out, key, shard_names, fresh)
    publishing = False
    try:
        yield partial
        if partial.key is not None:
            partial._journal.close()
            (partial.directory / JOURNAL_NAME).unlink()
        publishing = True
        publish(partial.directory, out, overwrite)
    except (Interrupted, KeyboardInterrupt, OSError) as exc:
        if publishing:  # complete, but not published: removed as any temporary output (nothing left to resume)
            shutil.rmtree(partial.directory, ignore_errors=True)
        else:
            _journal_last(partial)
            _keep_or_remove(partial, len(shard_names))
        if isinstance(exc, OSError):
            raise _io_error(exc, f"writing {out}") from None
        raise
    except BaseException:
        shutil.rmtree(partial.directory, ignore_errors=True)
        raise
    finally:
        if partial._journal is not None:
            partial._journal.close()
        if lock_fd is not None:
            os.close(lock_fd)




def _journal_last(partial: Partial) -> None:
    """On an interrupt, the last completed shard is journaled too, so that the next run skips it."""
    if partial.key is None:
        return
    try:
        partial.journal_pending()
    except OSError:  # e.g. the disk is full: that shard is written again
        pass


def _keep_or_remove(partial: Partial, shards: int) -> None:
    if partial.key is not None and partial.done:
        _say(f"note: {len(partial.done)} of {shards} shard(s) are kept in {partial.directory}; the same command "
             f"resumes from there (--no-resume starts over)")
    else:
        shutil.rmtree(partial.directory, ignore_errors=True)


def _lock(directory: Path) -> int | None:
    """A non-blocking exclusive flock on a directory; None when a live run holds it (or it is gone)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _partials(out: Path) -> list[Path]:
    return [Path(p) for p in sorted(glob.glob(glob.escape(str(out.parent / f".{out.name}{PARTIAL_TAG}")) + "*"))]


def _claim(out: Path, key: ResumeKey, shard_names: list[str], fresh: bool) -> tuple[int | None, Partial]:
    """Our partial, resumed or new (others of OUT removed, saying why); a private directory when a live run of
    the same command holds ours."""
    mine = out.parent / f".{out.name}{PARTIAL_TAG}{key.digest}"
    for other in _partials(out):
        if other != mine or fresh:
            _discard(other, key, mine, fresh)
    try:
        if mine.exists():
            fd = _lock(mine)
            if fd is None:  # a live run of this very command: write privately, as before resuming existed
                return None, Partial(_new_temp_dir(out), None)
            partial = _resume(mine, key, shard_names)
            if partial is not None:
                return fd, partial
            os.close(fd)
            shutil.rmtree(mine)
        return _create(out, mine, key)
    except OSError as exc:
        raise _io_error(exc, f"cannot create output next to {out}") from None


def _discard(other: Path, key: ResumeKey, mine: Path, fresh: bool) -> None:
    fd = _lock(other)
    if fd is None:
        return  # in use by a live run
    try:
        header = _read_journal(other)[0] if other != mine or fresh else None
        why = "--no-resume" if fresh else _difference(header, key)
        if why and header is not None:
            _say(f"note: starting over ({why}); removed the partial output of an interrupted run")
        shutil.rmtree(other, ignore_errors=True)
    finally:
        os.close(fd)


def _difference(header: dict | None, key: ResumeKey) -> str | None:
    """Why a partial's header does not fit this run, in words."""
    if header is None:
        return None
    if header.get("command") != key.command:
        return f"the interrupted run was `{header.get('command')}`, this is `{key.command}`"
    old_inputs, old_options = header.get("inputs") or {}, header.get("options") or {}
    for flag, value in key.options.items():
        if old_options.get(flag) != value:
            return f"{flag} changed: {old_options.get(flag)!r} → {value!r}"
    for path in sorted(set(old_inputs) | set(key.inputs)):
        if old_inputs.get(path) != key.inputs.get(path):
            what = "is new" if path not in old_inputs else "is gone" if path not in key.inputs else "changed"
            return f"input {path} {what} since the interrupted run"
    return "the interrupted run's options differ"


def _read_journal(directory: Path) -> tuple[dict | None, list[dict]]:
    """The header and the complete shard lines (a torn last line, from a kill mid-write, is ignored)."""
    try:
        data = (directory / JOURNAL_NAME).read_bytes()
    except OSError:
        return None, []
    lines = []
    for raw in data.split(b"\n"):
        try:
            value = parse_json(raw, JOURNAL_NAME)
        except NemoconvError:
            break
        if not isinstance(value, dict):
            break
        lines.append(value)
    if not lines or lines[0].get("nemoconv_resume") != 1:
        return None, []
    return lines[0], lines[1:]


def _resume(directory: Path, key: ResumeKey, shard_names: list[str]) -> Partial | None:
    """The partial to continue, or None (after saying why) when it cannot be."""
    header, shards = _read_journal(directory)
    if header is None:
        return None  # killed before its header was written: nothing to resume
    why = _difference(header, key) if {k: header.get(k) for k in key.header()} != key.header() else None
    if why is None and header.get("content") != key.content:
        why = "the planned output differs from the interrupted run's (e.g. calibration gave other values)"
    if why is None:
        why = _check_shards(directory, shards, shard_names)
    if why is not None:
        _say(f"note: starting over ({why}); removed the partial output of an interrupted run")
        return None
    keep = {JOURNAL_NAME} | {s["shard"] for s in shards}
    for p in directory.iterdir():  # a shard being written when the run stopped, or files written after the last
        if p.name not in keep:
            p.unlink()
    journal = _rewrite_journal(directory, [header, *shards])  # without a torn last line
    if shards:
        _say(f"resuming: {len(shards)} of {len(shard_names)} shard(s) were written by an interrupted run")
    return Partial(directory, key, list(shards), dict(shards[-1]["state"]) if shards else {}, journal)


def _rewrite_journal(directory: Path, lines: list[dict]):
    """The journal with exactly these lines (replaced atomically), open for appending."""
    tmp = directory / (JOURNAL_NAME + ".new")
    with open(tmp, "wb") as f:
        f.write(b"".join((json.dumps(line, sort_keys=True) + "\n").encode() for line in lines))
        os.fsync(f.fileno())
    os.replace(tmp, directory / JOURNAL_NAME)
    return open(directory / JOURNAL_NAME, "ab", buffering=0)


def _check_shards(directory: Path, shards: list[dict], shard_names: list[str]) -> str | None:
    for k, line in enumerate(shards):
        name = line.get("shard")
        if k >= len(shard_names) or name != shard_names[k] or not isinstance(line.get("state"), dict):
            return f"its journal names shard {str(name)[:80]!r} out of this run's plan"
        path = directory / name
        if not path.is_file() or path.is_symlink() or file_fingerprint(path) != line.get("fingerprint"):
            return f"its shard {name} is not the one it journaled"
    return None


def _create(out: Path, mine: Path, key: ResumeKey) -> tuple[int | None, Partial]:
    """A new partial: made privately with its journal header, then renamed into place (never seen half-made).
    Interrupted while it is made, it is removed: it holds nothing to resume."""
    tmp, placed = _new_temp_dir(out), False
    try:
        fd = _lock(tmp)
        journal = open(tmp / JOURNAL_NAME, "wb", buffering=0)
        journal.write((json.dumps({**key.header(), "content": key.content}, sort_keys=True) + "\n").encode())
        os.fsync(journal.fileno())
        try:
            # rename(2) fails on a non-empty target, and every partial holds its journal: no partial is replaced
            os.replace(tmp, mine)
        except OSError:  # a run of the same command made it meanwhile: stay private
            journal.close()
            (tmp / JOURNAL_NAME).unlink()
            return fd, Partial(tmp, None)
        placed = True
        dir_fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return fd, Partial(mine, key, _journal=journal)
    except BaseException:
        shutil.rmtree(mine if placed else tmp, ignore_errors=True)
        raise
