"""The tensor stream: source scheme → canonical `hf` (checked against the config) → target scheme.

Every stage is a generator over `Item`s, so memory holds one tensor at a time, or one group (a MoE
layer's experts, an attention layer's q/k/v) while it is merged or fused. Run on `meta` tensors the same
stages make the plan: names, shapes, dtypes and every lossy step are known, and every error is raised,
before a single byte is written. Each stage ends by proving that it consumed every input.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.schemes import Scheme, config_product, get_scheme
from nemoconv.storage.config import ModelSpec
from nemoconv.storage.safetensors_io import FLOAT_NAMES, FP8_NAMES, TensorReader, dtype_name
from nemoconv.stream.items import SCALE_SUFFIXES, Item, Journal, is_lossless_cast
from nemoconv.stream.network import NetworkCheck
from nemoconv.stream.tensor_ops import (
    _cat,
    _convert_dtype,
    _grouped,
    _joined_on_disk,
    _on_disk,
    _rows_on_disk,
    _same_bits,
    _split_along,
    _split_on_disk,
    _stack,
    _stacked_on_disk,
    _ungrouped,
    _unstack_all,
    _unstacked_on_disk,
)

__all__ = ["SCALE_SUFFIXES", "FromHF", "Item", "Journal", "NetworkCheck", "is_lossless_cast", "iter_tensors",
           "read_items", "stream_converted", "to_hf"]


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


def read_items(ck: Checkpoint, reader: TensorReader, meta: bool, skip: frozenset = frozenset()) -> Iterator[Item]:
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
        yield Item(normalized, shape_only, (name,), entry=entry, reader=None if meta or name in skip else reader)


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
        whole = parts.add(item.renamed(hf_name))
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
            if split.axis == 0 and _rows_on_disk(group) and len({(m.dtype, m.tensor.shape[1:]) for m in group}) == 1:
                return _joined_on_disk(split.hf.format(fields), group)  # copied file to file, never read
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
    return [item.renamed(hf_name)]




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
            if split.axis == 0 and _rows_on_disk([item]) and sum(sizes) == item.tensor.shape[0]:
                names = [split.to.format({**fields, "part": part}) for part in split.parts]
                for piece in _split_on_disk(item, names, sizes):  # copied file to file, never read
                    yield self._finish(piece)
                return
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
        return item.renamed(new_name)


# ---- the whole stream --------------------------------------------------------------------------------


def stream_converted(ck: Checkpoint, to: str, meta: bool = False, dtype=None,
                     journal: Journal | None = None, reader: TensorReader | None = None,
                     lazy: bool = False, prefetch: int = 0, host: bool = False,
                     skip: frozenset = frozenset()) -> Iterator[Item]:
    """Every tensor of `ck` in scheme `to`, checked against the config on the way through `hf`.

    `meta`: shapes and dtypes only (the plan). `lazy`: tensors that pass through unchanged keep pointing at
    their bytes on disk (`item.entry`), for a writer that copies file to file. `prefetch`: read up to that
    many of the next unchanged tensors on threads while the consumer handles the current one.
    `dtype`: cast floating-point weights (a name or torch dtype). `host`: HostTensors instead of torch tensors
    (no torch import; a given `reader` decides this). `skip`: source tensors to leave unread (they flow as meta
    tensors; a resumed write has what they feed on disk already)."""
    journal = journal if journal is not None else Journal()
    target = get_scheme(to)
    own_reader = reader is None
    reader = reader or TensorReader(host=host)
    try:
        items = read_items(ck, reader, meta, skip)
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


def iter_tensors(ck: Checkpoint, to: str = "hf", meta: bool = False, prefetch: int = 4
                 ) -> Iterator[tuple[str, object]]:
    """Stream `(name, tensor)` of `ck` in scheme `to` as torch tensors, converting on the fly (one tensor or group
    at a time); the next `prefetch` tensors are read on threads meanwhile."""
    for item in stream_converted(ck, to=to, meta=meta, prefetch=prefetch):
        yield item.name, item.tensor
