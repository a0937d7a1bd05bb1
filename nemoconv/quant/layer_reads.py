"""How the layer-by-layer passes of quantize (calibration, the Fisher estimate, the exact sweep) read the source:
one layer's tensors in HF naming, page-locked for a GPU, the next layer read by a worker thread while the caller
runs this one, and, within one analysis, what fits of the layers kept on the GPU between its passes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.stream.pipeline import Item, Journal, to_hf


def read_hf(ck: Checkpoint, names: list[str], reader: TensorReader) -> list[tuple[str, torch.Tensor]]:
    """The named source tensors as (HF name, tensor), split or unstacked by the scheme's rules."""
    scheme = ck.scheme_rules
    items = (Item(scheme.normalize(n), ck.entries[n].meta(), (n,), entry=ck.entries[n], reader=reader)
             for n in names)
    return [(it.name, it.data()) for it in to_hf(items, scheme, ck.spec, {}, Journal())]


def layer_reader(device: torch.device) -> TensorReader:
    """The reader of the layer-by-layer passes: page-locked tensors for a GPU (copied to it several times
    faster than pageable ones)."""
    return TensorReader(pinned=device.type == "cuda")


# GPU memory a KeptLayers leaves free: the passes after calibration need room for their own work
# (the Fisher estimate's autograd graph, the sweep's streams), which the 8B measurements keep under 8 GB
KEEP_RESERVE_FRACTION = 0.25


class KeptLayers:
    """Layers' source tensors (and the final norm and output head, key "final") kept on the GPU between the
    passes of one analysis (calibration, the Fisher estimate, the exact sweep) as long as KEEP_RESERVE_FRACTION
    of the GPU's memory stays free: a later pass then builds those layers without reading or copying anything.
    A layer that does not fit is read again by each pass, so the analysis still runs in what calibration
    needs; it only uses memory that is free (an 8B on an H200: 14 GB kept, ~16 GB read instead of ~45). On a
    CPU nothing is kept (a read there is a copy from the page cache, no dearer than keeping it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        self.layers: dict[int | str, list[tuple[str, torch.Tensor]]] = {}   # layer index, or "final"
        self.bytes = 0

    def get(self, i: int | str):
        return self.layers.get(i)

    def keep(self, i: int | str, tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The tensors to build layer i from: on the GPU and kept when they fit, else as read."""
        if not self.enabled:
            return tensors
        size = sum(t.numel() * t.element_size() for _, t in tensors)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if free - size < KEEP_RESERVE_FRACTION * total:
                return tensors
        self.layers[i] = [(n, t.to(self.device)) for n, t in tensors]
        self.bytes += size
        return self.layers[i]

    def clear(self) -> None:
        self.layers.clear()
        self.bytes = 0


def read_ahead(ck: Checkpoint, index: dict, reader: TensorReader, layers,
               kept: KeptLayers | None = None) -> Iterator[tuple[int, list]]:
    """(i, layer i's HF tensors) for each i of `layers` in that order, the next layer to read read by a worker
    thread while the caller runs this one (so the disk and the device work at once; two layers are held).
    With `kept`, a kept layer comes from the GPU unread, and the others are offered to it."""
    order = list(layers)

    def submit(k: int):   # the read of the first layer from position k on that is not kept
        while k < len(order) and kept is not None and kept.get(order[k]) is not None:
            k += 1
        return (k, pool.submit(read_hf, ck, index.get(order[k], []), reader)) if k < len(order) else None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemoconv-read") as pool:
        pending = submit(0)
        for k, i in enumerate(order):
            if pending is None or pending[0] != k:
                yield i, kept.get(i)
                continue
            tensors = pending[1].result()
            pending = submit(k + 1)
            yield i, (kept.keep(i, tensors) if kept is not None else tensors)
            del tensors


__all__ = ["KEEP_RESERVE_FRACTION", "KeptLayers", "layer_reader", "read_ahead", "read_hf"]
