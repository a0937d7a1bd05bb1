"""The tensor primitives of the stream: the only code that knows torch tensors from HostTensors (numpy bits).

Each works on a meta tensor too (shapes only: the plan), on a HostTensor (convert, no torch import) and on a
torch tensor (model loading, quantize)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from nemoconv.storage.safetensors_io import (
    ChunkedEntry,
    HostTensor,
    RowsEntry,
    TensorEntry,
    bits_dtype,
    torch_dtype,
)
from nemoconv.stream.items import Item


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


def _reshaped_entry(entry: TensorEntry, shape: tuple) -> TensorEntry:
    """`entry` with another shape of the same size (one per expert: a plain entry is built directly, since
    dataclasses.replace is slow)."""
    if type(entry) is TensorEntry:
        return TensorEntry(entry.name, entry.file, entry.dtype_name, shape, entry.start, entry.nbytes)
    return replace(entry, shape=shape)


def _stacked_on_disk(name: str, parts: list[Item]) -> Item:
    """Experts stacked without a transpose are their bytes in sequence: an entry over the parts' byte ranges,
    copied file to file by the writer (or read when a transform needs the values)."""
    entries = [_reshaped_entry(p.entry, (1, *p.entry.shape)) for p in parts]
    return _rows_in_sequence(name, parts, entries, [1] * len(parts))


def _rows_in_sequence(name: str, parts: list[Item], entries: list[TensorEntry], rows: list[int]) -> Item:
    """The parts' byte runs one after the other, as one tensor whose leading axis has sum(rows) rows (entries[j],
    rows[j] of them, holds part j's bytes): an entry copied file to file by the writer, never read unless a
    transform needs the values."""
    first = parts[0]
    rest = tuple(entries[0].shape[1:])
    shape = (sum(rows), *rest)
    zeros = (0,) * len(rest)
    pieces = tuple(((r, *zeros), e) for r, e in zip(itertools.accumulate(rows, initial=0), entries))
    nbytes = sum(e.nbytes for e in entries)
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


def _rows_on_disk(parts: list) -> bool:
    """Parts whose rows can be cut or joined as runs of bytes: on disk, each one stored run (not chunked)."""
    return _on_disk(parts) and not any(isinstance(p.entry, ChunkedEntry) for p in parts)


def _split_on_disk(item: Item, names: list[str], sizes: list[int]) -> list[Item]:
    """Parts along axis 0 of a tensor still on disk: rows are contiguous, so each part is a run of its bytes."""
    shape, entry = tuple(item.tensor.shape), item.entry
    row = entry.nbytes // shape[0] if shape[0] else 0
    parts, start = [], entry.start
    for name, rows in zip(names, sizes):
        part = RowsEntry(name, entry.file, entry.dtype_name, (rows, *shape[1:]), start, rows * row)
        parts.append(Item(name, _meta_like(item.tensor, part.shape), item.sources, entry=part, reader=item.reader))
        start += rows * row
    return parts


def _joined_on_disk(name: str, parts: list[Item]) -> Item:
    """Parts along axis 0 still on disk, joined: their byte runs in sequence."""
    return _rows_in_sequence(name, parts, [p.entry for p in parts], [p.tensor.shape[0] for p in parts])


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



def _same_bits(a, b) -> bool:
    if _is_host(a):
        return a.bits.shape == b.bits.shape and bool((a.bits == b.bits).all())
    import torch

    bits = getattr(torch, _SAME_SIZE_INT[a.element_size()])
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits))
