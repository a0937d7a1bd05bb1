"""Build the hybrid model from a stream of (HF name, tensor) pairs, one tensor in memory at a time.

The model is first built on the meta device (no memory); each arriving tensor is checked against the
parameter it fills (name, shape), moved to the target device, cast, and put in place. At the end
every parameter must have been filled exactly once. Dtypes:
  - floating weights → the requested dtype;
  - A_log, D, dt_bias and the router's e_score_correction_bias → float32 (tiny, precision-critical);
  - float8_e4m3fn linear weights stay FP8, with their `weight_scale` / `input_scale` as float32 0-d.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from nemoconv.errors import NemoconvError
from nemoconv.model.attention import Attention
from nemoconv.model.fp8 import FP8_DTYPE, Linear
from nemoconv.model.modeling import NemotronHLM
from nemoconv.schemes import get_scheme
from nemoconv.schemes.scales import KV_SCALES, LINEAR_SCALES
from nemoconv.storage.config import ModelSpec

# KV-cache quantization scales (ModelOpt writes them beside k_proj / v_proj; some tools on the attention
# module itself). They go to the attention module, whose keys/values then pass through FP8 (attention.Attention).


def canonical_name(name: str) -> str:
    """Accept the spellings readers must accept (docs/DESIGN.md §1: `model.` prefix, singular `embedding`), as
    mappings/hf.toml's aliases spell them."""
    return get_scheme("hf").normalize(name)


def _dtype(value, device: torch.device) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if value not in names:
        raise NemoconvError(f"unsupported dtype {value!r} (use float32, bfloat16 or float16)")
    return names[value]


def _set_kv_scale(model: NemotronHLM, attn_name: str, leaf: str, tensor: torch.Tensor, device) -> str | None:
    """Put a KV-cache scale on its attention module; why not, if it cannot be used."""
    try:
        attn = model.get_submodule(attn_name)
    except AttributeError:
        attn = None
    if not isinstance(attn, Attention):
        return "not beside an attention layer the model has"
    if tensor.numel() != 1 or not tensor.is_floating_point():
        return f"a KV-cache scale must be one float, got shape {list(tensor.shape)} {tensor.dtype}"
    value = tensor.detach().reshape(()).to(device, torch.float32)
    if not (torch.isfinite(value) and value > 0):
        return f"a KV-cache scale must be finite and positive, got {float(value)!r}"
    setattr(attn, leaf, value)
    return None


def _summary(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def build_model(spec: ModelSpec, tensors: Iterable[tuple[str, torch.Tensor]], device="cpu",
                dtype: torch.dtype | str | None = torch.float32) -> NemotronHLM:
    """The hybrid model with the given tensors (canonical HF names; `model.` prefix accepted).

    `mtp.*` tensors are skipped: the multi-token-prediction heads are not run. Raises NemoconvError
    naming any missing, unexpected, duplicated or misshapen tensor.
    """
    device = torch.device(device)
    dtype = _dtype(dtype, device)
    with torch.device("meta"):
        model = NemotronHLM(spec)
    filling = _Filling(model, device, dtype)
    for raw_name, tensor in tensors:
        filling.put(raw_name, tensor)
    filling.finish()
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()


class _Filling:
    """The parameters of a model built on the meta device, filled one arriving tensor at a time."""

    def __init__(self, model: NemotronHLM, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.tied = model.spec.tie_word_embeddings
        self.slots: dict[str, tuple[nn.Module, str]] = {}    # parameter name → (module, attribute)
        for module_name, module in model.named_modules():
            for leaf, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{leaf}" if module_name else leaf
                if not (self.tied and name == "lm_head.weight"):
                    self.slots[name] = (module, leaf)
        self.filled: set[str] = set()
        self.unexpected: list[str] = []
        self.problems: list[str] = []
        self.scales: dict[str, dict[str, torch.Tensor]] = {}  # linear module name → {weight_scale, input_scale}

    def put(self, raw_name: str, tensor: torch.Tensor) -> None:
        name = canonical_name(raw_name)
        if name.startswith("mtp."):
            return  # MTP heads are not run
        if self.tied and name == "lm_head.weight":
            return  # tied: the output projection is the embedding matrix, whatever copy a file holds
        module_name, _, leaf = name.rpartition(".")
        if leaf in LINEAR_SCALES or leaf in KV_SCALES:
            self._put_scale(raw_name, module_name, leaf, tensor)
            return
        slot = self.slots.get(name)
        if slot is None:
            self.unexpected.append(raw_name)
            return
        if name in self.filled:
            self.problems.append(f"{raw_name} given twice")
            return
        module, attr = slot
        target_dtype = self._target_dtype(raw_name, module, attr, tensor)
        if target_dtype is not None:
            value = tensor.detach().to(device=self.device, dtype=target_dtype).contiguous()
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
            self.filled.add(name)

    def _target_dtype(self, raw_name: str, module: nn.Module, attr: str, tensor: torch.Tensor) -> torch.dtype | None:
        """The dtype the tensor is stored in, or None (and a problem noted) when it does not fit."""
        expected = tuple(getattr(module, attr).shape)
        if tuple(tensor.shape) != expected:
            self.problems.append(f"{raw_name} has shape {tuple(tensor.shape)}, expected {expected}")
            return None
        if tensor.dtype == FP8_DTYPE:
            if not (isinstance(module, Linear) and attr == "weight"):
                self.problems.append(f"{raw_name} is float8_e4m3fn, but only linear weights may be FP8")
                return None
            return FP8_DTYPE
        if not tensor.is_floating_point():
            self.problems.append(f"{raw_name} has non-floating dtype {tensor.dtype}")
            return None
        return torch.float32 if attr in getattr(module, "fp32_params", ()) else self.dtype

    def _put_scale(self, raw_name: str, module_name: str, leaf: str, tensor: torch.Tensor) -> None:
        """An FP8 linear's weight/input scale (set in `finish`, once the weight's dtype is known), or a
        KV-cache scale (set on its attention module now)."""
        if leaf in KV_SCALES and module_name.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "mixer"):
            attn = module_name if module_name.endswith(".mixer") else module_name.rsplit(".", 1)[0]
            kv_problem = _set_kv_scale(self.model, attn, leaf, tensor, self.device)
            if kv_problem:
                self.problems.append(f"{raw_name}: {kv_problem}")
            return
        target = self.slots.get(f"{module_name}.weight")
        if target is None or not isinstance(target[0], Linear) or tensor.numel() != 1:
            self.unexpected.append(raw_name)
            return
        self.scales.setdefault(module_name, {})[leaf] = tensor.detach().reshape(()).to(self.device, torch.float32)

    def finish(self) -> None:
        """Set the FP8 scales; raise naming everything missing, unexpected or wrong."""
        problems, model = self.problems, self.model
        missing = sorted(set(self.slots) - self.filled)
        for module_name, given in self.scales.items():
            linear = model.get_submodule(module_name)
            if linear.weight.dtype != FP8_DTYPE:
                problems.append(f"{module_name} has {'/'.join(sorted(given))} but its weight is not float8_e4m3fn")
                continue
            for leaf, value in given.items():
                setattr(linear, leaf, value)
        for module_name, module in model.named_modules():
            if isinstance(module, Linear) and module.weight.dtype == FP8_DTYPE:
                lacking = [s for s in LINEAR_SCALES if getattr(module, s) is None]
                if lacking:
                    missing += [f"{module_name}.{s}" for s in lacking]
        if self.unexpected:
            problems.insert(0, f"unexpected tensor(s): {_summary(self.unexpected)}")
        if missing:
            problems.insert(0, f"missing tensor(s): {_summary(missing)}")
        if problems:
            raise NemoconvError("cannot build the model: " + "; ".join(problems))


def load_model(path, device="cpu", dtype: torch.dtype | str | None = torch.float32) -> NemotronHLM:
    """The built-in hybrid model for a checkpoint of any scheme (hf, nemo, max; FP8 too)."""
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.stream.pipeline import iter_tensors

    ck = open_checkpoint(path)
    return build_model(ck.spec, iter_tensors(ck, to="hf"), device=device, dtype=dtype)
