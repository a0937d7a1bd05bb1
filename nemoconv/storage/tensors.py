"""Tensors in files, without torch: dtype names, `HostTensor` (raw bits in numpy), where a tensor's bytes lie
(`TensorEntry`, `ChunkedEntry`), reading them (`TensorReader`), and the planned output (`PlannedTensor`,
`plan_shards`). Shared by the safetensors and DCP (Megatron) formats.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.fileio import Appender

# No torch at import time: `nemoconv convert` never needs it (DTypes are names; data is raw bits in numpy
# arrays, see HostTensor). Callers that want torch tensors (model loading, quantize) get them from
# TensorReader() and TensorEntry.dtype/.meta(), which import torch on first use.

# safetensors dtype → (our name, the same as torch's without `torch.`, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
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
ST_NAME: dict[str, str] = {name: st for st, (name, _) in ST_DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: size for name, size in ST_DTYPES.values()}
FLOAT_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
FP8_NAMES = frozenset({"float8_e4m3fn", "float8_e5m2"})


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
class RowsEntry(TensorEntry):
    """Whole rows cut out of a stored tensor (one part of a split along axis 0): one run of its bytes."""


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

    def copy_to(self, out: Appender) -> int:
        """Append the window's bytes to `out` (the writer's file-to-file path): kernel copies of the pieces it
        overlaps when they tile the rows, else read, assembled and written."""
        if self.rows_tiled:
            pos = 0
            for _, piece in self.pieces:
                lo, hi = max(self.start, pos), min(self.start + self.nbytes, pos + piece.nbytes)
                if lo < hi:
                    out.copy(piece.file, piece.start + lo - pos, hi - lo, piece.name)
                pos += piece.nbytes
            return self.nbytes
        with TensorReader(host=True) as reader:
            t = self.read_with(reader)
        out.write(memoryview(t.bits.reshape(-1)).cast("B"))
        return self.nbytes


class TensorReader:
    """Reads tensors with positional reads (`pread`): one open handle per shard, safe to share between
    threads, so several tensors can be read at once. `host=True`: HostTensors (numpy, no torch).
    `pinned=True`: torch tensors in page-locked memory, which a GPU copies from at several times the speed of
    pageable memory (torch's host allocator keeps freed blocks for the next layer's tensors)."""

    def __init__(self, host: bool = False, pinned: bool = False):
        self.host = host
        self.pinned = pinned and not host
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

        out = torch.empty(entry.shape, dtype=entry.dtype, pin_memory=self.pinned)
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

    @cached_property  # asked for often (shard plans, progress); written to __dict__, so a frozen class allows it
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[dtype_name(self.dtype)]




def plan_shards(planned: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy in stream order: a shard closes when the next tensor would push it past the limit."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def copy_entry(entry: TensorEntry, out: Appender) -> int:
    """Append `entry`'s bytes to `out` unchanged, file to file (copy_file_range, as cp does)."""
    if isinstance(entry, ChunkedEntry):
        return entry.copy_to(out)
    return out.copy(entry.file, entry.start, entry.nbytes, entry.name)


def write_tensor(out: Appender, tensor) -> int:
    """Append a tensor's bytes (a HostTensor's bits, or a torch tensor's) to `out`."""
    if isinstance(tensor, HostTensor):
        if tensor.bits is None or not tensor.bits.size:
            return 0
        import numpy as np

        return out.write(memoryview(np.ascontiguousarray(tensor.bits).reshape(-1)).cast("B"))
    if not tensor.numel():
        return 0
    import torch

    return out.write(memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()))
