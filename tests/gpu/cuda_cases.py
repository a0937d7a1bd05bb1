"""What the GPU tests share: when they can run, and the small real-shaped models they run.

test_cuda_model's model (`build`, `inputs`): hidden 512, 16 Mamba heads of 64 with 4 groups, chunk 64, GQA
attention, a grouped-routing MoE; prompts of 300 tokens so the chunked scan crosses several chunks.
test_fast_path's models (`MODELS`, `build_case`): a dense and a MoE layout of the same sizes.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

# Triton's fp32 dot products default to TF32; the float32 comparisons want IEEE products, so that they
# measure the kernels' arithmetic and not TF32's 10-bit mantissa (read when the kernels compile).
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from nemoconv.data.demo_checkpoint import random_tensors, tiny_config  # noqa: E402
from nemoconv.model import build_model  # noqa: E402
from nemoconv.model.cuda import kernels  # noqa: E402
from nemoconv.model.fp8 import quantize_fp8  # noqa: E402
from nemoconv.storage.config import parse_config  # noqa: E402

DEVICE = "cuda"


CONFIG = dict(
    hybrid_override_pattern="M*EM-ME*M", vocab_size=1024, hidden_size=512,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
    mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=4, chunk_size=64,
    n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
    moe_shared_expert_intermediate_size=512, n_group=4, topk_group=2, routed_scaling_factor=2.5,
)
BATCH, SEQ, PAD = 2, 300, 37   # row 1 is left-padded by PAD tokens
DEVICE = "cuda"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if kernels.triton_kernels() is None:
        return "mamba-ssm's Triton kernels are not importable: " + kernels._triton_error[0]
    return None


@lru_cache(maxsize=None)
def spec_and_tensors():
    spec = parse_config(tiny_config("moe", **CONFIG))
    # trained-like weights: experts share most of their weights, so a router choice that differs between
    # devices at a near-tie (fp32 summation order) moves the output a little instead of re-routing the row
    return spec, random_tensors(spec, seed=0, trained_like=True)


def build(device: str, dtype: torch.dtype):
    spec, tensors = spec_and_tensors()
    return build_model(spec, tensors.items(), device=device, dtype=dtype)


def inputs():
    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return ids.masked_fill(mask == 0, 0), mask


MODELS = {
    # dense, like Nemotron-H-8B: Mamba, MLP and attention layers
    "dense": dict(hybrid_override_pattern="M-M*-M-M-", vocab_size=1024, hidden_size=512,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                  mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=4, chunk_size=64),
    # MoE with grouped routing, like Nemotron 3 Nano
    "moe": dict(hybrid_override_pattern="M*EM-ME*M", vocab_size=1024, hidden_size=512,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64, n_groups=4, chunk_size=64,
                n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                moe_shared_expert_intermediate_size=512, n_group=4, topk_group=2, routed_scaling_factor=2.5),
}
PROMPT = 70


@lru_cache(maxsize=None)
def case_spec_and_tensors(kind: str, fp8: bool = False):
    spec = parse_config(tiny_config("moe" if kind == "moe" else "dense", **MODELS[kind]))
    tensors = random_tensors(spec, seed=0)
    if fp8:
        fp8_default_preset(spec, tensors)
    return spec, tensors


def fp8_default_preset(spec, tensors: dict) -> list[str]:
    """Make the default preset's linears (Mamba in/out, MLP up/down) per-tensor static FP8 in `tensors`, in
    place; returns their module names."""
    targets = []
    for i, code in enumerate(spec.layer_codes):
        for leaf in {"M": ("in_proj", "out_proj"), "-": ("up_proj", "down_proj")}.get(code, ()):
            key = f"backbone.layers.{i}.mixer.{leaf}"
            w = tensors[f"{key}.weight"]
            scale = (w.abs().max() / 448).float()
            tensors[f"{key}.weight"] = quantize_fp8(w, scale)
            tensors[f"{key}.weight_scale"] = scale
            tensors[f"{key}.input_scale"] = torch.tensor(8.0 / 448)
            targets.append(key)
    return targets


def build_case(kind: str, dtype: torch.dtype, fp8: bool = False):
    """test_fast_path's models (MODELS), on the GPU."""
    spec, tensors = case_spec_and_tensors(kind, fp8)
    return build_model(spec, tensors.items(), device=DEVICE, dtype=dtype)
