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
from nemoconv.model.fp8 import FP8_DTYPE, Linear
from nemoconv.model.modeling import NemotronHLM
from nemoconv.storage.config import ModelSpec

_SCALES = ("weight_scale", "input_scale")
# KV-cache quantization scales (ModelOpt writes them beside k_proj / v_proj; some tools on the attention
# module itself). They go to the attention module, whose keys/values then pass through FP8 (modeling.Attention).
_KV_SCALES = ("k_scale", "v_scale")


def canonical_name(name: str) -> str:
    """Accept the spellings readers must accept (DESIGN.md §1): `model.` prefix, singular `embedding`."""
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    if name == "backbone.embedding.weight":
        name = "backbone.embeddings.weight"
    return name


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
    from nemoconv.model.modeling import Attention

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
    tied = spec.tie_word_embeddings
    slots: dict[str, tuple[nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if not (tied and name == "lm_head.weight"):
                slots[name] = (module, leaf)

    filled: set[str] = set()
    unexpected: list[str] = []
    problems: list[str] = []
    scales: dict[str, dict[str, torch.Tensor]] = {}   # linear module name → {weight_scale, input_scale}
    for raw_name, tensor in tensors:
        name = canonical_name(raw_name)
        if name.startswith("mtp."):
            continue  # MTP heads are not run
        if tied and name == "lm_head.weight":
            continue  # tied: the output projection is the embedding matrix, whatever copy a file holds
        module_name, _, leaf = name.rpartition(".")
        if leaf in _SCALES or leaf in _KV_SCALES:
            if leaf in _KV_SCALES and module_name.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "mixer"):
                attn = module_name if module_name.endswith(".mixer") else module_name.rsplit(".", 1)[0]
                kv_problem = _set_kv_scale(model, attn, leaf, tensor, device)
                if kv_problem:
                    problems.append(f"{raw_name}: {kv_problem}")
                continue
            target = slots.get(f"{module_name}.weight")
            if target is None or not isinstance(target[0], Linear) or tensor.numel() != 1:
                unexpected.append(raw_name)
                continue
            scales.setdefault(module_name, {})[leaf] = tensor.detach().reshape(()).to(device, torch.float32)
            continue
        slot = slots.get(name)
        if slot is None:
            unexpected.append(raw_name)
            continue
        if name in filled:
            problems.append(f"{raw_name} given twice")
            continue
        module, attr = slot
        expected = tuple(getattr(module, attr).shape)
        if tuple(tensor.shape) != expected:
            problems.append(f"{raw_name} has shape {tuple(tensor.shape)}, expected {expected}")
            continue
        if tensor.dtype == FP8_DTYPE:
            if not (isinstance(module, Linear) and attr == "weight"):
                problems.append(f"{raw_name} is float8_e4m3fn, but only linear weights may be FP8")
                continue
            target_dtype = FP8_DTYPE
        elif not tensor.is_floating_point():
            problems.append(f"{raw_name} has non-floating dtype {tensor.dtype}")
            continue
        else:
            target_dtype = torch.float32 if attr in getattr(module, "fp32_params", ()) else dtype
        value = tensor.detach().to(device=device, dtype=target_dtype).contiguous()
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
        filled.add(name)

    missing = sorted(set(slots) - filled)
    for module_name, given in scales.items():
        linear = model.get_submodule(module_name)
        if linear.weight.dtype != FP8_DTYPE:
            problems.append(f"{module_name} has {'/'.join(sorted(given))} but its weight is not float8_e4m3fn")
            continue
        for leaf, value in given.items():
            setattr(linear, leaf, value)
    for module_name, module in model.named_modules():
        if isinstance(module, Linear) and module.weight.dtype == FP8_DTYPE:
            lacking = [s for s in _SCALES if getattr(module, s) is None]
            if lacking:
                missing += [f"{module_name}.{s}" for s in lacking]
    if unexpected:
        problems.insert(0, f"unexpected tensor(s): {_summary(unexpected)}")
    if missing:
        problems.insert(0, f"missing tensor(s): {_summary(missing)}")
    if problems:
        raise NemoconvError("cannot build the model: " + "; ".join(problems))

    if tied:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.eval()


def load_model(path, device="cpu", dtype: torch.dtype | str | None = torch.float32) -> NemotronHLM:
    """The built-in hybrid model for a checkpoint of any scheme (hf, nemo, max; FP8 too)."""
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.stream.pipeline import iter_tensors

    ck = open_checkpoint(path)
    return build_model(ck.spec, iter_tensors(ck, to="hf"), device=device, dtype=dtype)
