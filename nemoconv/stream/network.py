"""Stage 3 of the stream: the canonical (`hf`) network, checked against config.json."""

from __future__ import annotations

from typing import Iterable, Iterator

from nemoconv.errors import NemoconvError
from nemoconv.schemes.scales import KV_SCALES, SCALE_SUFFIXES
from nemoconv.storage.config import ModelSpec
from nemoconv.storage.safetensors_io import FP8_NAMES
from nemoconv.stream.items import Item

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
        kv_scale_on_mixer = suffix in KV_SCALES and (module + ".k_proj.weight") in self.expected
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
