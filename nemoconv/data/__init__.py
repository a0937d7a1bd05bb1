"""Data that ships with nemoconv: a small trained Nemotron-H (tools/train_tiny_model.py made it).

    tiny-trained/model/                      the checkpoint (HF layout, bf16, its own BPE tokenizer)
    tiny-trained/heldout_tokens.safetensors  `tokens` (int32): ids from files kept out of its training
    tiny-trained/train_results.json          how it was trained (steps, tokens, losses, versions)
    tiny-trained/README.md                   what it is and what was measured on it
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TINY_TRAINED = Path(__file__).parent / "tiny-trained"


def tiny_trained_checkpoint() -> Path:
    """The shipped trained checkpoint's directory (read-only: copy it before changing anything)."""
    return TINY_TRAINED / "model"


def heldout_tokens(path: Path | None = None) -> torch.Tensor:
    """The held-out ids (int64) of the shipped model, or of a `heldout_tokens.safetensors` at `path`."""
    from safetensors.torch import load_file

    return load_file(str(path or TINY_TRAINED / "heldout_tokens.safetensors"))["tokens"].long()


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, window: int = 256, max_tokens: int | None = None,
                 batch: int = 8) -> float:
    """Mean next-token loss (nats) of a built-in model over consecutive `window`-token slices of `tokens`."""
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    windows = tokens[: tokens.numel() // window * window].view(-1, window)
    if windows.numel() == 0:
        raise ValueError(f"need at least {window} tokens, got {tokens.numel()}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for rows in windows.split(batch):
        x = rows.to(device)
        logits = model(x).float()
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss)
