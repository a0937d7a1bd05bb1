"""One small function per sequence operation: Triton kernels on CUDA, the torch reference elsewhere.

The model calls only these, so it never branches on the device itself. CUDA uses
  - mamba-ssm's `mamba_chunk_scan_combined` (chunked SSD scan) for whole sequences and prefill,
  - mamba-ssm's `selective_state_update` for single-token decode,
  - mamba-ssm's `rmsnorm_fn` (layernorm_gated) for the grouped gated RMSNorm,
  - our own fused kernels (`triton_ops`) for RMSNorm (+ the residual add before it), relu², the
    causal depthwise conv (sequence and single step, the step fused with softplus(dt) and A),
  - torch's scaled_dot_product_attention (flash / memory-efficient kernels) for prefill attention,
    and a static-shape masked attention over the whole preallocated KV cache for decode, so that a
    decode step has the same shapes at every position and can be captured in a CUDA graph.
None of the CUDA paths synchronises with the host.

If mamba-ssm (or Triton) is missing, CUDA tensors fall back to the reference with a one-time warning.
Setting NEMOCONV_KERNELS=reference forces the reference everywhere (to compare the two on one GPU).
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
    fused = importlib.import_module(__package__ + ".triton_ops")
    # The forward functions under the autograd wrappers, where this mamba-ssm has them: inference needs no
    # autograd bookkeeping, and in a long prefill the host's launch overhead is what the GPU waits for.
    return SimpleNamespace(chunk_scan=ssd.mamba_chunk_scan_combined, state_update=ssu.selective_state_update,
                           rmsnorm=norm.rmsnorm_fn, fused=fused,
                           chunk_scan_fwd=getattr(ssd, "_mamba_chunk_scan_combined_fwd", None),
                           layer_norm_fwd=getattr(norm, "_layer_norm_fwd", None))


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


def _fused():
    return triton_kernels().fused


_zeros: dict = {}


def _zeros_like_heads(h: int, device) -> torch.Tensor:
    """A persistent float32 zeros [h] (never allocated while a CUDA graph is being captured)."""
    key = (h, str(device))
    z = _zeros.get(key)
    if z is None:
        z = torch.zeros(h, device=device, dtype=torch.float32)
        if not torch.cuda.is_current_stream_capturing():
            _zeros[key] = z
    return z


# ---------------------------------------------------------------------------------------------
# Norms and activations
# ---------------------------------------------------------------------------------------------
def rmsnorm(x, weight, eps):
    """RMSNorm(x) · weight in float32 → weight's dtype (x is first cast to weight's dtype)."""
    if _use_triton(x):
        return _fused().rmsnorm(x, weight, eps)
    return reference.rmsnorm(x.to(weight.dtype), weight, eps)


def add_rmsnorm(residual, delta, weight, eps):
    """(residual + delta in residual's dtype, RMSNorm of that sum) — the pre-norm of the next block."""
    if _use_triton(residual):
        return _fused().rmsnorm(residual, weight, eps, delta=delta)
    out = residual + delta
    return out, reference.rmsnorm(out.to(weight.dtype), weight, eps)


def rmsnorm_fp8(residual, delta, weight, eps, input_scale, rows):
    """CUDA only: rmsnorm (delta None) or add_rmsnorm, plus the normed rows quantized to FP8 for the
    next linear ([rows, n], zero-padded) in the same launch → (…as before…, x_q)."""
    return _fused().rmsnorm(residual, weight, eps, delta=delta, quant=(input_scale, rows))


def relu2_fp8(x2, input_scale, rows):
    """CUDA only: quantize_fp8(relu2(x2)) [rows, n] (zero-padded) in one launch."""
    return _fused().relu2_fp8(x2, input_scale, rows)


def relu2(x):
    """relu(x)², Nemotron-H's MLP activation."""
    if _use_triton(x):
        return _fused().relu2(x)
    return torch.square(F.relu(x))


def gated_rmsnorm(y, z, weight, eps, group_size):
    """RMSNorm(y · silu(z)) per group of `group_size` channels, times weight → y's dtype."""
    if _use_triton(y):
        # The kernel reads rows at any stride (z is a column slice of in_proj's output): no copies.
        tk = triton_kernels()
        if tk.layer_norm_fwd is None:
            return tk.rmsnorm(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
        shape = y.shape
        y2, z2 = y.reshape(-1, shape[-1]), z.reshape(-1, shape[-1])
        y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
        z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
        out, _, _ = tk.layer_norm_fwd(y2, weight.contiguous(), None, eps, z=z2, group_size=group_size,
                                      norm_before_gate=False, is_rms_norm=True)
        return out.reshape(shape)
    return reference.gated_rmsnorm(y, z, weight, eps, group_size)


# ---------------------------------------------------------------------------------------------
# Mamba-2: conv and scan
# ---------------------------------------------------------------------------------------------
def causal_conv1d_silu(x, weight, bias, conv_state=None):
    """x [b, s, c] → silu(causal depthwise conv) [b, s, c]; conv_state [b, c, k-1] is read and refreshed."""
    if _use_triton(x):
        return _fused().conv_silu(x, weight, bias, conv_state)
    return reference.causal_conv1d_silu(x, weight, bias, conv_state)


def causal_conv1d_silu_step(x, weight, bias, conv_state):
    """x [b, c] → [b, c]; shifts conv_state [b, c, k-1] by one in place."""
    return reference.causal_conv1d_silu_step(x, weight, bias, conv_state)


def mamba_step_inputs(xbc, dt, weight, bias, conv_state, dt_bias, dt_limit, A_log):
    """The element-wise front of a Mamba decode step, in one launch on CUDA.

    xbc [b, c], dt [b, h] raw → (silu(conv step) [b, c], softplus(dt + dt_bias) clamped to dt_limit
    [b, h] float32, A = -exp(A_log) [h] float32); conv_state [b, c, k-1] shifts by one in place.
    """
    if _use_triton(xbc):
        return _fused().conv_step(xbc, dt, weight, bias, conv_state, dt_bias, dt_limit, A_log)
    out = reference.causal_conv1d_silu_step(xbc, weight, bias, conv_state)
    return out, F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit), -torch.exp(A_log.float())


def ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state=None, return_final_state=False):
    """x [b, s, h, p], dt [b, s, h] (final step sizes), A [h], B/C [b, s, g, n], D [h] → y [b, s, h, p] (, state)."""
    if _use_triton(x):
        # dt arrives already softplus'd and clamped, so the kernel applies neither (its defaults).
        tk = triton_kernels()
        args = (x, dt.float().contiguous(), A.float(), B, C, chunk_size)
        init = initial_state.float().contiguous() if initial_state is not None else None
        if tk.chunk_scan_fwd is None:
            return tk.chunk_scan(*args, D=D.float(), initial_states=init, return_final_states=return_final_state)
        out, _, _, _, _, final_state, *_ = tk.chunk_scan_fwd(*args, D=D.float(), initial_states=init)
        return (out, final_state) if return_final_state else out
    return reference.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state, return_final_state)


def ssm_step(state, x, dt, A, B, C, D):
    """One decode step: state [b, h, p, n] updated in place; x [b, h, p], dt [b, h], B/C [b, g, n] → y [b, h, p]."""
    if _use_triton(x):
        b, h, p = x.shape
        n = state.shape[-1]
        # The kernel takes per-(head, channel) parameters; stride-0 expansions select its tied-head path.
        zeros = _zeros_like_heads(h, x.device)
        return triton_kernels().state_update(
            state, x, dt.float()[:, :, None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n),
            B, C, D=D.float()[:, None].expand(h, p), z=None,
            dt_bias=zeros[:, None].expand(h, p), dt_softplus=False)
    return reference.ssm_step(state, x, dt, A, B, C, D)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
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


def static_decode_ok(q) -> bool:
    """Whether decode attention can run with static shapes (position read from a device tensor)."""
    d = q.shape[-1]
    return _use_triton(q) and d >= 16 and d & (d - 1) == 0


def decode_attention(q, keys, values, valid, pos):
    """One query per row over the whole cache: q [b, hq, d]; keys/values [b, hk, max_len, d]; valid
    [b, max_len] bool; pos int64 [1] on the device → [b, hq, d] (keys 0 … pos that are valid)."""
    if static_decode_ok(q):
        return _fused().decode_attention(q, keys, values, valid, pos)
    end = int(pos.reshape(-1)[0]) + 1
    mask = valid[:, None, None, :end]
    out = attention(q[:, :, None], keys[:, :, :end], values[:, :, :end], mask, False)
    return out[:, :, 0]
