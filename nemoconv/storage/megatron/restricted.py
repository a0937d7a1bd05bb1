"""The only two pickles nemoconv reads, each through an unpickler that resolves an explicit allow-list of names.

A pickle runs code only through the callables its GLOBAL/STACK_GLOBAL/EXT opcodes name (REDUCE, NEWOBJ and
BUILD act on objects those names produced); `find_class` is where every such name is resolved, so refusing any
name outside the list refuses every way a hostile file could reach `os.system`, `eval` or an importer. Persistent
ids (how torch points at tensor bytes) are refused by the metadata reader and turned into plain records by the
tensor reader. Nothing here is `pickle.load`, and nothing is `torch.load`.

- `.metadata` of a PyTorch Distributed Checkpoint: a raw pickle of DCP's metadata dataclasses. Allowed: those
  classes, `torch.Size`, torch dtypes, the layout/memory-format lookups DCP pickles them through, and the path
  class of `StorageMeta.checkpoint_id`. Constructing any of them only stores values.
- `data.pkl` of each tensor item in a `.distcp` file (torch.save's zip format): allowed are torch's tensor
  rebuild functions, its storage type names, the dtypes and `OrderedDict` — but resolved to local stand-ins
  that only record (storage key, dtype, offset, shape, stride). No tensor is built; the bytes are read from the
  zip record afterwards, by offset.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass

from nemoconv.errors import NemoconvError


class DcpRecord:
    """A DCP metadata object as read: its pickled fields as attributes, and nothing else (no torch class)."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) of a slotted dataclass
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.state = state  # TensorProperties pickles a tuple: (dtype, layout, requires_grad, format, pin)

    def __repr__(self):
        return f"{type(self).__name__}({self.__dict__})"


# One stand-in class per DCP class name, so the reader can tell them apart.
DCP_CLASSES = {name: type(name, (DcpRecord,), {}) for name in (
    "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "BytesStorageMetadata",
    "MetadataIndex", "StorageMeta", "_StorageInfo", "SavePlan", "WriteItem", "TensorWriteData")}
# Megatron-core also pickles its save plans into `.metadata` (`all_local_plans`): DCP planner dataclasses.
_PLANNER_CLASSES = ("SavePlan", "WriteItem", "TensorWriteData")

_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32",
                "int16", "int8", "uint8", "bool")


def _path_text(*parts) -> str:
    """A pickled path (pathlib reduces to its parts) as plain text: `StorageMeta.checkpoint_id`, never used."""
    return "/".join(str(p) for p in parts)


def _metadata_globals() -> dict[tuple[str, str], object]:
    """Every name a DCP `.metadata` pickle may use, resolved to a plain stand-in (torch is never imported)."""
    meta = "torch.distributed.checkpoint.metadata"
    planner = "torch.distributed.checkpoint.planner"
    allowed: dict[tuple[str, str], object] = {
        (planner if n in _PLANNER_CLASSES else meta, n): c for n, c in DCP_CLASSES.items() if n != "_StorageInfo"}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = DCP_CLASSES["_StorageInfo"]
    allowed[(planner, "WriteItemType")] = int  # an enum, pickled as WriteItemType(value)
    allowed[("torch", "Size")] = tuple
    for name in _DTYPE_NAMES:
        allowed[("torch", name)] = name  # a dtype reads as its name
    allowed[("torch.serialization", "_get_layout")] = str
    allowed[(meta, "_MEM_FORMAT_ENCODING")] = int
    for name in ("PosixPath", "PurePosixPath"):
        allowed[("pathlib", name)] = _path_text
    allowed[("collections", "OrderedDict")] = OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict, what: str):
        super().__init__(file)
        self._allowed, self._what = allowed, what

    def find_class(self, module, name):
        found = self._allowed.get((module, name))
        if found is None:
            raise NemoconvError(f"{self._what}: refers to {module}.{name}, which is not a checkpoint metadata "
                                f"class; refusing to read it")
        return found

    def persistent_load(self, pid):
        raise NemoconvError(f"{self._what}: unexpected persistent reference; refusing to read it")


def load_dcp_metadata(data: bytes, what: str):
    """The `Metadata` record of a DCP `.metadata` file, read through the allow-list into stand-ins."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), _metadata_globals(), what).load()
    except NemoconvError:
        raise
    except Exception as exc:  # a truncated or malformed pickle
        raise NemoconvError(f"{what}: not a readable checkpoint metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, DCP_CLASSES["Metadata"]):
        raise NemoconvError(f"{what}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


# ---- tensor items --------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str | None  # None: untyped (bytes), the dtype comes with _rebuild_tensor_v3


@dataclass(frozen=True)
class _DtypeName:
    name: str


@dataclass(frozen=True)
class TensorRecord:
    """What a tensor item's data.pkl says: which zip record holds the bytes, and how to view them."""

    storage_key: str
    dtype: str
    storage_numel: int  # elements (typed storage) or bytes (untyped)
    storage_typed: bool
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    key, stype, numel = storage
    return TensorRecord(key, stype.dtype, numel, True, offset, tuple(size), tuple(stride))


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    key, stype, numel = storage
    return TensorRecord(key, dtype.name, numel, stype.dtype is not None, offset, tuple(size), tuple(stride))


class _TensorItemUnpickler(pickle.Unpickler):
    def __init__(self, file, what: str):
        super().__init__(file)
        self._what = what

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(None)
        if module == "torch" and name in _DTYPE_NAMES:
            return _DtypeName(name)
        raise NemoconvError(f"{self._what}: tensor item refers to {module}.{name}, which a plain tensor never "
                            f"needs; refusing to read it")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise NemoconvError(f"{self._what}: tensor item has an unexpected storage reference")
        return (pid[2], pid[1], pid[4])


def load_tensor_record(data: bytes, what: str) -> TensorRecord:
    try:
        record = _TensorItemUnpickler(io.BytesIO(data), what).load()
    except NemoconvError:
        raise
    except Exception as exc:
        raise NemoconvError(f"{what}: unreadable tensor item ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, TensorRecord):
        raise NemoconvError(f"{what}: item is a {type(record).__name__}, not a tensor")
    return record
