"""What flows through the tensor stream: `Item` (one tensor, maybe still on disk) and the `Journal` of lossy
steps."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nemoconv.schemes.scales import SCALE_SUFFIXES  # noqa: F401 - re-exported with the items
from nemoconv.storage.safetensors_io import TensorEntry, TensorReader, dtype_name

# The stages run on torch tensors (model loading, quantize) or, with `host=True`, on HostTensors (numpy bits,
# no torch import: what `nemoconv convert` uses). Only the few primitives of `tensor_ops` (_cat, _split_along,
# _stack, _unstack_all, _convert_dtype) look at which; every mapping decision is made once, by dtype name.


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

    def renamed(self, name: str) -> "Item":
        """A copy under another name: every tensor is renamed twice or more, and dataclasses.replace costs ~10x."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.name = name
        return new

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

