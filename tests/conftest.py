"""Shared fixtures: tiny Nemotron-H checkpoints built in the test run (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemoconv.data.demo_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny_dir(kind, dtype=..., **config overrides) → a cached checkpoint directory."""
    cache: dict = {}

    def make(kind: str = "moe", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
        key = (kind, dtype, seed, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            cache[key] = write_tiny_checkpoint(d / "ckpt", kind, dtype=dtype, seed=seed, **overrides)
        return cache[key]

    return make


def transformers_checkpoint(directory: Path, kind: str = "moe", dtype=torch.float32, seed: int = 0,
                            max_shard_size=None, **overrides) -> Path:
    """A real HF checkpoint written by transformers' NemotronHForCausalLM.save_pretrained."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    from nemoconv.data.demo_checkpoint import tiny_config

    cfg = tiny_config(kind, **overrides)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    cfg.pop("torch_dtype", None)
    config = transformers.NemotronHConfig(**cfg)
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(config).to(dtype)
    with torch.no_grad():  # transformers' init leaves some tensors constant: randomize everything
        for name, p in model.named_parameters():
            if "A_log" in name:
                p.copy_(torch.log(torch.empty_like(p, dtype=torch.float32).uniform_(1, 16)))
            elif "norm" in name or name.endswith(".D"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn_like(b))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """Factory for transformers-written checkpoints (cached per arguments)."""
    cache: dict = {}

    def make(kind: str = "moe", dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
        key = (kind, dtype, max_shard_size, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"hf-{kind}")
            cache[key] = transformers_checkpoint(d / "ckpt", kind, dtype, max_shard_size=max_shard_size, **overrides)
        return cache[key]

    return make
