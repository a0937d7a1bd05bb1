"""Streaming safetensors I/O: read one tensor at a time with plain file reads, write shards tensor by tensor.

We do not use `safe_open`/`save_file` for conversion because (a) `save_file` needs a whole shard in memory,
and (b) memory-mapped reads count every touched page of a multi-GB file as resident memory. The format is
simple: an 8-byte little-endian header length, a JSON header mapping names to
`{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the raw bytes.
The header is validated against the file size up front, so truncated or corrupt shards are caught
before anything is written.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NemoconvError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """Short, stable dtype spelling used in manifests and reports (`bfloat16`, `float8_e4m3fn`, …)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a shard file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a shard's header; every entry must lie inside the file, without overlaps."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise NemoconvError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise NemoconvError(f"{path}: corrupt or truncated safetensors header (claims {header_len} bytes)")
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise NemoconvError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NemoconvError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise NemoconvError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise NemoconvError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise NemoconvError(f"{path}: corrupt entry {name!r} (byte range does not match its shape and dtype)")
        if data_start + end > size:
            raise NemoconvError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}"
            )
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise NemoconvError(f"{path}: corrupt header: tensors {n0!r} and {n1!r} overlap")
    return entries, {str(k): str(v) for k, v in metadata.items()}


class TensorReader:
    """Reads tensors with positional reads (`pread`): one open handle per shard, safe to share between
    threads, so several tensors can be read at once."""

    def __init__(self):
        self._handles: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._handles.get(path)
            if fd is None:
                fd = self._handles[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, entry: TensorEntry) -> torch.Tensor:
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            fd = self._fd(entry.file)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = 0
            while got < entry.nbytes:
                n = os.preadv(fd, [view[got:got + (1 << 30)]], entry.start + got)
                if not n:
                    raise NemoconvError(f"{entry.file}: truncated while reading {entry.name!r}")
                got += n
        return out

    def close(self):
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardFileWriter:
    """Writes one safetensors file whose tensor list is known up front; tensors then arrive in that order."""

    def __init__(self, path: Path, planned: list[PlannedTensor], metadata: dict[str, str]):
        self.path = path
        self._planned = planned
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for p in planned:
            header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(path, "wb", buffering=0)
        _write_all(self._file, memoryview(struct.pack("<Q", len(blob)) + blob))

    def write(self, name: str, tensor: torch.Tensor, entry: TensorEntry | None = None) -> None:
        """Append the next planned tensor: its values, or (`entry`) its unchanged bytes copied from a source
        file inside the kernel, as `cp` does."""
        expected = self._planned[self._next]
        if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"internal error: writer expected {expected} but got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._next += 1
        if entry is not None:
            _copy_range(entry, self._file)
        elif tensor.numel():
            data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
            _write_all(self._file, memoryview(data))

    @property
    def complete(self) -> bool:
        return self._next == len(self._planned)

    def close(self) -> None:
        # No fsync: like cp, we leave durability to the page cache; atomicity (no partial output after a
        # failure or a kill) comes from writing into a temporary directory that is renamed when complete.
        self._file.close()


def _write_all(f, view: memoryview) -> None:
    while view:
        n = f.write(view)
        view = view[n:]


def _copy_range(entry: TensorEntry, dst) -> None:
    """Copy `entry`'s bytes to the end of `dst` without passing them through Python (copy_file_range)."""
    with open(entry.file, "rb", buffering=0) as src:
        offset, left = entry.start, entry.nbytes
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), left, offset)
                if n == 0:
                    raise NemoconvError(f"{entry.file}: truncated while reading {entry.name!r}")
                offset += n
                left -= n
            return
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                               errno.EOPNOTSUPP, errno.EBADF):
                raise
        src.seek(offset)  # no kernel copy here (another filesystem, an old kernel): plain reads
        while left:
            chunk = src.read(min(left, 64 << 20))
            if not chunk:
                raise NemoconvError(f"{entry.file}: truncated while reading {entry.name!r}")
            _write_all(dst, memoryview(chunk))
            left -= len(chunk)


def write_single_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Small helper for tests and the demo: write a whole dict as one file, deterministically ordered."""
    path = Path(path)
    planned = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    tmp = path.with_name(path.name + ".partial")
    writer = ShardFileWriter(tmp, planned, metadata or {"format": "pt"})
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    os.replace(tmp, path)  # a new inode: tensors still memory-mapped from the old file stay valid
