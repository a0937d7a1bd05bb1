"""PyTorch Distributed Checkpoint (DCP) files, as Megatron-core's `torch_dist` backend writes them.

A DCP directory holds `.metadata` (a pickle of DCP's metadata classes: every key's global shape, dtype and
chunks, and where each chunk's bytes are) and `*.distcp` files, each a concatenation of items; a tensor item is
a complete `torch.save` zip archive of one chunk. We read `.metadata` and each item's small `data.pkl` through
restricted unpicklers (see restricted.py), then point at the chunk's bytes inside the zip by offset, so tensors
are read (or copied file to file) like safetensors entries, one at a time. Writing produces the same layout:
one chunk per tensor, the zip records written directly (the tensor bytes stored uncompressed, 64-byte aligned).
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.megatron.restricted import DCP_CLASSES, load_dcp_metadata, load_tensor_record
from nemoconv.storage.safetensors_io import (
    ITEMSIZE,
    ChunkedEntry,
    HostTensor,
    PlannedTensor,
    TensorEntry,
    _copy_range,
    _write_all,
    dtype_name,
)

METADATA_NAME = ".metadata"
_MAX_METADATA = 1 << 30


# ---- reading ------------------------------------------------------------------------------------------------


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
        raise NemoconvError(f"{what}: holds {record.dtype} {list(record.shape)}, the metadata says {dtype} {list(shape)}")
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


def read_dcp(directory: Path, skip) -> tuple[dict[str, TensorEntry], list[Path], list[str]]:
    """Every tensor of a DCP directory: entries by key, the data files, and the keys not read (non-tensor
    items such as Transformer Engine `_extra_state`, and keys `skip(key)` refuses, e.g. optimizer state)."""
    meta_path = directory / METADATA_NAME
    try:
        if meta_path.stat().st_size > _MAX_METADATA:
            raise NemoconvError(f"{meta_path}: implausibly large ({meta_path.stat().st_size} bytes)")
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise NemoconvError(f"{meta_path}: cannot read ({exc.strerror or exc})") from None
    metadata = load_dcp_metadata(raw, str(meta_path))
    tensor_class = DCP_CLASSES["TensorStorageMetadata"]
    storage = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        storage[(str(getattr(index, "fqn", "")), tuple(getattr(index, "offset", None) or ()))] = info
    entries: dict[str, TensorEntry] = {}
    skipped: list[str] = []
    files: dict[str, Path] = {}
    fds: dict[str, int] = {}
    try:
        for key, tmeta in (getattr(metadata, "state_dict_metadata", None) or {}).items():
            if not isinstance(tmeta, tensor_class) or skip(key):
                skipped.append(key)
                continue
            dtype, shape = _dtype_of(tmeta, key), tuple(int(d) for d in tmeta.size)
            if dtype not in ITEMSIZE:
                raise NemoconvError(f"{meta_path}: tensor {key!r} has unsupported dtype {dtype}")
            pieces = []
            for chunk in tmeta.chunks:
                offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
                info = storage.get((key, offsets))
                if info is None:
                    raise NemoconvError(f"{meta_path}: no storage recorded for {key!r} chunk at {list(offsets)}")
                if not isinstance(info, DCP_CLASSES["_StorageInfo"]):
                    raise NemoconvError(f"{meta_path}: storage of {key!r} is not a storage record")
                if getattr(info, "transform_descriptors", None):
                    raise NemoconvError(f"{meta_path}: {key!r} is stored transformed {info.transform_descriptors}; "
                                        f"only plain items are read")
                rel = str(info.relative_path)
                if rel not in files:
                    if "/" in rel or "\\" in rel or rel.startswith(".") or not rel.endswith(".distcp"):
                        raise NemoconvError(f"{meta_path}: storage file {rel!r} is not a plain .distcp name")
                    path = directory / rel
                    if not path.is_file():
                        raise NemoconvError(f"{directory}: {rel} is listed in .metadata but missing")
                    files[rel], fds[rel] = path, os.open(path, os.O_RDONLY)
                size = os.fstat(fds[rel]).st_size
                if info.offset < 0 or info.length <= 0 or info.offset + info.length > size:
                    raise NemoconvError(f"{files[rel]}: item of {key!r} lies outside the file")
                pieces.append((offsets, _item_entry(key, files[rel], fds[rel], info.offset, info.length, dtype, sizes)))
            covered = sum(math.prod(p.shape) for _, p in pieces)
            if covered != math.prod(shape):
                raise NemoconvError(f"{meta_path}: chunks of {key!r} cover {covered} of {math.prod(shape)} elements")
            if len(pieces) == 1:
                entries[key] = pieces[0][1]
            else:
                pieces.sort(key=lambda p: p[0])
                tiled = _rows_tiled(shape, [(o, p.shape) for o, p in pieces])
                nbytes = math.prod(shape) * ITEMSIZE[dtype]
                entries[key] = ChunkedEntry(key, pieces[0][1].file, dtype, shape, 0, nbytes, shape, tuple(pieces), tiled)
    finally:
        for fd in fds.values():
            os.close(fd)
    return entries, sorted(files.values()), skipped


# ---- writing ------------------------------------------------------------------------------------------------

_ALIGN = 64
_PAGE = 4096
_TYPED_STORAGE = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
                  "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                  "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}
_DOS_DATE = 0x21  # 1980-01-01: fixed, so identical inputs give identical bytes


def _p_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _p_int(n: int) -> bytes:
    if 0 <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _p_tuple(values) -> bytes:
    return b"(" + b"".join(_p_int(v) for v in values) + b"t"


def tensor_pickle(dtype: str, shape: tuple[int, ...]) -> bytes:
    """data.pkl of a contiguous tensor in storage "0", as torch.save writes it (protocol 2, rebuild_tensor_v2)."""
    if dtype not in _TYPED_STORAGE:
        raise NemoconvError(f"the megatron writer does not store {dtype} tensors")
    stride = tuple(math.prod(shape[k + 1:]) for k in range(len(shape)))
    return (b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"("
            + b"(" + _p_str("storage") + f"ctorch\n{_TYPED_STORAGE[dtype]}\n".encode() + _p_str("0") + _p_str("cpu")
            + _p_int(math.prod(shape)) + b"tQ"
            + _p_int(0) + _p_tuple(shape) + _p_tuple(stride) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR.")


class ZipItemWriter:
    """Writes one torch.save-format zip archive at the current end of `f`, records in the order given; the last
    record may be large and may come from a file (copy_file_range). Offsets are relative to the archive start."""

    def __init__(self, f, pos: int):
        self.f, self.base, self.pos = f, pos, pos
        self.central: list[bytes] = []

    def _emit(self, data) -> None:
        _write_all(self.f, memoryview(data))
        self.pos += len(data)

    def record(self, name: str, size: int, crc: int, writer=None, data: bytes | None = None,
               congruent_to: int | None = None) -> None:
        """One stored record. Its data starts 64-byte aligned, or (`congruent_to`: the source offset of bytes
        copied file to file) at the same offset within a page as its source, which kernel copies do fastest."""
        rel = self.pos - self.base
        big = size >= 0xFFFFFFFF or rel >= 0xFFFFFFFF
        encoded = name.encode()
        zip64 = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        header_len = 30 + len(encoded) + len(zip64)
        start = self.pos + header_len + 4  # 4: the padding block's own header
        pad = (congruent_to - start) % _PAGE if congruent_to is not None else (-start) % _ALIGN
        extra = zip64 + struct.pack("<HH", 0xFFFF, pad) + b"\0" * pad
        small = 0xFFFFFFFF if big else size
        self._emit(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45 if big else 20, 0, 0, 0, _DOS_DATE, crc, small,
                               small, len(encoded), len(extra)) + encoded + extra)
        if data is not None:
            self._emit(data)
        else:
            self.pos += writer()
        c_extra = struct.pack("<HHQQQ", 1, 24, size, size, rel) if big else b""
        self.central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45 if big else 20, 0, 0, 0,
                                        _DOS_DATE, crc, small, small, len(encoded), len(c_extra), 0, 0, 0, 0,
                                        0xFFFFFFFF if big else rel) + encoded + c_extra)

    def small(self, name: str, data: bytes) -> None:
        self.record(name, len(data), zlib.crc32(data), data=data)

    def finish(self) -> int:
        cd_start = self.pos - self.base
        for entry in self.central:
            self._emit(entry)
        cd_size = self.pos - self.base - cd_start
        n = len(self.central)
        if cd_start >= 0xFFFFFFFF or cd_size >= 0xFFFFFFFF:
            eocd64 = self.pos - self.base
            self._emit(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self._emit(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
            self._emit(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        else:
            self._emit(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, cd_size, cd_start, 0))
        return self.pos - self.base


def write_torch_archive(f, pos: int, pickle_bytes: bytes, data_size: int = 0, data_writer=None,
                        congruent_to: int | None = None) -> int:
    """A torch.save zip (data.pkl, byteorder, version, and the storage record "0" when `data_writer` is given);
    returns its length. The storage record's CRC is left 0, as torch.save does with compute_crc32 off (torch.load
    does not check it; computing it would cost a pass over every byte)."""
    item = ZipItemWriter(f, pos)
    item.small("archive/data.pkl", pickle_bytes)
    item.small("archive/byteorder", b"little")
    item.small("archive/version", b"3\n")
    if data_writer is not None:
        item.record("archive/data/0", data_size, 0, writer=data_writer, congruent_to=congruent_to)
    return item.finish()


@dataclass
class _Written:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int


class DcpWriter:
    """Writes a planned stream of tensors as a DCP checkpoint (one chunk each, global shapes), then `.metadata`,
    `metadata.json` and `common.pt`: what Megatron-core's `dist_checkpointing.load` reads. Same interface as
    ShardedWriter; files of at most `max_shard_size` (a larger tensor gets a file of its own)."""

    def __init__(self, directory: Path, planned: list[PlannedTensor], max_shard_size: int, metadata: dict | None = None):
        from nemoconv.stream.output import plan_shards

        self.directory = directory
        self.shards = plan_shards(planned, max_shard_size)
        self.names = [f"__0_{k}.distcp" for k in range(len(self.shards))]
        self._planned = [p for shard in self.shards for p in shard]
        self._file_of = {p.name: self.names[k] for k, shard in enumerate(self.shards) for p in shard}
        self._next = 0
        self._files: dict[str, object] = {}
        self._pos: dict[str, int] = {}
        self.written: list[_Written] = []

    def write(self, name: str, tensor, entry=None) -> None:
        expected = self._planned[self._next]
        if name != expected.name or dtype_name(tensor.dtype) != dtype_name(expected.dtype) \
                or tuple(tensor.shape) != tuple(expected.shape):
            raise RuntimeError(f"internal error: writer expected {expected} but got {name} {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        self._next += 1
        fname = self._file_of[name]
        f = self._files.get(fname)
        if f is None:
            for other in self._files.values():
                other.close()
            f = self._files[fname] = open(self.directory / fname, "wb", buffering=0)
            self._pos[fname] = 0
        dtype, shape = dtype_name(expected.dtype), tuple(expected.shape)
        nbytes = expected.nbytes
        start = self._pos[fname]
        source = entry.start if entry is not None and not isinstance(entry, ChunkedEntry) else None
        if isinstance(entry, ChunkedEntry) and entry.rows_tiled and entry.pieces:
            source = entry.pieces[0][1].start  # merged experts: the first expert's bytes
        length = write_torch_archive(f, start, tensor_pickle(dtype, shape), nbytes,
                                     lambda: self._write_data(f, tensor, entry, nbytes), congruent_to=source)
        self._pos[fname] = start + length
        self.written.append(_Written(name, dtype, shape, fname, start, length))

    @staticmethod
    def _write_data(f, tensor, entry, nbytes: int) -> int:
        if entry is not None:
            return _copy_range(entry, f)
        if not nbytes:
            return 0
        if isinstance(tensor, HostTensor):
            import numpy as np

            _write_all(f, memoryview(np.ascontiguousarray(tensor.bits).reshape(-1)).cast("B"))
        else:
            import torch

            _write_all(f, memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()))
        return nbytes

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._next != len(self._planned):
            raise RuntimeError("internal error: fewer tensors written than planned")
        (self.directory / METADATA_NAME).write_bytes(metadata_pickle(self.written))
        (self.directory / "metadata.json").write_text(
            '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", '
            '"common_backend_version": 1}\n')
        with open(self.directory / "common.pt", "wb") as f:
            write_torch_archive(f, 0, b"\x80\x02}q\x00.")  # an empty dict: no common state


_DCP_META = "torch.distributed.checkpoint.metadata"


def _p_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _p_object(module: str, name: str, state: bytes) -> bytes:
    """cls.__new__(cls) then BUILD(state): how pickle stores a dataclass instance."""
    return _p_global(module, name) + b")\x81" + state + b"b"


def _p_dict(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in items) + b"u"


def _p_size(values) -> bytes:
    return _p_global("torch", "Size") + _p_tuple(values) + b"\x85R"  # torch.Size((…,))


def metadata_pickle(written: list[_Written]) -> bytes:
    """`.metadata` for tensors stored one chunk each: the pickle DCP's own classes give (protocol 2), assembled
    directly so that writing imports no torch. torch's FileSystemReader and Megatron-core read it (tested)."""
    state, storage, planner = [], [], []
    for w in written:
        key, zeros = _p_str(w.name), _p_size([0] * len(w.shape))
        props = _p_object(_DCP_META, "TensorProperties", b"(" + _p_global("torch", w.dtype)
                          + _p_global("torch.serialization", "_get_layout") + _p_str("torch.strided") + b"\x85R"
                          + b"\x89" + _p_global(_DCP_META, "_MEM_FORMAT_ENCODING") + _p_int(0) + b"\x85R"
                          + b"\x89t")
        chunk = _p_object(_DCP_META, "ChunkStorageMetadata",
                          _p_dict([(_p_str("offsets"), zeros), (_p_str("sizes"), _p_size(w.shape))]))
        state.append((key, _p_object(_DCP_META, "TensorStorageMetadata", _p_dict([
            (_p_str("properties"), props), (_p_str("size"), _p_size(w.shape)), (_p_str("chunks"), b"](" + chunk + b"e")]))))
        index = _p_object(_DCP_META, "MetadataIndex", _p_dict([
            (_p_str("fqn"), key), (_p_str("offset"), zeros), (_p_str("index"), _p_int(0))]))
        info = _p_object("torch.distributed.checkpoint.filesystem", "_StorageInfo", _p_dict([
            (_p_str("relative_path"), _p_str(w.file)), (_p_str("offset"), _p_int(w.offset)),
            (_p_str("length"), _p_int(w.length)), (_p_str("transform_descriptors"), b"N")]))
        storage.append((index, info))
        planner.append((key, b"(" + key + b"t"))
    return b"\x80\x02" + _p_object(_DCP_META, "Metadata", _p_dict([
        (_p_str("state_dict_metadata"), _p_dict(state)), (_p_str("planner_data"), _p_dict(planner)),
        (_p_str("storage_data"), _p_dict(storage)), (_p_str("storage_meta"), b"N"),
        (_p_str("version"), _p_str("1.0.0"))])) + b"."
