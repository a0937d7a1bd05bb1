"""Atomic output directories and sharded safetensors writing (docs/DESIGN.md §2).

Everything is written into a hidden temporary sibling of OUT (`.OUT.nemoconv-tmp-PID-XXXX`) and published
only when complete: a failure (or a kill) leaves no output and leaves an existing output untouched. OUT is
resolved (links, `..`) once at the start and every step works on that path.

Publishing a new output (no --overwrite) is a no-replace rename, so a directory that appears at OUT during
the run is never deleted, and of two runs into one OUT exactly one succeeds (the other exits 2 and removes
only its own temporary directory):
- Linux: renameat2(RENAME_NOREPLACE). An empty directory at OUT (one the user made, say) is taken: it is
  removed with rmdir, which only ever removes an empty directory, and the rename is tried once more.
- Elsewhere (no renameat2, or a filesystem without the flag): the same steps under an exclusive flock on
  OUT's parent directory, which every nemoconv publisher takes, with an lstat check before a plain rename.
  rename(2) of a directory fails on a non-empty target, so a non-nemoconv process could at worst lose an
  empty directory it created in the instant between the check and the rename.

Replacing an output (--overwrite):
- Linux: renameat2(RENAME_EXCHANGE) swaps the new and old directories atomically; the old one, now under
  the temporary name, is deleted. Killed before that, it is a stale temporary directory: the output it held
  had been replaced by a complete one, as asked, and the next run removes it.
- Fallback: two renames under the parent lock: OUT → `.OUT.nemoconv-old-PID` (the backup), then the new
  directory → OUT; then the backup is deleted. If the second rename fails, the backup is renamed back; if
  that fails too, the error names the backup. If the process dies between the renames, OUT is missing and
  the backup holds the old output intact: the next run writing to OUT renames it back to OUT before
  anything else (and says so). Stale cleanup never deletes a backup: one whose OUT exists is left in place.

Stale temporaries (`.OUT.nemoconv-tmp-PID-*` of a process that no longer exists) are deleted at the start.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import math
import os
import platform
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nemoconv.errors import NemoconvError
from nemoconv.storage.safetensors_io import PlannedTensor, ShardFileWriter
from nemoconv.storage.tensors import plan_shards  # lives in storage (DcpWriter plans shards too); importable here

_TMP_TAG = ".nemoconv-tmp-"
_OLD_TAG = ".nemoconv-old-"


MAX_SHARD_SIZE = 1 << 46  # 64 TiB: far beyond any shard a file system or a loader handles in one piece
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:E[+-]?\d{1,3})?(KIB|MIB|GIB|TIB|KB|MB|GB|TB|B)?")
_UNITS = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1, None: 1}


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `1.5GiB`, `1000000` → bytes, in [1, MAX_SHARD_SIZE]; anything else (negative, NaN,
    `inf`, `1e400`, absurdly large) is a NemoconvError."""
    invalid = NemoconvError(f"invalid size {str(text)[:40]!r} (use e.g. 5GB, 500MB, 2GiB; at most 64TiB)")
    if isinstance(text, bool):
        raise invalid
    if isinstance(text, int):
        value = text
    elif isinstance(text, str) and len(text) <= 40:
        s = text.strip().upper().replace(" ", "")
        m = _SIZE.fullmatch(s)
        if m is None:
            raise invalid
        number = s[: m.start(2)] if m.group(2) else s
        exact = not any(c in number for c in ".E")  # plain integers stay exact, whatever their size
        value = (int(number) if exact else float(number)) * _UNITS[m.group(2)]
        if not math.isfinite(value):  # 1E400
            raise invalid
    else:
        raise invalid
    if not 1 <= value <= MAX_SHARD_SIZE:
        raise invalid
    return int(value)


def _io_error(exc: OSError, what: str) -> NemoconvError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return NemoconvError(f"{what}: {reason}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out: Path, tag: str) -> list[tuple[Path, int]]:
    """`.OUT<tag>PID…` entries beside OUT, with their PID."""
    found = []
    for name in glob.glob(glob.escape(str(out.parent / f".{out.name}{tag}")) + "*"):
        pid = Path(name).name[len(out.name) + 1 + len(tag):].split("-")[0]
        if pid.isdigit():
            found.append((Path(name), int(pid)))
    return found


def _clean_stale(out: Path) -> None:
    """Remove temporary directories left by killed runs (their process is gone)."""
    for tmp, pid in _siblings(out, _TMP_TAG):
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted_overwrite(out: Path) -> Path | None:
    """Put back the old output that a killed --overwrite left as `.OUT.nemoconv-old-PID` while OUT is
    missing; returns the backup's former path when it did. Backups are never deleted here."""
    for backup, pid in _siblings(out, _OLD_TAG):
        if _pid_alive(pid) or os.path.lexists(out):
            continue
        try:
            _rename_noreplace(backup, out)
        except OSError:
            continue  # someone else put something at OUT meanwhile: the backup stays where it is
        return backup
    return None


def check_output_free(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise NemoconvError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise NemoconvError(f"{out}: output directory exists and is not empty (use --overwrite)")


def _new_temp_dir(out: Path) -> Path:
    while True:
        tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it is published at OUT, on any failure it vanishes."""
    out = Path(os.path.realpath(Path(out).expanduser()))
    try:
        restored = recover_interrupted_overwrite(out) if out.parent.is_dir() else None
    except OSError as exc:
        raise _io_error(exc, f"cannot check {out}") from None
    if restored is not None and not overwrite:
        raise NemoconvError(f"{out}: restored the previous output that an interrupted --overwrite had moved to "
                            f"{restored.name}; it is not empty (use --overwrite)")
    check_output_free(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        tmp = _new_temp_dir(out)
    except OSError as exc:
        raise _io_error(exc, f"cannot create output next to {out}") from None
    try:
        yield tmp
        publish(tmp, out, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _io_error(exc, f"writing {out}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- publishing: no-replace rename, atomic exchange, and their fallbacks (see the module docstring) -----

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
_renameat2_fn = []  # resolved once: [callable or None]


def _renameat2_call():
    if not _renameat2_fn:
        fn = None
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            wrapper = getattr(libc, "renameat2", None)  # glibc ≥ 2.28
            nr = _SYS_RENAMEAT2.get(platform.machine())
            if wrapper is not None:
                wrapper.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                wrapper.restype = ctypes.c_int
                fn = lambda a, b, flags: wrapper(_AT_FDCWD, a, _AT_FDCWD, b, flags)  # noqa: E731
            elif nr is not None:
                libc.syscall.restype = ctypes.c_long
                fn = lambda a, b, flags: libc.syscall(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), a,  # noqa: E731
                                                      ctypes.c_int(_AT_FDCWD), b, ctypes.c_uint(flags))
        _renameat2_fn.append(fn)
    return _renameat2_fn[0]


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when this system cannot (no renameat2, or the filesystem lacks the flag);
    OSError for a real failure (EEXIST: the target exists; ENOENT: it does not, for an exchange)."""
    fn = _renameat2_call()
    if fn is None:
        return False
    if fn(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def _parent_lock(directory: Path):
    """An exclusive flock on a directory: every nemoconv fallback publisher into it takes this lock."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _rename_if_absent(src: Path, dst: Path) -> None:
    """A plain rename onto a missing target; the caller holds the parent lock."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _rename_noreplace(src: Path, dst: Path) -> None:
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        with _parent_lock(dst.parent):
            _rename_if_absent(src, dst)


def _exists_error(exc: OSError) -> bool:
    return exc.errno in (errno.EEXIST, errno.ENOTEMPTY)


def _appeared(out: Path) -> NemoconvError:
    return NemoconvError(f"{out}: appeared during the run (another process wrote it); left as it is, "
                         f"nothing written")


def _remove(path: Path) -> None:
    """Best effort: what is removed here was already replaced by a complete output."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the complete temporary directory to OUT (see the module docstring)."""
    if overwrite:
        _publish_replacing(tmp, out)
    else:
        _publish_new(tmp, out)


def _publish_new(tmp: Path, out: Path) -> None:
    try:
        _rename_noreplace(tmp, out)
        return
    except OSError as exc:
        if not _exists_error(exc):
            raise
    try:
        os.rmdir(out)  # an empty directory is taken; rmdir never removes anything else
    except OSError:
        raise _appeared(out) from None
    try:
        _rename_noreplace(tmp, out)
    except OSError as exc:
        if _exists_error(exc):
            raise _appeared(out) from None
        raise


def _publish_replacing(tmp: Path, out: Path) -> None:
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise NemoconvError(f"{out}: is no longer a directory; left as it is, nothing written")
    try:
        swapped = _renameat2(tmp, out, _RENAME_EXCHANGE)
    except FileNotFoundError:  # nothing at OUT to replace
        _publish_new(tmp, out)
        return
    if swapped:
        _remove(tmp)  # the old output, now under the temporary name
        return
    _replace_by_two_renames(tmp, out)


def _replace_by_two_renames(tmp: Path, out: Path) -> None:
    backup = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}"
    with _parent_lock(out.parent):
        try:
            os.rename(out, backup)
        except FileNotFoundError:
            backup = None
        try:
            _rename_if_absent(tmp, out)
        except BaseException as exc:  # an I/O error, or an interrupt between the renames
            if backup is not None:
                try:
                    os.rename(backup, out)
                except OSError:
                    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                    raise NemoconvError(f"{out}: could not publish ({reason}) nor put the previous output back; "
                                        f"it is intact at {backup}") from None
            raise
    if backup is not None:
        _remove(backup)


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


class ShardedWriter:
    """Writes a planned, ordered stream of tensors into shards, then the index."""

    def __init__(self, directory: Path, planned: list[PlannedTensor], max_shard_size: int, metadata: dict[str, str]):
        self.directory = directory
        self.shards = plan_shards(planned, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.metadata = metadata
        self._shard = -1
        self._writer: ShardFileWriter | None = None
        self._left = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(p.nbytes for p in planned)

    def write(self, name: str, tensor, entry=None) -> None:
        while self._left == 0:
            self._open_next()
        self._writer.write(name, tensor, entry)
        self.weight_map[name] = self.names[self._shard]
        self._left -= 1

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard += 1
        if self._shard >= len(self.shards):
            raise RuntimeError("internal error: more tensors than planned")
        planned = self.shards[self._shard]
        self._writer = ShardFileWriter(self.directory / self.names[self._shard], planned, self.metadata)
        self._left = len(planned)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if len(self.weight_map) != sum(len(s) for s in self.shards):
            raise RuntimeError("internal error: fewer tensors written than planned")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            write_json(self.directory / "model.safetensors.index.json", index)


class BackgroundWriter:
    """Runs a ShardedWriter on a thread, so the disk writes of one tensor overlap the reading and
    transposing of the next (both release the GIL). Memory stays bounded: tensors wait in the queue only
    while less than `max_queued_bytes` of data (the one being written included) is pending, plus one."""

    def __init__(self, writer: ShardedWriter, max_queued_bytes: int = 128 << 20):
        import threading
        from collections import deque

        self.writer = writer
        self._limit = max_queued_bytes
        self._jobs: deque = deque()
        self._pending = 0  # bytes held by queued jobs
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nemoconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs[0]
            if job is None:
                return
            if self._error is None:
                try:
                    self.writer.write(*job[:3])
                except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                    self._error = exc
            with self._cond:
                self._jobs.popleft()
                self._pending -= job[3]
                self._cond.notify_all()

    def write(self, name: str, tensor, entry=None) -> None:
        if self._error is not None:
            self._finish()
        size = 0 if entry is not None else tensor.numel() * tensor.element_size()  # copied file to file: no RAM
        with self._cond:
            while self._jobs and self._pending + size > self._limit and self._error is None:
                self._cond.wait()
            self._jobs.append((name, tensor, entry, size))
            self._pending += size
            self._cond.notify_all()

    def _stop(self) -> None:
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join()

    def _finish(self) -> None:
        self._stop()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._finish()
        self.writer.close()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._stop()


def json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: Path, data) -> None:
    path.write_bytes(json_bytes(data))
