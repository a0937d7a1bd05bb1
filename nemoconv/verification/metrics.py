"""Logit comparison metrics for `verify`, computed in float64 and accumulated over prompts.

All metrics compare two logit tensors of the same positions, [T, V]: the reference's and the
candidate's. Work is done in chunks of positions so that a long prompt over a 131k vocabulary never
needs more than a few hundred MB of float64 at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_CHUNK_ELEMENTS = 1 << 24  # float64 elements per chunk (128 MB)


@dataclass
class LogitStats:
    """Running sums over positions; `summary()` turns them into the reported metrics."""

    positions: int = 0
    elements: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    cos_sum: float = 0.0
    cos_min: float = 1.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1_agree: int = 0
    max_abs_ref: float = 0.0   # largest |reference logit|: scale for relative tolerances
    nonfinite_ref: int = 0
    nonfinite_cand: int = 0

    def add(self, ref: torch.Tensor, cand: torch.Tensor) -> "LogitStats":
        """Accumulate positions of ref/cand logits [T, V] (any float dtype, any device)."""
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
        ref = ref.reshape(-1, ref.shape[-1])
        cand = cand.reshape(-1, cand.shape[-1])
        step = max(1, _CHUNK_ELEMENTS // max(1, ref.shape[-1]))
        for start in range(0, ref.shape[0], step):
            self._add_chunk(ref[start:start + step].double(), cand[start:start + step].double())
        return self

    def _add_chunk(self, r: torch.Tensor, c: torch.Tensor) -> None:
        t = r.shape[0]
        self.nonfinite_ref += int((~torch.isfinite(r)).sum())
        self.nonfinite_cand += int((~torch.isfinite(c)).sum())
        diff = (r - c).abs()
        self.positions += t
        self.elements += diff.numel()
        self.max_abs = _nanmax(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.max_abs_ref = _nanmax(self.max_abs_ref, float(r.abs().max()))
        # cosine per position; two all-zero vectors count as identical, one zero vector as orthogonal
        dot = (r * c).sum(-1)
        norms = r.norm(dim=-1) * c.norm(dim=-1)
        both_zero = (r.abs().amax(-1) == 0) & (c.abs().amax(-1) == 0)
        cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300), both_zero.double()).clamp(-1.0, 1.0)
        self.cos_sum += float(cos.sum())
        self.cos_min = _nanmin(self.cos_min, float(cos.min()))
        # KL(ref ‖ cand) per position, from the softmax of each
        logp = torch.log_softmax(r, dim=-1)
        logq = torch.log_softmax(c, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # clamp: -1e-17 from rounding is 0
        self.kl_sum += float(kl.sum())
        self.kl_max = _nanmax(self.kl_max, float(kl.max()))
        self.top1_agree += int((r.argmax(-1) == c.argmax(-1)).sum())

    def merge(self, other: "LogitStats") -> "LogitStats":
        self.positions += other.positions
        self.elements += other.elements
        self.max_abs = _nanmax(self.max_abs, other.max_abs)
        self.sum_abs += other.sum_abs
        self.cos_sum += other.cos_sum
        self.cos_min = _nanmin(self.cos_min, other.cos_min)
        self.kl_sum += other.kl_sum
        self.kl_max = _nanmax(self.kl_max, other.kl_max)
        self.top1_agree += other.top1_agree
        self.max_abs_ref = _nanmax(self.max_abs_ref, other.max_abs_ref)
        self.nonfinite_ref += other.nonfinite_ref
        self.nonfinite_cand += other.nonfinite_cand
        return self

    def summary(self) -> dict:
        n = max(self.positions, 1)
        return {
            "positions": self.positions,
            "max_abs_diff": self.max_abs,
            "mean_abs_diff": self.sum_abs / max(self.elements, 1),
            "cosine_mean": self.cos_sum / n,
            "cosine_min": self.cos_min,
            "kl_mean": self.kl_sum / n,
            "kl_max": self.kl_max,
            "top1_agreement": self.top1_agree / n,
            "max_abs_reference_logit": self.max_abs_ref,
            "nonfinite_candidate_logits": self.nonfinite_cand,
        }


def _nanmax(a: float, b: float) -> float:
    # NaN must win: a NaN logit is a failure, never hidden by max()
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two continuations (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def cache_consistency(cached: torch.Tensor, full: torch.Tensor) -> dict:
    """Cached (prefill/decode) logits vs a full forward over the same positions, both [T, V]."""
    c, f = cached.reshape(-1, cached.shape[-1]).double(), full.reshape(-1, full.shape[-1]).double()
    if c.numel() == 0:
        return {"positions": 0, "max_abs_diff": 0.0, "relative": 0.0, "top1_agreement": 1.0}
    max_abs = float((c - f).abs().max())
    scale = float(f.abs().max())
    return {
        "positions": c.shape[0],
        "max_abs_diff": max_abs,
        # relative to the largest full-forward logit, so one tolerance fits any logit scale
        "relative": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
        "top1_agreement": float((c.argmax(-1) == f.argmax(-1)).double().mean()),
    }
