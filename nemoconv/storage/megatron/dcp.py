"""PyTorch Distributed Checkpoint (DCP) files, as Megatron-core's `torch_dist` backend writes them.

A DCP directory holds `.metadata` (a pickle of DCP's metadata classes: every key's global shape, dtype and
chunks, and where each chunk's bytes are) and `*.distcp` files, each a concatenation of items; a tensor item is
a complete `torch.save` zip archive of one chunk. We read `.metadata` and each item's small `data.pkl` through
restricted unpicklers (see restricted.py), then point at the chunk's bytes inside the zip by offset, so tensors
are read (or copied file to file) like safetensors entries, one at a time. Writing (dcp_write.py, `DcpWriter`,
importable from here too) produces the same layout.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.megatron.dcp_write import METADATA_NAME, DcpWriter
from nemoconv.storage.megatron.restricted import DCP_CLASSES, load_dcp_metadata, load_tensor_record
from nemoconv.storage.tensors import ITEMSIZE, ChunkedEntry, TensorEntry

__all__ = ["METADATA_NAME", "DcpWriter", "read_dcp"]
_MAX_METADATA = 1 << 30



class _Window(io.RawIOBase):
    """A read-only file view of bytes [start, start+length) of a file: one DCP item, for zipfile."""

    def __init__(self, fd: int, start: int, length: int):
        self._fd, self._start, self._len, self._pos = fd, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self._pos = {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence]
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self._len - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _item_entry(name: str, file: Path, fd: int, offset: int, length: int, dtype: str, shape: tuple) -> TensorEntry:
    """Locate the bytes of one tensor item (a torch.save zip at [offset, offset+length) of `file`)."""
    what = f"{file.name}: item of {name!r}"
    try:
        with zipfile.ZipFile(_Window(fd, offset, length)) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkl) != 1 or pkl[0].file_size > (1 << 20):
                raise NemoconvError(f"{what}: not a tensor item (no data.pkl)")
            prefix = pkl[0].filename[: -len("data.pkl")]
            record = load_tensor_record(zf.read(pkl[0]), what)
            data = [i for i in infos if i.filename == f"{prefix}data/{record.storage_key}"]
    except zipfile.BadZipFile as exc:
        raise NemoconvError(f"{what}: corrupt ({exc})") from None
    if len(data) != 1:
        raise NemoconvError(f"{what}: its data record is missing")
    info = data[0]
    itemsize = ITEMSIZE.get(record.dtype)
    contiguous = tuple(math.prod(record.shape[k + 1:]) for k in range(len(record.shape)))
    nbytes = math.prod(shape) * (itemsize or 0)
    storage_bytes = record.storage_numel * (itemsize if record.storage_typed else 1)
    if record.dtype != dtype or tuple(record.shape) != tuple(shape):
        raise NemoconvError(f"{what}: holds {record.dtype} {list(record.shape)}, "
                            f"the metadata says {dtype} {list(shape)}")
    if (math.prod(shape) > 1 and record.stride != contiguous) or record.offset != 0:
        raise NemoconvError(f"{what}: not stored contiguously (stride {record.stride}, offset {record.offset})")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != storage_bytes or storage_bytes < nbytes:
        raise NemoconvError(f"{what}: data record has {info.file_size} bytes, expected {nbytes} stored uncompressed")
    local = os.pread(fd, 30, offset + info.header_offset)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise NemoconvError(f"{what}: corrupt zip record header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = offset + info.header_offset + 30 + name_len + extra_len
    if start + nbytes > offset + length:
        raise NemoconvError(f"{what}: data runs past the end of its item")
    return TensorEntry(name, file, dtype, tuple(shape), start, nbytes)


def _dtype_of(tmeta, key: str) -> str:
    props = getattr(tmeta, "properties", None)
    dtype = getattr(props, "dtype", None)
    if dtype is None and isinstance(getattr(props, "state", None), tuple) and props.state:
        dtype = props.state[0]  # TensorProperties' pickled tuple starts with the dtype
    if not isinstance(dtype, str):
        raise NemoconvError(f".metadata: tensor {key!r} has no readable dtype")
    return dtype


def _rows_tiled(full_shape: tuple, chunks: list[tuple[tuple, tuple]]) -> bool:
    """Chunks that each span all trailing dims and follow one another along axis 0 from row 0."""
    row = 0
    for offsets, sizes in chunks:
        if tuple(sizes[1:]) != tuple(full_shape[1:]) or any(offsets[1:]) or offsets[0] != row:
            return False
        row += sizes[0]
    return row == full_shape[0]


class _DataFiles:
    """The `.distcp` files a `.metadata` names, checked to be plain names inside the directory, opened once."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.paths: dict[str, Path] = {}
        self.fds: dict[str, int] = {}

    def open(self, rel: str) -> tuple[Path, int]:
        if rel not in self.paths:
            if "/" in rel or "\\" in rel or rel.startswith(".") or not rel.endswith(".distcp"):
                raise NemoconvError(f"{self.directory / METADATA_NAME}: storage file {rel!r} is not a plain "
                                    f".distcp name")
            path = self.directory / rel
            if not path.is_file():
                raise NemoconvError(f"{self.directory}: {rel} is listed in .metadata but missing")
            self.paths[rel], self.fds[rel] = path, os.open(path, os.O_RDONLY)
        return self.paths[rel], self.fds[rel]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _read_metadata(directory: Path):
    meta_path = directory / METADATA_NAME
    try:
        if meta_path.stat().st_size > _MAX_METADATA:
            raise NemoconvError(f"{meta_path}: implausibly large ({meta_path.stat().st_size} bytes)")
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise NemoconvError(f"{meta_path}: cannot read ({exc.strerror or exc})") from None
    return load_dcp_metadata(raw, str(meta_path))


def _chunk_entry(key: str, chunk, info, dtype: str, files: _DataFiles) -> tuple[tuple, TensorEntry]:
    """(offsets, entry) of one chunk of `key`, from its storage record."""
    meta_path = files.directory / METADATA_NAME
    offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
    if info is None:
        raise NemoconvError(f"{meta_path}: no storage recorded for {key!r} chunk at {list(offsets)}")
    if not isinstance(info, DCP_CLASSES["_StorageInfo"]):
        raise NemoconvError(f"{meta_path}: storage of {key!r} is not a storage record")
    if getattr(info, "transform_descriptors", None):
        raise NemoconvError(f"{meta_path}: {key!r} is stored transformed {info.transform_descriptors}; "
                            f"only plain items are read")
    path, fd = files.open(str(info.relative_path))
    if info.offset < 0 or info.length <= 0 or info.offset + info.length > os.fstat(fd).st_size:
        raise NemoconvError(f"{path}: item of {key!r} lies outside the file")
    return offsets, _item_entry(key, path, fd, info.offset, info.length, dtype, sizes)


def _tensor_entry(key: str, tmeta, storage: dict, files: _DataFiles) -> TensorEntry:
    """One key's entry: its single chunk, or a ChunkedEntry over its chunks (TP shards, per-expert items)."""
    meta_path = files.directory / METADATA_NAME
    dtype, shape = _dtype_of(tmeta, key), tuple(int(d) for d in tmeta.size)
    if dtype not in ITEMSIZE:
        raise NemoconvError(f"{meta_path}: tensor {key!r} has unsupported dtype {dtype}")
    pieces = [_chunk_entry(key, chunk, storage.get((key, tuple(int(o) for o in chunk.offsets))), dtype, files)
              for chunk in tmeta.chunks]
    covered = sum(math.prod(p.shape) for _, p in pieces)
    if covered != math.prod(shape):
        raise NemoconvError(f"{meta_path}: chunks of {key!r} cover {covered} of {math.prod(shape)} elements")
    if len(pieces) == 1:
        return pieces[0][1]
    pieces.sort(key=lambda p: p[0])
    tiled = _rows_tiled(shape, [(o, p.shape) for o, p in pieces])
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    return ChunkedEntry(key, pieces[0][1].file, dtype, shape, 0, nbytes, shape, tuple(pieces), tiled)


def read_dcp(directory: Path, skip) -> tuple[dict[str, TensorEntry], list[Path], list[str]]:
    """Every tensor of a DCP directory: entries by key, the data files, and the keys not read (non-tensor
    items such as Transformer Engine `_extra_state`, and keys `skip(key)` refuses, e.g. optimizer state)."""
    metadata = _read_metadata(directory)
    tensor_class = DCP_CLASSES["TensorStorageMetadata"]
    storage = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        storage[(str(getattr(index, "fqn", "")), tuple(getattr(index, "offset", None) or ()))] = info
    entries: dict[str, TensorEntry] = {}
    skipped: list[str] = []
    files = _DataFiles(directory)
    try:
        for key, tmeta in (getattr(metadata, "state_dict_metadata", None) or {}).items():
            if not isinstance(tmeta, tensor_class) or skip(key):
                skipped.append(key)
            else:
                entries[key] = _tensor_entry(key, tmeta, storage, files)
    finally:
        files.close()
    return entries, sorted(files.paths.values()), skipped
