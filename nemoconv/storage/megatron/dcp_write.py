"""Writing PyTorch Distributed Checkpoint (DCP) directories as Megatron-core's `torch_dist` backend reads them.

One chunk per tensor (global shapes), each a torch.save zip archive whose records we write directly (the
tensor bytes stored uncompressed, copied file to file where they pass through unchanged), in one sequential
pass per `.distcp` file; then `.metadata` (the pickle DCP's classes give, assembled without torch),
`metadata.json` and `common.pt`.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.fileio import Appender
from nemoconv.storage.tensors import (
    ITEMSIZE,
    ChunkedEntry,
    PlannedTensor,
    RowsEntry,
    copy_entry,
    dtype_name,
    plan_shards,
    write_tensor,
)

METADATA_NAME = ".metadata"

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
    """Writes one torch.save-format zip archive at the current end of `out` (an Appender), records in the order
    given; the last record may be large and may come from a file (copy_file_range). Offsets are relative to the
    archive start."""

    def __init__(self, out: Appender):
        self.out, self.base, self.pos = out, out.pos, out.pos
        self.central: list[bytes] = []

    def _emit(self, data) -> None:
        self.out.write(data)
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


def write_torch_archive(out: Appender, pickle_bytes: bytes, data_size: int = 0, data_writer=None,
                        congruent_to: int | None = None) -> int:
    """A torch.save zip (data.pkl, byteorder, version, and the storage record "0" when `data_writer` is given);
    returns its length. The storage record's CRC is left 0, as torch.save does with compute_crc32 off (torch.load
    does not check it; computing it would cost a pass over every byte)."""
    item = ZipItemWriter(out)
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

    def __init__(self, directory: Path, planned: list[PlannedTensor], max_shard_size: int,
                 metadata: dict | None = None):
        self.directory = directory
        self.shards = plan_shards(planned, max_shard_size)
        self.names = [f"__0_{k}.distcp" for k in range(len(self.shards))]
        self._planned = [p for shard in self.shards for p in shard]
        self._file_of = {p.name: self.names[k] for k, shard in enumerate(self.shards) for p in shard}
        self._next = 0
        self._out: Appender | None = None  # the .distcp file being written
        self.written: list[_Written] = []

    def write(self, name: str, tensor, entry=None) -> None:
        expected = self._planned[self._next]
        if name != expected.name or dtype_name(tensor.dtype) != dtype_name(expected.dtype) \
                or tuple(tensor.shape) != tuple(expected.shape):
            raise RuntimeError(f"internal error: writer expected {expected} but got {name} {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        self._next += 1
        fname = self._file_of[name]
        if self._out is None or self._out.path.name != fname:
            if self._out is not None:
                self._out.close()
            # no early writeback here: measured, it cost hf → megatron ~8 % more CPU (bench_megatron.py)
            self._out = Appender(self.directory / fname, writeback=False)
        out = self._out
        dtype, shape = dtype_name(expected.dtype), tuple(expected.shape)
        start = out.pos
        data = (lambda: copy_entry(entry, out)) if entry is not None else (lambda: write_tensor(out, tensor))
        length = write_torch_archive(out, tensor_pickle(dtype, shape), expected.nbytes, data,
                                     congruent_to=_source_start(entry))
        self.written.append(_Written(name, dtype, shape, fname, start, length))

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._next != len(self._planned):
            raise RuntimeError("internal error: fewer tensors written than planned")
        (self.directory / METADATA_NAME).write_bytes(metadata_pickle(self.written))
        (self.directory / "metadata.json").write_text(
            '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", '
            '"common_backend_version": 1}\n')
        common = Appender(self.directory / "common.pt")
        write_torch_archive(common, b"\x80\x02}q\x00.")  # an empty dict: no common state
        common.close()


def _source_start(entry) -> int | None:
    """Where the bytes of a whole stored tensor (or of experts merged on the fly) start in their source file, to
    store them page-congruent; None for computed data and for parts cut out of a stored tensor, which are stored
    64-byte aligned as when they were computed in memory (the same output bytes either way)."""
    if entry is None or isinstance(entry, RowsEntry):
        return None
    if not isinstance(entry, ChunkedEntry):
        return entry.start
    whole = entry.start == 0 and entry.nbytes == math.prod(entry.full_shape) * ITEMSIZE[entry.dtype_name]
    if entry.rows_tiled and entry.pieces and whole:
        return entry.pieces[0][1].start  # merged experts: the first expert's bytes
    return None


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
            (_p_str("properties"), props), (_p_str("size"), _p_size(w.shape)),
            (_p_str("chunks"), b"](" + chunk + b"e")]))))
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
