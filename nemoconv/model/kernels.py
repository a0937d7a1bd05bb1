"""One small function per sequence operation: mamba-ssm's Triton kernels on CUDA, the torch reference elsewhere.

The model calls only these, so it never branches on the device itself. CUDA uses
  - `mamba_chunk_scan_combined` (chunked SSD scan) for whole sequences and prefill,
  - `selective_state_update` for single-token decode,
  - `rmsnorm_fn` (layernorm_gated) for the grouped gated RMSNorm,
  - torch's scaled_dot_product_attention (flash / memory-efficient kernels) for attention.
The depthwise causal conv runs in torch on every device: it is tiny next to the projections, and
this way the optional causal-conv1d extension is never needed.

If mamba-ssm is missing, CUDA tensors fall back to the reference with a one-time warning. Setting
NEMOCONV_KERNELS=reference forces the reference everywhere (to compare the two on one GPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import reference

_triton = None      # SimpleNamespace of the three kernels once imported, False if unavailable
_warned = False


def _load_submodules():
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    return SimpleNamespace(chunk_scan=ssd.mamba_chunk_scan_combined, state_update=ssu.selective_state_update,
                           rmsnorm=norm.rmsnorm_fn)


def _import_mamba_triton():
    """Import the Triton kernels by submodule path, even where `import mamba_ssm` itself fails.

    The package root imports the Mamba-1 CUDA extension (`selective_scan_cuda`), which Triton-only
    installs (MAMBA_SKIP_CUDA_BUILD=TRUE) lack. There, the package is registered from its spec
    without running its `__init__.py`, and the pure-Triton submodules then import normally.
    """
    if importlib.util.find_spec("mamba_ssm") is None:
        raise ImportError("mamba-ssm is not installed")
    try:
        return _load_submodules()
    except ImportError:
        if "mamba_ssm" in sys.modules:  # the root imported fine: the failure is elsewhere
            raise
    spec = importlib.util.find_spec("mamba_ssm")
    sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)  # __path__ set, body not run
    return _load_submodules()


def triton_kernels():
    """The mamba-ssm Triton kernels, or None when they cannot be imported (cached)."""
    global _triton
    if _triton is None:
        try:
            _triton = _import_mamba_triton()
        except Exception as exc:  # ImportError, or triton failing to initialise
            _triton = False
            _triton_error[0] = f"{type(exc).__name__}: {exc}"
    return _triton or None


_triton_error = [""]


def _use_triton(t: torch.Tensor) -> bool:
    global _warned
    if not t.is_cuda or os.environ.get("NEMOCONV_KERNELS", "auto") == "reference":
        return False
    if triton_kernels() is not None:
        return True
    if not _warned:
        _warned = True
        warnings.warn("mamba-ssm's Triton kernels are unavailable (" + _triton_error[0] + "); "
                      "running the torch reference on CUDA (slow)", stacklevel=3)
    return False


def backend(t: torch.Tensor) -> str:
    """Which implementation runs for tensors like `t`: 'triton' or 'reference'."""
    return "triton" if _use_triton(t) else "reference"


# ---------------------------------------------------------------------------------------------
def causal_conv1d_silu(x, weight, bias, conv_state=None):
    """x [b, s, c] → silu(causal depthwise conv) [b, s, c]; conv_state [b, c, k-1] is read and refreshed."""
    return reference.causal_conv1d_silu(x, weight, bias, conv_state)


def causal_conv1d_silu_step(x, weight, bias, conv_state):
    """x [b, c] → [b, c]; shifts conv_state [b, c, k-1] by one in place."""
    return reference.causal_conv1d_silu_step(x, weight, bias, conv_state)


def ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state=None, return_final_state=False):
    """x [b, s, h, p], dt [b, s, h] (final step sizes), A [h], B/C [b, s, g, n], D [h] → y [b, s, h, p] (, state)."""
    if _use_triton(x):
        # dt arrives already softplus'd and clamped, so the kernel applies neither (its defaults).
        out = triton_kernels().chunk_scan(
            x, dt.float().contiguous(), A.float(), B, C, chunk_size, D=D.float(),
            initial_states=initial_state.float().contiguous() if initial_state is not None else None,
            return_final_states=return_final_state)
        return out
    return reference.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state, return_final_state)


def ssm_step(state, x, dt, A, B, C, D):
    """One decode step: state [b, h, p, n] updated in place; x [b, h, p], dt [b, h], B/C [b, g, n] → y [b, h, p]."""
    if _use_triton(x):
        b, h, p = x.shape
        n = state.shape[-1]
        # The kernel takes per-(head, channel) parameters; stride-0 expansions select its tied-head path.
        zeros = torch.zeros(h, device=x.device, dtype=torch.float32)
        return triton_kernels().state_update(
            state, x, dt.float()[:, :, None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n),
            B, C, D=D.float()[:, None].expand(h, p), z=None,
            dt_bias=zeros[:, None].expand(h, p), dt_softplus=False)
    return reference.ssm_step(state, x, dt, A, B, C, D)


def gated_rmsnorm(y, z, weight, eps, group_size):
    """RMSNorm(y · silu(z)) per group of `group_size` channels, times weight → y's dtype."""
    if _use_triton(y):
        return triton_kernels().rmsnorm(y.contiguous(), weight, None, z=z.contiguous(), eps=eps,
                                        group_size=group_size, norm_before_gate=False)
    return reference.gated_rmsnorm(y, z, weight, eps, group_size)


def attention(q, k, v, mask, causal):
    """q [b, hq, s, d], k/v [b, hk, t, d], mask [b, 1, s, t] bool or None → [b, hq, s, d]."""
    if q.is_cuda:
        if mask is not None and q.shape[1] != k.shape[1]:
            # The memory-efficient kernel takes a mask but not grouped KV heads: expand them (else SDPA
            # would fall back to its unfused math path).
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return reference.attention(q, k, v, mask, causal)
