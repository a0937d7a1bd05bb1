"""The tensor stream: source scheme → canonical `hf` (checked against the config) → target scheme.

Every stage is a generator over `Item`s, so memory holds one tensor at a time, or one group (a MoE
layer's experts, an attention layer's q/k/v) while it is merged or fused. Run on `meta` tensors the same
stages make the plan: names, shapes, dtypes and every lossy step are known, and every error is raised,
before a single byte is written. Each stage ends by proving that it consumed every input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import torch

from .checkpoint import Checkpoint
from .config import ModelSpec
from .errors import NemoconvError
from .mapping import Scheme, config_product, get_scheme
from .safetensors_io import TensorEntry, TensorReader, dtype_name

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale", "weight_scale_2", "output_scale")


@dataclass
class Item:
    name: str
    tensor: torch.Tensor  # the data, or a meta tensor (shape and dtype) while `entry` is still unread
    sources: tuple[str, ...]
    cast_from: dict | None = None  # {"dtype": original, "by": "scheme"|"dtype"} when this stream cast it
    entry: TensorEntry | None = None  # bytes still on disk: read only if a transform needs them
    reader: TensorReader | None = None

    def data(self) -> torch.Tensor:
        """The values (read now if still on disk); a meta tensor while planning."""
        if self.entry is not None and self.reader is not None:
            return self.reader.read(self.entry)
        return self.tensor

    def with_tensor(self, tensor: torch.Tensor, **changes) -> "Item":
        return replace(self, tensor=tensor, entry=None, reader=None, **changes)


@dataclass
class Journal:
    """What the stream did that a user must know: lossy steps (and the casts that lost nothing)."""

    lossy: list[dict] = field(default_factory=list)

    def lossy_step(self, tensor: str, step: str, detail: str) -> None:
        self.lossy.append({"tensor": tensor, "step": step, "detail": detail})


def is_lossless_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    if src == dst:
        return True
    widening = {
        torch.bfloat16: {torch.float32, torch.float64},
        torch.float16: {torch.float32, torch.float64},
        torch.float32: {torch.float64},
        torch.float8_e4m3fn: {torch.float16, torch.bfloat16, torch.float32, torch.float64},
        torch.float8_e5m2: {torch.float16, torch.bfloat16, torch.float32, torch.float64},
    }
    return dst in widening.get(src, set())


def _cat(parts: list[torch.Tensor], axis: int) -> torch.Tensor:
    if parts[0].is_meta:  # planning: shapes only (torch.cat on meta pulls in the slow prims machinery)
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        return torch.empty(shape, dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, dim=axis)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _stack(parts: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """[E] tensors of [a, b] → [E, b, a] when transposing (expert merge), else [E, a, b].

    Copies raw bits through a same-size integer view: exact for every dtype (fp8 included), and torch's
    integer transpose copy is several times faster than its bf16 one on CPU."""
    first = parts[0]
    shape = (len(parts), *(first.shape[::-1] if transpose else first.shape))
    if first.is_meta:
        return torch.empty(shape, dtype=first.dtype, device="meta")
    bits = _SAME_SIZE_INT[first.element_size()]
    out = torch.empty(shape, dtype=bits)
    for j, p in enumerate(parts):
        out[j].copy_(p.view(bits).T if transpose else p.view(bits))
    return out.view(first.dtype)


def _unstack(t: torch.Tensor, j: int, transpose: bool) -> torch.Tensor:
    if t.is_meta:
        return torch.empty(t.shape[1:][::-1] if transpose else t.shape[1:], dtype=t.dtype, device="meta")
    bits = _SAME_SIZE_INT[t.element_size()]
    piece = t[j].view(bits)
    return (piece.T if transpose else piece).contiguous().view(t.dtype)


def _cast(item: Item, dtype: torch.dtype, by: str, journal: Journal, why: str) -> Item:
    src = item.tensor.dtype
    if src == dtype:
        return item
    # A restore undoes an earlier widening cast, so the values fit the original dtype exactly.
    if by != "restore" and not is_lossless_cast(src, dtype):
        journal.lossy_step(item.name, "cast", f"{dtype_name(src)} → {dtype_name(dtype)} ({why})")
    return item.with_tensor(item.data().to(dtype), cast_from={"dtype": dtype_name(src), "by": by})


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
        yield Item(normalized, entry.meta(), (name,), entry=entry, reader=None if meta else reader)


# ---- stage 2: source scheme → hf -----------------------------------------------------------------


def _restore_dtypes(ck: Checkpoint) -> dict[str, str]:
    """Dtypes a previous nemoconv conversion changed by scheme rule, to undo them on the way back."""
    restore = {}
    for t in (ck.manifest or {}).get("tensors", []):
        cast = t.get("cast_from")
        if cast and cast.get("by") == "scheme":
            restore[t["name"]] = cast["dtype"]
    return restore


def to_hf(items: Iterable[Item], scheme: Scheme, spec: ModelSpec, restore: dict[str, str], journal: Journal
          ) -> Iterator[Item]:
    dtypes = {dtype_name(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
    for item in items:
        hf_name = scheme.to_hf(item.name)
        if hf_name is None:
            raise NemoconvError(f"unknown tensor {item.name!r}: no rule of the {scheme.name} scheme names it")
        original = restore.get(item.name)
        pieces = _split(hf_name, item, scheme, spec)
        for piece in pieces:
            if original is not None and original in dtypes and scheme.cast_for(hf_name) is not None:
                piece = _cast(piece, dtypes[original], "restore", journal, "restoring the source dtype")
                piece.cast_from = None
            yield piece


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
        t = item.data()
        return [Item(merge.hf.format({**fields, "j": str(j)}), _unstack(t, j, merge.transpose), item.sources)
                for j in range(count)]
    for fuse in scheme.fuses:
        fields = fuse.to.match(hf_name)
        if fields is None:
            continue
        sizes = [config_product(s, spec) for s in fuse.sizes]
        if t.shape[fuse.axis] != sum(sizes):
            raise NemoconvError(
                f"{item.name}: fused tensor has {t.shape[fuse.axis]} rows, config implies {sum(sizes)} ({sizes})"
            )
        return [Item(tpl.format(fields), piece.contiguous(), item.sources)
                for tpl, piece in zip(fuse.hf, torch.split(item.data(), sizes, dim=fuse.axis))]
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
        if item.tensor.dtype in FP8_DTYPES:
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

    def __init__(self, scheme: Scheme, spec: ModelSpec, journal: Journal, dtype: torch.dtype | None):
        self.scheme, self.spec, self.journal, self.dtype = scheme, spec, journal, dtype
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
        for m_idx, merge in enumerate(self.scheme.merges):
            fields = merge.hf.match(item.name)
            if fields is None:
                continue
            if item.tensor.dtype in FP8_DTYPES and not self.scheme.fp8_experts:
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
                parts = [buf[x].data() for x in range(count)]
                merged = Item(merge.to.format(fields), _stack(parts, merge.transpose),
                              tuple(s for x in range(count) for s in buf[x].sources))
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
        if fuse.unless_quantized and any(p.tensor.dtype in FP8_DTYPES for p in group):
            for p in group:  # FP8 projections stay separate, with their scales
                yield self._finish(p)
            return
        if len({p.tensor.dtype for p in parts}) != 1:
            raise NemoconvError(f"cannot fuse {[p.name for p in parts]}: their dtypes differ")
        yield self._finish(Item(fuse.to.format(fields), _cat([p.data() for p in parts], fuse.axis),
                                tuple(s for p in parts for s in p.sources)))
        for p in companions:
            yield self._finish(p)

    def _finish(self, item: Item) -> Item:
        is_scale = item.name.rpartition(".")[2] in SCALE_SUFFIXES
        if self.dtype is not None and item.tensor.is_floating_point() and not is_scale \
                and item.tensor.dtype not in FP8_DTYPES:
            item = _cast(item, self.dtype, "dtype", self.journal, "--dtype")
        forced = self.scheme.cast_for(item.name, item.tensor.dtype)
        if forced is not None and item.tensor.dtype not in FP8_DTYPES:
            item = _cast(item, forced, "scheme", self.journal, f"the {self.scheme.name} scheme stores it so")
        new_name = self.scheme.to_scheme(item.name)
        if new_name is None:
            raise NemoconvError(f"the {self.scheme.name} scheme has no name for {item.name!r}")
        return replace(item, name=new_name)


# ---- the whole stream --------------------------------------------------------------------------------


def stream_converted(ck: Checkpoint, to: str, meta: bool = False, dtype: torch.dtype | None = None,
                     journal: Journal | None = None, reader: TensorReader | None = None,
                     lazy: bool = False, prefetch: int = 0) -> Iterator[Item]:
    """Every tensor of `ck` in scheme `to`, checked against the config on the way through `hf`.

    `meta`: shapes and dtypes only (the plan). `lazy`: tensors that pass through unchanged keep pointing at
    their bytes on disk (`item.entry`), for a writer that copies file to file. `prefetch`: read up to that
    many of the next unchanged tensors on threads while the consumer handles the current one."""
    journal = journal if journal is not None else Journal()
    target = get_scheme(to)
    own_reader = reader is None
    reader = reader or TensorReader()
    try:
        items = read_items(ck, reader, meta)
        items = to_hf(items, ck.scheme_rules, ck.spec, _restore_dtypes(ck), journal)
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
