"""The tensor stream: source scheme → canonical `hf` (checked against the config) → target scheme.

Every stage is a generator over `Item`s, so memory holds one tensor at a time, or one group (a MoE
layer's experts, an attention layer's q/k/v) while it is merged or fused. Run on `meta` tensors the same
stages make the plan: names, shapes, dtypes and every lossy step are known, and every error is raised,
before a single byte is written. Each stage ends by proving that it consumed every input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.schemes import Scheme, config_product, get_scheme
from nemoconv.schemes.scales import SCALE_SUFFIXES
from nemoconv.storage.config import ModelSpec
from nemoconv.storage.safetensors_io import (
    FLOAT_NAMES,
    FP8_NAMES,
    ChunkedEntry,
    HostTensor,
    TensorEntry,
    TensorReader,
    bits_dtype,
    dtype_name,
    torch_dtype,
)

# The stages run on torch tensors (model loading, quantize) or, with `host=True`, on HostTensors (numpy bits,
# no torch import: what `nemoconv convert` uses). Only the few primitives below (_cat, _split_along, _stack,
# _unstack_all, _convert_dtype) look at which; every mapping decision is made once, by dtype name.


@dataclass
class Item:
    name: str
    tensor: object  # torch.Tensor or HostTensor: the data, or a meta tensor while `entry` is still unread
    sources: tuple[str, ...]
    cast_from: dict | None = None  # {"dtype": original, "by": "scheme"|"dtype"} when this stream cast it
    entry: TensorEntry | None = None  # bytes still on disk: read only if a transform needs them
    reader: TensorReader | None = None
    # The narrowest dtype that holds these values exactly (None: the current one). A bf16 tensor widened to
    # fp32 by --dtype and cast back to bf16 by a scheme loses nothing: lossiness is judged by the values.
    values_dtype: str | None = None

    def data(self):
        """The values (read now if still on disk); a meta tensor while planning."""
        if self.entry is not None and self.reader is not None:
            return self.reader.read(self.entry)
        return self.tensor

    def with_tensor(self, tensor, **changes) -> "Item":
        return replace(self, tensor=tensor, entry=None, reader=None, **changes)

    @property
    def dtype(self) -> str:
        return dtype_name(self.tensor.dtype)


@dataclass
class Journal:
    """What the stream did that a user must know: lossy steps (and the casts that lost nothing)."""

    lossy: list[dict] = field(default_factory=list)

    def lossy_step(self, tensor: str, step: str, detail: str) -> None:
        self.lossy.append({"tensor": tensor, "step": step, "detail": detail})


_WIDENING = {
    "bfloat16": {"float32", "float64"},
    "float16": {"float32", "float64"},
    "float32": {"float64"},
    "float8_e4m3fn": {"float16", "bfloat16", "float32", "float64"},
    "float8_e5m2": {"float16", "bfloat16", "float32", "float64"},
}


def is_lossless_cast(src, dst) -> bool:
    src, dst = dtype_name(src), dtype_name(dst)
    return src == dst or dst in _WIDENING.get(src, set())


# ---- primitives: the only code that knows torch tensors from HostTensors ---------------------------------


def _is_host(t) -> bool:
    return isinstance(t, HostTensor)


_POOL = None


def _pool():
    """Two worker threads for the bit moves of expert merges and splits (numpy releases the GIL)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nemoconv-move")
    return _POOL


def _parallel(fn, count: int) -> list:
    """fn(0..count-1) on the two workers (in order), or inline for small jobs."""
    if count < 4:
        return [fn(j) for j in range(count)]
    return list(_pool().map(fn, range(count)))


def _meta_like(t, shape):
    if _is_host(t):
        return HostTensor(t.dtype, shape)
    import torch

    return torch.empty(shape, dtype=t.dtype, device="meta")


def _cat(parts: list, axis: int):
    first = parts[0]
    if first.is_meta:  # planning: shapes only (torch.cat on meta pulls in the slow prims machinery)
        shape = list(first.shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        return _meta_like(first, shape)
    if _is_host(first):
        import numpy as np

        return HostTensor.of(first.dtype, np.concatenate([p.bits for p in parts], axis=axis))
    import torch

    return torch.cat(parts, dim=axis)


def _reshape(t, shape):
    """`t` with a new shape of the same element count (row-major, no data moved)."""
    if _is_host(t):
        return HostTensor(t.dtype, shape) if t.is_meta else HostTensor.of(t.dtype, t.bits.reshape(shape))
    return t.reshape(shape)


def _grouped(t, groups: int | None):
    """[rows, …] → [groups, rows/groups, …] for an interleaved fuse (unchanged without groups)."""
    return t if groups is None else _reshape(t, (groups, t.shape[0] // groups, *t.shape[1:]))


def _ungrouped(t, grouped: bool):
    return _reshape(t, (t.shape[0] * t.shape[1], *t.shape[2:])) if grouped else t


def _split_along(t, sizes: list[int], axis: int) -> list:
    """Contiguous pieces of `t` along `axis`."""
    if t.is_meta:
        shapes = []
        for n in sizes:
            shape = list(t.shape)
            shape[axis] = n
            shapes.append(shape)
        return [_meta_like(t, s) for s in shapes]
    if _is_host(t):
        import numpy as np

        bounds = [sum(sizes[:k]) for k in range(1, len(sizes))]
        return [HostTensor.of(t.dtype, np.ascontiguousarray(p)) for p in np.split(t.bits, bounds, axis=axis)]
    import torch

    return [p.contiguous() for p in torch.split(t, sizes, dim=axis)]


_SAME_SIZE_INT = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _stack(parts: list, transpose: bool):
    """[E] tensors of [a, b] → [E, b, a] when transposing (expert merge), else [E, a, b].

    Copies raw bits through a same-size integer view: exact for every dtype (fp8 included), and an integer
    transpose copy is several times faster than a bf16 one on CPU. Parts may be Items still on disk: each
    worker then reads its expert and moves it, so reads and transposes run on both cores."""
    first = parts[0].tensor if isinstance(parts[0], Item) else parts[0]
    shape = (len(parts), *(first.shape[::-1] if transpose else first.shape))
    if first.is_meta and not (isinstance(parts[0], Item) and parts[0].reader is not None):
        return _meta_like(first, shape)
    if _is_host(first):
        import numpy as np

        out = np.empty(shape, dtype=bits_dtype(first.element_size()))

        def move(j: int) -> None:
            p = parts[j].data() if isinstance(parts[j], Item) else parts[j]
            if transpose:
                _transpose_into(p.bits, out[j])
            else:
                out[j] = p.bits

        _parallel(move, len(parts))
        return HostTensor.of(first.dtype, out)
    import torch

    parts = [p.data() if isinstance(p, Item) else p for p in parts]
    bits = getattr(torch, _SAME_SIZE_INT[first.element_size()])
    out = torch.empty(shape, dtype=bits)
    for j, p in enumerate(parts):
        out[j].copy_(p.view(bits).T if transpose else p.view(bits))
    return out.view(first.dtype)


def _on_disk(parts: list) -> bool:
    return all(isinstance(p, Item) and p.entry is not None and p.reader is not None for p in parts)


def _stacked_on_disk(name: str, parts: list[Item]) -> Item:
    """Experts stacked without a transpose are their bytes in sequence: an entry over the parts' byte ranges,
    copied file to file by the writer (or read when a transform needs the values)."""
    first = parts[0]
    shape = (len(parts), *first.tensor.shape)
    pieces = tuple(((j, *[0] * len(first.tensor.shape)), replace(p.entry, shape=(1, *p.entry.shape)))
                   for j, p in enumerate(parts))
    nbytes = sum(p.entry.nbytes for p in parts)
    entry = ChunkedEntry(name, first.entry.file, first.entry.dtype_name, shape, 0, nbytes, shape, pieces, True)
    return Item(name, _meta_like(first.tensor, shape), tuple(s for p in parts for s in p.sources),
                entry=entry, reader=first.reader)


def _unstacked_on_disk(item: Item, names: list[str]) -> list[Item]:
    """The experts of a merged [E, a, b] tensor still on disk, without a transpose: each one a slab of its bytes."""
    shape = tuple(item.tensor.shape[1:])
    slab = item.entry.nbytes // len(names)
    return [Item(n, _meta_like(item.tensor, shape), item.sources,
                 entry=replace(item.entry, name=n, shape=shape, start=item.entry.start + j * slab, nbytes=slab),
                 reader=item.reader) for j, n in enumerate(names)]


def _unstack_all(item: Item, count: int, transpose: bool) -> list:
    """The [E] experts of a merged [E, a, b] tensor, each [b, a] when transposing, else [a, b]. A host tensor
    still on disk is read expert by expert, by the same workers that move the bits."""
    t = item.tensor
    if t.is_meta and (item.entry is None or item.reader is None):
        return [_meta_like(t, t.shape[1:][::-1] if transpose else t.shape[1:]) for _ in range(count)]
    if _is_host(t):
        import numpy as np

        entry, reader = item.entry, item.reader
        slab = entry.nbytes // count if entry is not None else 0

        def piece(j: int) -> HostTensor:
            if entry is not None and reader is not None:
                src = reader.read(replace(entry, shape=t.shape[1:], start=entry.start + j * slab, nbytes=slab)).bits
            else:
                src = t.bits[j]
            if not transpose:
                return HostTensor.of(t.dtype, np.ascontiguousarray(src))
            out = np.empty(t.shape[1:][::-1], dtype=src.dtype)
            _transpose_into(src, out)
            return HostTensor.of(t.dtype, out)

        return _parallel(piece, count)
    import torch

    t = item.data()
    bits = getattr(torch, _SAME_SIZE_INT[t.element_size()])
    return [(t[j].view(bits).T if transpose else t[j].view(bits)).contiguous().view(t.dtype) for j in range(count)]


def _transpose_into(a, out) -> None:
    """out[...] = a.T for 2-D bit arrays, fast: a copy with a 2-byte element per strided access runs at
    ~0.7 GB/s, so move 16-byte runs of a row first (`a` as [R, C/k] units of k elements → [C/k, R]), then
    spread each run's k elements over k output rows with short, cache-friendly strides (~3x faster)."""
    import numpy as np

    rows, cols = a.shape
    k = 16 // a.itemsize
    if k > 1 and cols % k == 0 and a.flags.c_contiguous and out.flags.c_contiguous and a.size:
        runs = np.ascontiguousarray(a.view(np.dtype("V16")).T)  # [C/k, R] runs of k elements
        out.reshape(cols // k, k, rows)[...] = runs.view(a.dtype).reshape(cols // k, rows, k).transpose(0, 2, 1)
    else:
        out[...] = a.T


def _convert_dtype(t, dtype: str):
    """`t` cast to the dtype named `dtype`, with torch's rounding (a meta tensor stays meta)."""
    if not _is_host(t):
        return t.to(torch_dtype(dtype))
    if t.is_meta:
        return HostTensor(dtype, t.shape)
    import numpy as np

    # The casts the schemes make, done on the bits exactly as torch does them: bf16 → fp32 is a shift, and
    # fp32 → bf16 of values that fit (an earlier widening undone) drops zero bits.
    if t.dtype == "bfloat16" and dtype == "float32":
        return HostTensor.of(dtype, t.bits.astype(np.uint32) << 16)
    if t.dtype == "float32" and dtype == "bfloat16" and not (t.bits & 0xFFFF).any():
        return HostTensor.of(dtype, (t.bits >> 16).astype(np.uint16))
    # Anything else (a rounding cast) goes through torch, so both streams round alike.
    import torch

    src = torch.from_numpy(t.bits.view(np.dtype(_SAME_SIZE_INT[t.element_size()]))).view(torch_dtype(t.dtype))
    out = src.to(torch_dtype(dtype)).contiguous()
    bits = out.view(getattr(torch, _SAME_SIZE_INT[out.element_size()])).numpy().view(bits_dtype(out.element_size()))
    return HostTensor.of(dtype, bits)


def _cast(item: Item, dtype: str, by: str, journal: Journal, why: str) -> Item:
    src = item.dtype
    if src == dtype:
        return item
    exact_in = item.values_dtype or src
    lossless = is_lossless_cast(exact_in, dtype)
    # A restore undoes an earlier widening cast, so the values fit the original dtype exactly.
    if by != "restore" and not lossless:
        journal.lossy_step(item.name, "cast", f"{src} → {dtype} ({why})")
    return item.with_tensor(_convert_dtype(item.data(), dtype), cast_from={"dtype": src, "by": by},
                            values_dtype=exact_in if lossless else dtype)


# ---- stage 1: read ------------------------------------------------------------------------------


def read_items(ck: Checkpoint, reader: TensorReader, meta: bool) -> Iterator[Item]:
    """Source tensors in natural order (one layer's tensors together), read aliases normalized.

    Nothing is read here: each item points at its bytes on disk, read when a transform needs the values,
    or copied file-to-file by the writer when the tensor passes through unchanged."""
    scheme = ck.scheme_rules
    seen: dict[str, str] = {}
    for name in ck.tensor_names():
        entry = ck.entries[name]
        normalized = scheme.normalize(name)
        if normalized in seen:
            raise NemoconvError(f"{ck.path}: tensors {seen[normalized]!r} and {name!r} are the same tensor under two spellings")
        seen[normalized] = name
        shape_only = entry.host_meta() if reader.host else entry.meta()
        yield Item(normalized, shape_only, (name,), entry=entry, reader=None if meta else reader)


# ---- stage 2: source scheme → hf -----------------------------------------------------------------


def _restore_dtypes(ck: Checkpoint) -> dict[str, str]:
    """Dtypes a previous nemoconv conversion changed by scheme rule, to undo them on the way back."""
    restore = {}
    for t in (ck.manifest or {}).get("tensors", []):
        cast = t.get("cast_from")
        if cast and cast.get("by") == "scheme":
            restore[t["name"]] = cast["dtype"]
    return restore


def to_hf(items: Iterable[Item], scheme: Scheme, spec: ModelSpec, restore: dict[str, str], journal: Journal,
          reader: TensorReader | None = None) -> Iterator[Item]:
    dtypes = ("float32", "bfloat16", "float16", "float64")
    parts = _PartJoiner(scheme, spec)
    for item in items:
        hf_name = scheme.to_hf(item.name, spec)
        if hf_name is None:
            raise NemoconvError(f"unknown tensor {item.name!r}: no rule of the {scheme.name} scheme names it")
        original = restore.get(item.name)
        whole = parts.add(replace(item, name=hf_name))
        if whole is None:
            continue
        for piece in _split(whole.name, whole, scheme, spec):
            piece = _trim(piece, scheme, spec, journal)
            if original is not None and original in dtypes and scheme.cast_for(piece.name) is not None \
                    and _restores_exactly(piece, original, reader):
                piece = _cast(piece, original, "restore", journal, "restoring the source dtype")
                piece.cast_from = None
            yield piece
    parts.finish()


class _PartJoiner:
    """Joins the parts a scheme stores one tensor in (`split` rules) back into that tensor."""

    def __init__(self, scheme: Scheme, spec: ModelSpec):
        self.scheme, self.spec = scheme, spec
        self.buffers: dict[tuple, dict[str, Item]] = {}

    def add(self, item: Item) -> Item | None:
        """The item itself, the whole tensor once its last part arrived, or None while parts are missing."""
        for s_idx, split in enumerate(self.scheme.splits):
            fields = split.to.match(item.name)
            if fields is None or fields.get("part") not in split.parts:
                continue
            part = fields.pop("part")
            key = (s_idx, tuple(sorted(fields.items())))
            buf = self.buffers.setdefault(key, {})
            buf[part] = item
            if len(buf) < len(split.parts):
                return None
            del self.buffers[key]
            group = [buf[p] for p in split.parts]
            sizes = [config_product(x, self.spec) for x in split.sizes]
            for member, size in zip(group, sizes):
                if member.tensor.shape[split.axis] != size:
                    raise NemoconvError(f"{member.sources[0]}: has {member.tensor.shape[split.axis]} rows along axis "
                                        f"{split.axis}, config implies {size}")
            return Item(split.hf.format(fields), _cat([m.data() for m in group], split.axis),
                        tuple(src for m in group for src in m.sources))
        return item

    def finish(self) -> None:
        if self.buffers:
            (s_idx, fields), buf = next(iter(self.buffers.items()))
            split = self.scheme.splits[s_idx]
            missing = [p for p in split.parts if p not in buf]
            raise NemoconvError(f"{split.hf.format(dict(fields))}: part(s) {missing} missing (found {sorted(buf)})")


def _trim(item: Item, scheme: Scheme, spec: ModelSpec, journal: Journal) -> Item:
    """Cut padding rows (a vocab padded for tensor parallelism) back to the config's size."""
    for trim in scheme.trims:
        if trim.hf.match(item.name) is None:
            continue
        size = config_product(trim.size, spec)
        rows = item.tensor.shape[0]
        if rows > size:
            journal.lossy_step(item.name, "trim", f"dropped {rows - size} padding rows beyond {trim.size}={size}")
            return item.with_tensor(_split_along(item.data(), [size, rows - size], 0)[0])
    return item


def _restores_exactly(item: Item, dtype: str, reader: TensorReader | None) -> bool:
    """Whether casting `item` back to `dtype` keeps its values bit for bit. The manifest only says which dtype a
    scheme widened from; the values may have been edited since (A_log + 1e-4 after training), and then the
    stored dtype is kept, so the stream (and the model it feeds) carries what is stored. The tensors a scheme
    casts are small (A_log, D, dt_bias, norms, router gates), so they are read even while planning, and the
    plan and the write stream decide alike: both look at the stored bytes (a piece split off a fused tensor has
    none to look at, in either pass, and is never restored)."""
    source = item.reader or reader
    if item.entry is None or source is None:
        return False
    values = source.read(item.entry)
    back = _convert_dtype(_convert_dtype(values, dtype), dtype_name(values.dtype))
    return _same_bits(values, back)


def _same_bits(a, b) -> bool:
    if _is_host(a):
        return a.bits.shape == b.bits.shape and bool((a.bits == b.bits).all())
    import torch

    bits = getattr(torch, _SAME_SIZE_INT[a.element_size()])
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits))


def _split(hf_name: str, item: Item, scheme: Scheme, spec: ModelSpec) -> list[Item]:
    t = item.tensor
    for merge in scheme.merges:
        fields = merge.to.match(hf_name)
        if fields is None:
            continue
        count = config_product(merge.count, spec)
        if t.dim() != 3 or t.shape[0] != count:
            raise NemoconvError(
                f"{item.name}: merged experts have shape {list(t.shape)}, config implies {count} experts"
            )
        names = [merge.hf.format({**fields, "j": str(j)}) for j in range(count)]
        if not merge.transpose and _on_disk([item]):
            return _unstacked_on_disk(item, names)
        pieces = _unstack_all(item, count, merge.transpose)
        return [Item(n, piece, item.sources) for n, piece in zip(names, pieces)]
    for fuse in scheme.fuses:
        fields = fuse.to.match(hf_name)
        if fields is None:
            continue
        sizes = [config_product(s, spec) for s in fuse.sizes]
        if t.shape[fuse.axis] != sum(sizes):
            raise NemoconvError(
                f"{item.name}: fused tensor has {t.shape[fuse.axis]} rows, config implies {sum(sizes)} ({sizes})"
            )
        groups = config_product(fuse.groups, spec) if fuse.groups else None
        axis = fuse.axis + (groups is not None)
        pieces = _split_along(_grouped(item.data(), groups), [n // (groups or 1) for n in sizes], axis)
        return [Item(tpl.format(fields), _ungrouped(piece, groups is not None), item.sources)
                for tpl, piece in zip(fuse.hf, pieces)]
    return [replace(item, name=hf_name)]


# ---- stage 3: the canonical network, checked against config.json ------------------------------------


class NetworkCheck:
    """Checks each canonical tensor against the config and, at the end, that none is missing."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.expected = spec.hf_shapes()
        self.mtp = spec.mtp_shapes()  # all or nothing: trainers and transformers often drop MTP heads
        self.optional = dict(self.mtp)
        if spec.tie_word_embeddings:
            self.optional["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
        self.seen: dict[str, tuple[int, ...]] = {}
        self.fp8_weights: set[str] = set()

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            self.check(item)
            yield item
        self.finish()

    def check(self, item: Item) -> None:
        name, shape = item.name, tuple(item.tensor.shape)
        if name in self.seen:
            raise NemoconvError(f"tensor {name!r} appears twice (from {item.sources})")
        self.seen[name] = shape
        want = self.expected.get(name) or self.optional.get(name)
        if want is None:
            self._check_scale(item)
            return
        if shape != want:
            raise NemoconvError(
                f"tensor {item.sources[0]!r} has shape {list(shape)} but config.json implies {list(want)}"
                + (f" for {name}" if item.sources[0] != name else "")
            )
        if item.dtype in FP8_NAMES:
            self.fp8_weights.add(name)

    def _check_scale(self, item: Item) -> None:
        name = item.name
        module, _, suffix = name.rpartition(".")
        owner = module + ".weight"
        kv_scale_on_mixer = suffix in ("k_scale", "v_scale") and (module + ".k_proj.weight") in self.expected
        if suffix in SCALE_SUFFIXES and (owner in self.expected or owner in self.optional or kv_scale_on_mixer):
            if item.tensor.numel() != 1 and tuple(item.tensor.shape) != (self.expected.get(owner, (0,))[0],):
                raise NemoconvError(f"scale {name!r} has shape {list(item.tensor.shape)}; expected a per-tensor scalar")
            return
        if name.startswith("mtp."):
            raise NemoconvError(
                f"MTP tensor {item.sources[0]!r} does not fit the config's MTP layout "
                f"(num_nextn_predict_layers={self.spec.num_mtp_layers}, pattern {self.spec.mtp_codes or '-'})"
            )
        raise NemoconvError(f"unknown tensor {item.sources[0]!r}: not part of a Nemotron-H network with this config")

    def finish(self) -> None:
        has_mtp = any(n in self.seen for n in self.mtp)
        missing = [n for n in (*self.expected, *(self.mtp if has_mtp else ())) if n not in self.seen]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NemoconvError(f"missing tensor {missing[0]!r}{more}: the checkpoint does not match config.json")
        for w in self.fp8_weights:
            if w[: -len("weight")] + "weight_scale" not in self.seen:
                raise NemoconvError(f"FP8 tensor {w!r} has no weight_scale")


# ---- stage 4: hf → target scheme ---------------------------------------------------------------------


class FromHF:
    """Groups, casts and renames canonical tensors into the target scheme; leftovers are an error."""

    def __init__(self, scheme: Scheme, spec: ModelSpec, journal: Journal, dtype=None):
        self.scheme, self.spec, self.journal = scheme, spec, journal
        self.dtype = dtype_name(dtype) if dtype is not None else None  # a name or a torch dtype
        self.merge_buffers: dict[tuple, dict[int, Item]] = {}
        self.fuse_buffers: dict[tuple, dict[int, Item]] = {}

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            drop = self.scheme.drop_for(item.name)
            if drop is not None:
                self.journal.lossy_step(item.name, "drop", drop.reason)
                continue
            yield from self._group_or_emit(item)
        leftovers = [i.name for buf in (*self.merge_buffers.values(), *self.fuse_buffers.values()) for i in buf.values()]
        if leftovers:
            raise NemoconvError(
                f"incomplete group: {leftovers[0]!r} (and {len(leftovers) - 1} more) never met the rest of its "
                f"experts or q/k/v partners"
            )

    def _group_or_emit(self, item: Item) -> Iterator[Item]:
        for split in self.scheme.splits:
            fields = split.hf.match(item.name)
            if fields is None:
                continue
            sizes = [config_product(x, self.spec) for x in split.sizes]
            for part, piece in zip(split.parts, _split_along(item.data(), sizes, split.axis)):
                yield self._finish(Item(split.to.format({**fields, "part": part}), piece, item.sources))
            return
        for m_idx, merge in enumerate(self.scheme.merges):
            fields = merge.hf.match(item.name)
            if fields is None:
                continue
            if item.dtype in FP8_NAMES and not self.scheme.fp8_experts:
                raise NemoconvError(
                    f"the {self.scheme.name} scheme cannot hold FP8 routed experts ({item.name}); "
                    f"convert the bf16 checkpoint, or quantize without MoE experts"
                )
            j = int(fields.pop("j"))
            key = (m_idx, tuple(sorted(fields.items())))
            buf = self.merge_buffers.setdefault(key, {})
            buf[j] = item
            count = config_product(merge.count, self.spec)
            if len(buf) == count:
                del self.merge_buffers[key]
                group = [buf[x] for x in range(count)]
                if not merge.transpose and _on_disk(group):
                    merged = _stacked_on_disk(merge.to.format(fields), group)
                else:
                    merged = Item(merge.to.format(fields), _stack(group, merge.transpose),
                                  tuple(s for p in group for s in p.sources))
                yield self._finish(merged)
            return
        for f_idx, fuse in enumerate(self.scheme.fuses):
            members = (*fuse.hf, *fuse.companions)
            for slot, tpl in enumerate(members):
                fields = tpl.match(item.name)
                if fields is None:
                    continue
                key = (f_idx, tuple(sorted(fields.items())))
                buf = self.fuse_buffers.setdefault(key, {})
                buf[slot] = item
                if len(buf) == len(members):
                    del self.fuse_buffers[key]
                    yield from self._fuse(fuse, fields, [buf[x] for x in range(len(members))])
                return
        yield self._finish(item)

    def _fuse(self, fuse, fields: dict, group: list[Item]) -> Iterator[Item]:
        parts, companions = group[: len(fuse.hf)], group[len(fuse.hf):]
        if fuse.unless_quantized and any(p.dtype in FP8_NAMES for p in group):
            for p in group:  # FP8 projections stay separate, with their scales
                yield self._finish(p)
            return
        if len({p.dtype for p in parts}) != 1:
            raise NemoconvError(f"cannot fuse {[p.name for p in parts]}: their dtypes differ")
        groups = config_product(fuse.groups, self.spec) if fuse.groups else None
        fused = _cat([_grouped(p.data(), groups) for p in parts], fuse.axis + (groups is not None))
        yield self._finish(Item(fuse.to.format(fields), _ungrouped(fused, groups is not None),
                                tuple(s for p in parts for s in p.sources)))
        for p in companions:
            yield self._finish(p)

    def _finish(self, item: Item) -> Item:
        is_scale = item.name.rpartition(".")[2] in SCALE_SUFFIXES
        if self.dtype is not None and item.dtype in FLOAT_NAMES and not is_scale and item.dtype not in FP8_NAMES:
            item = _cast(item, self.dtype, "dtype", self.journal, "--dtype")
        forced = self.scheme.cast_for(item.name, item.dtype)
        if forced is not None and item.dtype not in FP8_NAMES:
            item = _cast(item, forced, "scheme", self.journal, f"the {self.scheme.name} scheme stores it so")
        new_name = self.scheme.to_scheme(item.name, self.spec)
        if new_name is None:
            raise NemoconvError(f"the {self.scheme.name} scheme has no name for {item.name!r}")
        return replace(item, name=new_name)


# ---- the whole stream --------------------------------------------------------------------------------


def stream_converted(ck: Checkpoint, to: str, meta: bool = False, dtype=None,
                     journal: Journal | None = None, reader: TensorReader | None = None,
                     lazy: bool = False, prefetch: int = 0, host: bool = False) -> Iterator[Item]:
    """Every tensor of `ck` in scheme `to`, checked against the config on the way through `hf`.

    `meta`: shapes and dtypes only (the plan). `lazy`: tensors that pass through unchanged keep pointing at
    their bytes on disk (`item.entry`), for a writer that copies file to file. `prefetch`: read up to that
    many of the next unchanged tensors on threads while the consumer handles the current one.
    `dtype`: cast floating-point weights (a name or torch dtype). `host`: HostTensors instead of torch tensors
    (no torch import; a given `reader` decides this)."""
    journal = journal if journal is not None else Journal()
    target = get_scheme(to)
    own_reader = reader is None
    reader = reader or TensorReader(host=host)
    try:
        items = read_items(ck, reader, meta)
        items = to_hf(items, ck.scheme_rules, ck.spec, _restore_dtypes(ck), journal, reader)
        items = NetworkCheck(ck.spec)(items)
        items = FromHF(target, ck.spec, journal, dtype)(items)
        if lazy or meta:
            yield from items
        elif prefetch > 0:
            yield from _read_ahead(items, prefetch)
        else:
            for item in items:
                yield item.with_tensor(item.data()) if item.entry is not None else item
    finally:
        if own_reader:
            reader.close()


def _read_ahead(items: Iterator[Item], depth: int) -> Iterator[Item]:
    """Yield items in order with their data read, keeping up to `depth` reads in flight on threads
    (file reads release the GIL; a GPU loader copies one tensor while the next ones are read)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="nemoconv-read") as pool:
        window: deque = deque()
        for item in items:
            window.append((item, pool.submit(item.data) if item.entry is not None else None))
            if len(window) > depth:
                yield _resolved(*window.popleft())
        while window:
            yield _resolved(*window.popleft())


def _resolved(item: Item, future) -> Item:
    return item if future is None else item.with_tensor(future.result())
