"""Atomic output directories (docs/DESIGN.md §2); the shards written into them come from `shards`.

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
import os
import platform
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nemoconv.errors import NemoconvError

# The shard writer lived here; its names stay importable from this module.
from nemoconv.stream.shards import (  # noqa: F401
    MAX_SHARD_SIZE,
    BackgroundWriter,
    ShardedWriter,
    json_bytes,
    parse_size,
    plan_shards,
    shard_names,
    write_json,
)

_TMP_TAG = ".nemoconv-tmp-"
_OLD_TAG = ".nemoconv-old-"


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


def prepare_output(out: Path, overwrite: bool) -> None:
    """Before writing beside OUT: put back what an interrupted --overwrite moved away, check OUT may be written,
    create its parent and remove stale temporaries of dead runs."""
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
    except OSError as exc:
        raise _io_error(exc, f"cannot create output next to {out}") from None


@contextmanager
def atomic_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it is published at OUT, on any failure it vanishes."""
    out = Path(os.path.realpath(Path(out).expanduser()))
    prepare_output(out, overwrite)
    try:
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
