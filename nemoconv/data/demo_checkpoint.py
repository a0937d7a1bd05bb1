"""Tiny Nemotron-H checkpoints built from nothing (no download): the demo and the tests use them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemoconv.storage.config import parse_config
from nemoconv.storage.safetensors_io import write_single_file

PRESETS = {
    # Dense: Mamba, attention and MLP layers.
    "dense": {"hybrid_override_pattern": "M-M*-M-"},
    # MoE with grouped routing, like Nemotron 3 Nano.
    "moe": {"hybrid_override_pattern": "ME*EME", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
    # Latent MoE, like Nemotron 3 Super.
    "latent": {"hybrid_override_pattern": "ME*E", "moe_latent_size": 32, "n_group": 1, "topk_group": 1},
}


def tiny_config(kind: str = "moe", **overrides) -> dict:
    cfg = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": 256,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 96,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 2,
        "conv_kernel": 4,
        "use_conv_bias": True,
        "chunk_size": 16,
        "mamba_hidden_act": "silu",
        "mlp_hidden_act": "relu2",
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 48,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_limit": [0.0, float("inf")],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    cfg.update(PRESETS[kind])
    cfg.update(overrides)
    cfg["num_hidden_layers"] = len(cfg.get("hybrid_override_pattern") or cfg.get("layers_block_type"))
    return cfg


def random_tensors(spec, seed: int = 0, dtype: torch.dtype = torch.float32,
                   trained_like: bool = False) -> dict[str, torch.Tensor]:
    """Weights with realistic magnitudes, so logits and routing are non-degenerate.

    `trained_like`: condition the network like a trained one. Plain random networks are chaotic (1 % noise on
    one in_proj can drop a position's logit cosine to 0.33), which no FP8 quantizer can pass. Here each
    layer's update to the residual stream is small (output projections × 0.25), logits have a clear
    favourite (lm_head × 3 more), and routed experts share most of their weights (a common base plus 0.3 of
    their own deviation), so a routing flip moves the output a little, as in a trained MoE."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    expert_base: dict = {}
    for name, shape in {**spec.hf_shapes(), **spec.mtp_shapes()}.items():
        leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2] + ".weight"
        if name.endswith("A_log"):
            t = torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=g))
        elif name.endswith((".D",)) or leaf == "D":
            t = torch.empty(shape).uniform_(0.5, 1.5, generator=g)
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.empty(shape).uniform_(-6.9, -2.3, generator=g))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus of dt in [0.001, 0.1]
        elif "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=g) / fan_in**0.5
            if name.endswith("embeddings.weight"):
                t = torch.randn(shape, generator=g)
            elif name == "lm_head.weight":
                t = t * 4.0  # logits with a clear favourite, like a trained model's, not a flat distribution
        if trained_like:
            t = _condition(name, t, expert_base)
        out[name] = t.to(dtype).contiguous()
    return out


def _condition(name: str, t: torch.Tensor, expert_base: dict) -> torch.Tensor:
    import re

    if name.endswith(("out_proj.weight", "down_proj.weight", "o_proj.weight", "fc2_latent_proj.weight")):
        t = t * 0.25
    if name == "lm_head.weight":
        t = t * 3.0
    m = re.match(r"(.*\.experts)\.\d+\.(up_proj|down_proj)\.weight$", name)
    if m:
        first = expert_base.setdefault(m.groups(), t)
        t = first + 0.3 * (t - first)
    return t


def write_tiny_checkpoint(directory: str | Path, kind: str = "moe", dtype: torch.dtype = torch.float32,
                          seed: int = 0, trained_like: bool = False, **overrides) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(kind, **overrides)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    spec = parse_config(cfg)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_single_file(directory / "model.safetensors", random_tensors(spec, seed, dtype, trained_like), {"format": "pt"})
    return directory
