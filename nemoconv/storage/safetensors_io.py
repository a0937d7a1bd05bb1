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
from dataclasses import dataclass, replace
from pathlib import Path

from nemoconv import settings
from nemoconv.errors import NemoconvError
from nemoconv.untrusted import parse_json

# No torch at import time: `nemoconv convert` never needs it (DTypes are names; data is raw bits in numpy
# arrays, see HostTensor). Callers that want torch tensors (model loading, quantize) get them from
# TensorReader() and TensorEntry.dtype/.meta(), which import torch on first use.

# safetensors dtype → (our name, the same as torch's without `torch.`, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
ST_NAME: dict[str, str] = {name: st for st, (name, _) in _ST_DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: size for name, size in _ST_DTYPES.values()}
FLOAT_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
FP8_NAMES = frozenset({"float8_e4m3fn", "float8_e5m2"})
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype) -> str:
    """Short, stable dtype spelling used in manifests and reports (`bfloat16`, `float8_e4m3fn`, …), for a
    torch dtype or a name."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(dtype):
    """The torch dtype for a name (or a torch dtype); imports torch."""
    import torch

    return getattr(torch, dtype_name(dtype))


class HostTensor:
    """A tensor without torch: a dtype name, a shape and (unless meta) the raw bits as a C-contiguous numpy
    array of the same-size unsigned integer type. Exact for every dtype (bf16 and fp8 included), and the
    stream's rearrangements (stack, transpose, split, concatenate) are plain bit moves.

    It answers the few Tensor questions the stream asks (`dtype`, `shape`, `is_meta`, `dim()`, `numel()`,
    `element_size()`, `is_floating_point()`), so the same stages run on it and on torch tensors."""

    __slots__ = ("dtype", "shape", "bits")

    def __init__(self, dtype: str, shape, bits=None):
        self.dtype = dtype
        self.shape = tuple(int(d) for d in shape)
        self.bits = bits

    @classmethod
    def of(cls, dtype: str, bits) -> "HostTensor":
        return cls(dtype, bits.shape, bits)

    @property
    def is_meta(self) -> bool:
        return self.bits is None

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return ITEMSIZE[self.dtype]

    def is_floating_point(self) -> bool:
        return self.dtype in FLOAT_NAMES

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def __repr__(self):
        return f"HostTensor({self.dtype}, {list(self.shape)}{', meta' if self.is_meta else ''})"


def bits_dtype(itemsize: int):
    """The numpy unsigned integer type of `itemsize` bytes (imports numpy)."""
    import numpy as np

    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a shard file."""

    name: str
    file: Path
    dtype_name: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        return torch_dtype(self.dtype_name)

    def meta(self):
        """A torch meta tensor of this shape and dtype (imports torch)."""
        import torch

        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def host_meta(self) -> HostTensor:
        return HostTensor(self.dtype_name, self.shape)


@dataclass(frozen=True)
class ChunkedEntry(TensorEntry):
    """A tensor stored in several byte ranges (DCP chunks: tensor-parallel shards, per-expert slices; or experts
    merged on the fly). `start`/`nbytes` are a
    byte window of the row-major whole tensor (the pipeline narrows them to read one expert at a time)."""

    full_shape: tuple[int, ...] = ()
    pieces: tuple[tuple[tuple[int, ...], TensorEntry], ...] = ()  # (offsets, entry of that chunk)
    rows_tiled: bool = False  # chunks cover whole rows, in order: the bytes are the chunks' bytes in sequence

    def read_with(self, reader):
        import numpy as np

        itemsize = ITEMSIZE[self.dtype_name]
        out = np.empty(self.nbytes, dtype=np.uint8)
        if self.rows_tiled:
            pos = 0  # logical byte position of the current piece
            for _, piece in self.pieces:
                lo, hi = max(self.start, pos), min(self.start + self.nbytes, pos + piece.nbytes)
                if lo < hi:
                    reader.read_into(replace(piece, start=piece.start + lo - pos, nbytes=hi - lo),
                                     memoryview(out[lo - self.start:hi - self.start]))
                pos += piece.nbytes
        else:
            whole = np.empty(self.full_shape, dtype=bits_dtype(itemsize))
            for offsets, piece in self.pieces:
                bits = np.empty(piece.shape, dtype=bits_dtype(itemsize))
                reader.read_into(piece, memoryview(bits.reshape(-1)).cast("B"))
                whole[tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))] = bits
            out[:] = whole.reshape(-1).view(np.uint8)[self.start:self.start + self.nbytes]
        bits = out.view(bits_dtype(itemsize)).reshape(self.shape)
        if reader.host:
            return HostTensor(self.dtype_name, self.shape, bits)
        import torch

        signed = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[itemsize]  # torch lacks wide uint views
        return torch.from_numpy(bits.view(signed)).view(self.dtype)

    def copy_to(self, dst) -> int:
        """Append the window's bytes to `dst` (the writer's file-to-file path): kernel copies of the pieces it
        overlaps when they tile the rows, else read, assembled and written."""
        if self.rows_tiled:
            pos = 0
            for _, piece in self.pieces:
                lo, hi = max(self.start, pos), min(self.start + self.nbytes, pos + piece.nbytes)
                if lo < hi:
                    _copy_range(replace(piece, start=piece.start + lo - pos, nbytes=hi - lo), dst)
                pos += piece.nbytes
            return self.nbytes
        with TensorReader(host=True) as reader:
            t = self.read_with(reader)
        _write_all(dst, memoryview(t.bits.reshape(-1)).cast("B"))
        return self.nbytes


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a shard's header; every entry must lie inside the file, without overlaps.
    The header is untrusted JSON: duplicate names, wrong types and impossible shapes are errors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise NemoconvError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                # the 8 bytes of a file that is not safetensors are its content: never show them
                raise NemoconvError(f"{path}: not a safetensors file (corrupt or truncated header)")
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise NemoconvError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = parse_json(header_bytes, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise NemoconvError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _header_metadata(header.pop("__metadata__", None), path)
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        dtype, itemsize, shape, begin, end = _header_entry(info, name, path, size)
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise NemoconvError(f"{path}: corrupt entry {name[:200]!r} (byte range does not match its shape and "
                                f"dtype)")
        if data_start + end > size:
            raise NemoconvError(
                f"{path}: truncated: tensor {name[:200]!r} ends at byte {data_start + end} but the file has {size}"
            )
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise NemoconvError(f"{path}: corrupt header: tensors {n0[:200]!r} and {n1[:200]!r} overlap")
    return entries, metadata


def _header_metadata(metadata, path: Path) -> dict[str, str]:
    """`__metadata__` is a string → string map (safetensors' own rule)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NemoconvError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    return dict(metadata)


def _header_entry(info, name: str, path: Path, size: int) -> tuple[str, int, tuple[int, ...], int, int]:
    """(dtype name, itemsize, shape, begin, end) of one header entry; every value type- and range-checked.
    No dimension can exceed the file's size (a real one is at most its tensor's byte count)."""
    def bad(why: str) -> NemoconvError:
        return NemoconvError(f"{path}: corrupt safetensors header entry for {name[:200]!r} ({why})")

    if not isinstance(info, dict):
        raise bad("not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise bad("unknown dtype" if isinstance(dtype, str) else "dtype is not a string")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 16 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= size for d in shape):
        raise bad("shape must be a list of non-negative integers that fit the file")
    if not isinstance(offsets, list) or len(offsets) != 2 or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets) or \
            not 0 <= offsets[0] <= offsets[1] <= size:
        raise bad("data_offsets must be two integers [begin, end] inside the file")
    name_, itemsize = _ST_DTYPES[dtype]
    return name_, itemsize, tuple(shape), offsets[0], offsets[1]


class TensorReader:
    """Reads tensors with positional reads (`pread`): one open handle per shard, safe to share between
    threads, so several tensors can be read at once. `host=True`: HostTensors (numpy, no torch)."""

    def __init__(self, host: bool = False):
        self.host = host
        self._handles: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._handles.get(path)
            if fd is None:
                fd = self._handles[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, entry: TensorEntry):
        """The tensor's values: a torch tensor, or a HostTensor for a host reader."""
        if isinstance(entry, ChunkedEntry):
            return entry.read_with(self)
        if self.host:
            import numpy as np

            bits = np.empty(entry.shape, dtype=bits_dtype(ITEMSIZE[entry.dtype_name]))
            self.read_into(entry, memoryview(bits.reshape(-1)).cast("B"))
            return HostTensor(entry.dtype_name, entry.shape, bits)
        import torch

        out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            self.read_into(entry, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def read_into(self, entry: TensorEntry, view: memoryview) -> None:
        """Read `entry`'s bytes into a writable byte buffer of exactly its size."""
        fd = self._fd(entry.file)
        got = 0
        while got < entry.nbytes:
            n = os.preadv(fd, [view[got:got + (1 << 30)]], entry.start + got)
            if not n:
                raise NemoconvError(f"{entry.file}: truncated while reading {entry.name!r}")
            got += n

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
    dtype: object  # a dtype name, or a torch dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[dtype_name(self.dtype)]


class ShardFileWriter:
    """Writes one safetensors file whose tensor list is known up front; tensors then arrive in that order.

    Written data is handed to the disk as it goes (`sync_file_range(WRITE)`, asynchronous, no waiting), so
    the device writes while we convert instead of all at once when the page cache is finally flushed."""

    def __init__(self, path: Path, planned: list[PlannedTensor], metadata: dict[str, str]):
        self.path = path
        self._planned = planned
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for p in planned:
            header[p.name] = {"dtype": ST_NAME[dtype_name(p.dtype)], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(path, "wb", buffering=0)
        self._pos = 0
        self._flushed = 0
        self._write(memoryview(struct.pack("<Q", len(blob)) + blob))

    def write(self, name: str, tensor, entry: TensorEntry | None = None) -> None:
        """Append the next planned tensor: its values (a torch tensor or a HostTensor), or (`entry`) its
        unchanged bytes copied from a source file inside the kernel, as `cp` does."""
        expected = self._planned[self._next]
        if name != expected.name or dtype_name(tensor.dtype) != dtype_name(expected.dtype) \
                or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"internal error: writer expected {expected} but got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._next += 1
        if entry is not None:
            self._pos += _copy_range(entry, self._file)
        elif isinstance(tensor, HostTensor):
            if tensor.bits is not None and tensor.bits.size:
                import numpy as np

                self._write(memoryview(np.ascontiguousarray(tensor.bits).reshape(-1)).cast("B"))
        elif tensor.numel():
            import torch

            data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
            self._write(memoryview(data))
        self._start_writeback()

    def _write(self, view: memoryview) -> None:
        _write_all(self._file, view)
        self._pos += len(view)

    def _start_writeback(self, final: bool = False) -> None:
        # whole 64 MiB steps, asynchronously: the kernel starts writing while we go on
        if self._pos - self._flushed >= _WRITEBACK_STEP or (final and self._pos > self._flushed):
            start_writeback(self._file.fileno(), self._flushed, self._pos - self._flushed)
            self._flushed = self._pos

    @property
    def complete(self) -> bool:
        return self._next == len(self._planned)

    def close(self) -> None:
        # No fsync: like cp, we leave durability to the page cache; atomicity (no partial output after a
        # failure or a kill) comes from writing into a temporary directory that is renamed when complete.
        self._start_writeback(final=True)
        self._file.close()


_WRITEBACK_STEP = 64 << 20
_sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a file range to disk now, without waiting (Linux sync_file_range
    with SYNC_FILE_RANGE_WRITE); a no-op where that is not available. Never raises: durability is not
    promised, this only spreads the device's work over the conversion."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if not settings.current().no_writeback:
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def _write_all(f, view: memoryview) -> None:
    while view:
        n = f.write(view)
        view = view[n:]


def _copy_range(entry: TensorEntry, dst) -> int:
    """Copy `entry`'s bytes to the end of `dst` without passing them through Python (copy_file_range)."""
    if isinstance(entry, ChunkedEntry):
        return entry.copy_to(dst)
    with open(entry.file, "rb", buffering=0) as src:
        offset, left = entry.start, entry.nbytes
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), left, offset)
                if n == 0:
                    raise NemoconvError(f"{entry.file}: truncated while reading {entry.name!r}")
                offset += n
                left -= n
            return entry.nbytes
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
        return entry.nbytes


def write_single_file(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Small helper for tests and the demo: write a whole dict of torch tensors as one file, deterministically
    ordered."""
    path = Path(path)
    planned = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    tmp = path.with_name(path.name + ".partial")
    writer = ShardFileWriter(tmp, planned, metadata or {"format": "pt"})
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    os.replace(tmp, path)  # a new inode: tensors still memory-mapped from the old file stay valid
