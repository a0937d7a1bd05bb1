"""Checkpoints on which nemoconv's nemo/max layouts are compared with NeMo AutoModel's and MAX's own adapters.

Deterministic (seeded), so a golden file made where MAX is installed can be checked anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemoconv.data.demo_checkpoint import write_tiny_checkpoint
from nemoconv.storage.safetensors_io import write_single_file

CASES = {
    "dense-fp32": dict(kind="dense", dtype=torch.float32),
    "moe-bf16": dict(kind="moe", dtype=torch.bfloat16),
    "moe-fp32-gate": dict(kind="moe", dtype=torch.float32),
    "latent-mtp-bf16": dict(kind="latent", dtype=torch.bfloat16, num_nextn_predict_layers=1,
                            mtp_hybrid_override_pattern="*E"),
    "fp8-bf16": dict(kind="moe", dtype=torch.bfloat16, fp8=True),
}

FP8_MODULES = ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
               "backbone.layers.2.mixer.q_proj", "backbone.layers.2.mixer.k_proj",
               "backbone.layers.2.mixer.v_proj", "backbone.layers.2.mixer.o_proj"]


def build_case(name: str, directory: Path) -> Path:
    args = dict(CASES[name])
    fp8 = args.pop("fp8", False)
    src = write_tiny_checkpoint(directory, seed=7, **args)
    if fp8:
        from safetensors.torch import load_file

        tensors = load_file(str(src / "model.safetensors"))
        add_fp8_weights(tensors, FP8_MODULES, input_scale=0.03125)
        tensors["backbone.layers.2.mixer.k_proj.k_scale"] = torch.tensor(1.0)
        tensors["backbone.layers.2.mixer.v_proj.v_scale"] = torch.tensor(1.0)
        write_single_file(src / "model.safetensors", dict(sorted(tensors.items())), {"format": "pt"})
    return src


def add_fp8_weights(tensors: dict[str, torch.Tensor], modules: list[str], input_scale: float) -> None:
    """Per-tensor E4M3 weights with 0-d float32 scales, as ModelOpt writes them (in place)."""
    from nemoconv.model.fp8 import quantize_fp8

    for m in modules:
        w = tensors[m + ".weight"].float()
        scale = (w.abs().amax() / 448.0).reshape(())
        tensors[m + ".weight"] = quantize_fp8(w, scale)
        tensors[m + ".weight_scale"] = scale
        tensors[m + ".input_scale"] = torch.tensor(input_scale)


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """name → [dtype, shape, sha256 of the bytes]."""
    import hashlib

    out = {}
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        out[k] = [str(t.dtype).removeprefix("torch."), list(t.shape), digest]
    return out


def save_golden(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
