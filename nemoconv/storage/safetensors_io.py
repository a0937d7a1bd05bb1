"""Streaming safetensors I/O: read one tensor at a time with plain file reads, write shards tensor by tensor.

We do not use `safe_open`/`save_file` for conversion because (a) `save_file` needs a whole shard in memory,
and (b) memory-mapped reads count every touched page of a multi-GB file as resident memory. The format is
simple: an 8-byte little-endian header length, a JSON header mapping names to
`{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the raw bytes.
The header is validated against the file size up front, so truncated or corrupt shards are caught
before anything is written. The tensor types (entries, readers, HostTensor) live in tensors.py and are
importable from here too.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.fileio import Appender
from nemoconv.storage.tensors import (
    FLOAT_NAMES,
    FP8_NAMES,
    ITEMSIZE,
    ST_DTYPES,
    ST_NAME,
    ChunkedEntry,
    HostTensor,
    PlannedTensor,
    RowsEntry,
    TensorEntry,
    TensorReader,
    bits_dtype,
    copy_entry,
    dtype_name,
    plan_shards,
    torch_dtype,
    write_tensor,
)
from nemoconv.untrusted import parse_json

__all__ = ["FLOAT_NAMES", "FP8_NAMES", "ITEMSIZE", "ST_NAME", "ChunkedEntry", "HostTensor", "PlannedTensor",
           "RowsEntry", "ShardFileWriter", "TensorEntry", "TensorReader", "bits_dtype", "dtype_name", "plan_shards",
           "read_header", "torch_dtype", "write_single_file"]

_MAX_HEADER = 100 * 1024 * 1024


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
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise bad("unknown dtype" if isinstance(dtype, str) else "dtype is not a string")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 16 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= size for d in shape):
        raise bad("shape must be a list of non-negative integers that fit the file")
    if not isinstance(offsets, list) or len(offsets) != 2 or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets) or \
            not 0 <= offsets[0] <= offsets[1] <= size:
        raise bad("data_offsets must be two integers [begin, end] inside the file")
    name_, itemsize = ST_DTYPES[dtype]
    return name_, itemsize, tuple(shape), offsets[0], offsets[1]


class ShardFileWriter:
    """Writes one safetensors file whose tensor list is known up front; tensors then arrive in that order.

    Through an Appender: unchanged tensors are copied file to file, contiguous runs of them in one copy, and
    written data is handed to the disk as it goes (see fileio.py)."""

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
        self._out = Appender(path)
        self._out.write(struct.pack("<Q", len(blob)) + blob)

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
            copy_entry(entry, self._out)
        else:
            write_tensor(self._out, tensor)

    @property
    def complete(self) -> bool:
        return self._next == len(self._planned)

    def close(self) -> None:
        # No fsync: like cp, we leave durability to the page cache; atomicity (no partial output after a
        # failure or a kill) comes from writing into a temporary directory that is renamed when complete.
        self._out.close()



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
