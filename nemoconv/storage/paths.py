"""What nemoconv may read and where it may write (docs/DESIGN.md §2).

A checkpoint names its files in text nemoconv did not write (the index's `weight_map`, config's `auto_map`),
and a directory can hold symbolic links to anywhere. So:

- a file name taken from a checkpoint is a plain name inside its directory (`check_plain_name`);
- a file read from a checkpoint may be a symbolic link only when it resolves inside the checkpoint
  directory, or, for a Hugging Face cache snapshot (`models--ORG--NAME/snapshots/REV/f -> ../../blobs/H`),
  inside that repo's `blobs/` (`owned_file`);
- OUT never resolves to a source, never contains one, and with `--overwrite` never lies inside one
  (`check_output_location`): paths are compared after resolving `..` and links.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nemoconv.errors import NemoconvError

_MAX_NAME_BYTES = 255  # NAME_MAX of every filesystem nemoconv writes to


def check_plain_name(name: str, what: str) -> str:
    """`name` as a file directly inside a directory: no separators, no `..`, no control characters."""
    shown = repr(name[:80])
    if not name or name in (".", ".."):
        raise NemoconvError(f"{what}: {shown} is not a file name")
    if "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise NemoconvError(f"{what}: {shown} is not a plain file name (a path or control characters); "
                            f"only files inside the checkpoint directory are read")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise NemoconvError(f"{what}: {shown} is not a valid file name (unpaired surrogate)") from None
    if len(encoded) > _MAX_NAME_BYTES:
        raise NemoconvError(f"{what}: {shown}… is longer than {_MAX_NAME_BYTES} bytes")
    return name


def _inside(path: Path, root: Path) -> bool:
    """Whether resolved `path` lies strictly below resolved `root`."""
    return path != root and path.is_relative_to(root)


def hf_cache_blobs(directory: Path) -> Path | None:
    """The `blobs/` directory of a Hugging Face cache snapshot (`…/models--ORG--NAME/snapshots/REV`)."""
    real = Path(os.path.realpath(directory))
    snapshots, repo = real.parent, real.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        return repo / "blobs"
    return None


def link_leaves(directory: Path, name: str) -> bool:
    """Whether `directory/name` is a symbolic link that resolves outside the directory (and its cache blobs)."""
    path = directory / name
    if not path.is_symlink():
        return False
    target = Path(os.path.realpath(path))
    if _inside(target, Path(os.path.realpath(directory))):
        return False
    blobs = hf_cache_blobs(directory)
    return not (blobs is not None and _inside(target, Path(os.path.realpath(blobs))))


def owned_file(directory: Path, name: str, what: str | None = None) -> Path:
    """`directory/name`, refused (exit 2, naming the file) when it is a link leaving the checkpoint."""
    path = Path(directory) / name
    if link_leaves(Path(directory), name):
        raise NemoconvError(f"{what or path}: is a symbolic link to a file outside the checkpoint directory; "
                            f"refused (nemoconv reads only the checkpoint's own files)")
    return path


def read_owned(directory: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of a checkpoint's own regular file (links that leave it refused), at most `max_bytes`."""
    path = owned_file(directory, name)
    try:
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise NemoconvError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NemoconvError(f"{path}: not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise NemoconvError(f"{path}: larger than {max_bytes >> 20} MiB")
    return data


def check_output_location(out: str | Path, sources: list[str | Path], overwrite: bool) -> None:
    """Refuse an OUT that is a source, contains one, or (with --overwrite) lies inside one."""
    out_real = Path(os.path.realpath(Path(out).expanduser()))
    for source in sources:
        src_real = Path(os.path.realpath(Path(source).expanduser()))
        if out_real == src_real:
            raise NemoconvError(f"{out}: is the source {source} (both resolve to {out_real}); write elsewhere")
        if _inside(src_real, out_real):
            raise NemoconvError(f"{out}: contains the source {source}; writing there could replace it")
        if overwrite and _inside(out_real, src_real):
            raise NemoconvError(f"{out}: lies inside the source {source}; --overwrite there is refused")


def check_report_path(path: Path) -> None:
    """Fail before a (long) run when its `--report` file cannot be written there."""
    if path.is_dir():
        raise NemoconvError(f"--report {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise NemoconvError(f"--report {path}: directory {parent} is not writable")
