"""The plan of an output: the tensor stream run on meta tensors (names, shapes, dtypes, lossy steps; every
error raised before a byte is written), proven to account for every source tensor, and the part of the
manifest that convert and quantize share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from nemoconv.checkpoint.local import Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.storage.safetensors_io import PlannedTensor, dtype_name
from nemoconv.stream.items import Item, Journal
from nemoconv.stream.pipeline import stream_converted
from nemoconv.version import __version__


@dataclass
class TensorPlan:
    """The output tensors in write order (meta items: name, shape, dtype, sources) and what the stream did."""

    items: list[Item]
    journal: Journal

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.items]

    def planned(self) -> list[PlannedTensor]:
        return [PlannedTensor(i.name, i.tensor.dtype, tuple(i.tensor.shape)) for i in self.items]

    @property
    def bytes_out(self) -> int:
        return sum(p.nbytes for p in self.planned())

    def entries(self) -> list[dict]:
        """The manifest's `tensors`: name, dtype, shape, sources, and the cast that made the dtype."""
        entries = []
        for item in self.items:
            entry = {"name": item.name, "dtype": dtype_name(item.tensor.dtype), "shape": list(item.tensor.shape),
                     "sources": list(item.sources)}
            if item.cast_from:
                entry["cast_from"] = item.cast_from
            entries.append(entry)
        return entries


def accounted_plan(ck: Checkpoint, items: Iterable[Item], journal: Journal) -> TensorPlan:
    """The plan of a meta stream, once proven: no output name twice, and every source tensor written or dropped."""
    items = list(items)
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise NemoconvError(f"internal mapping error: two tensors would be written as {dup!r}")
    consumed = {s for i in items for s in i.sources}
    dropped = {step["tensor"] for step in journal.lossy if step["step"] == "drop"}
    rules = ck.scheme_rules
    left = [n for n in ck.entries if n not in consumed and rules.to_hf(rules.normalize(n), ck.spec) not in dropped]
    if left:
        raise NemoconvError(f"internal error: source tensor {left[0]!r} was neither written nor dropped")
    return TensorPlan(items, journal)


def plan_conversion(ck: Checkpoint, to: str, dtype: str | None) -> TensorPlan:
    """Run the whole conversion on meta tensors: every check and every lossy step, no data read."""
    journal = Journal()
    items = stream_converted(ck, to=to, meta=True, dtype=dtype, journal=journal, host=True)
    return accounted_plan(ck, items, journal)


def mtp_warning(ck: Checkpoint) -> str | None:
    """Why a config that declares MTP layers without their weights matters (transformers' save_pretrained
    writes exactly that: num_nextn_predict_layers kept, the mtp.* tensors dropped); None when all is well."""
    declared = ck.spec.num_mtp_layers
    if not declared or any("mtp" in name for name in ck.entries):
        return None
    return (f"config.json declares {declared} MTP layer(s) (num_nextn_predict_layers) but the checkpoint holds no "
            f"MTP weights (as transformers' save_pretrained writes it): MTP speculative decoding cannot run from it")


def manifest_head(src, ck: Checkpoint, to: str, dtype: str, plan: TensorPlan, lossy: list[dict],
                  files_carried: list[str], files_not_carried: dict, tensors: list[dict]) -> dict:
    """The fields every nemoconv manifest starts with, in their order (the command adds its own after them)."""
    return {
        "tool": "nemoconv",
        "version": __version__,
        "source": str(src),
        "scheme_from": ck.scheme,
        "scheme_to": to,
        "dtype": dtype,
        "lossless": not lossy,
        "lossy_steps": lossy,
        "tensors_in": len(ck.entries),
        "tensors_out": len(plan.items),
        "bytes_in": ck.total_bytes,
        "bytes_out": plan.bytes_out,
        "files_carried": files_carried,
        "files_not_carried": files_not_carried,
        "tensors": tensors,
    }
