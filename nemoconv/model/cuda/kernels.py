"""One small function per sequence operation: Triton kernels on CUDA, the torch reference elsewhere.

The model calls only these, so it never branches on the device itself. CUDA uses
  - our two-launch chunked SSD scan (`triton_ssd`) for whole sequences and prefill; mamba-ssm's
    `mamba_chunk_scan_combined` only for chunk sizes ours does not take (not a power of two from 16),
  - our persistent TMA GEMM (`triton_gemm`) for the prefill's bf16/fp16 products on Hopper, cuBLAS elsewhere,
  - our own fused kernels (`triton_ops`) for RMSNorm (+ the residual add before it), the grouped gated
    RMSNorm (bit for bit what mamba-ssm's layernorm_gated computes, optionally with out_proj's FP8 input), relu², the
    causal depthwise conv (sequence and single step, the step fused with softplus(dt) and A), the
    single-token SSM state update (`triton_decode.ssm_step`),
  - torch's scaled_dot_product_attention (flash / memory-efficient kernels) for prefill attention,
    and a static-shape masked attention over the whole preallocated KV cache for decode, so that a
    decode step has the same shapes at every position and can be captured in a CUDA graph.
None of the CUDA paths synchronises with the host.

If mamba-ssm (or Triton) is missing, CUDA tensors fall back to the reference with a one-time warning.
Setting NEMOCONV_KERNELS=reference forces the reference everywhere, attention included (to compare the two
on one GPU). The switches are read through `nemoconv.settings` (once, not at every call).

Autotuning of mamba-ssm's SSD kernels (the fallback scan only): `autotune`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nemoconv import settings
from nemoconv.model import reference
from nemoconv.model.cuda.autotune import SM90_AUTOTUNE_FILE, autotune_choices, load_autotune_table  # noqa: F401
from nemoconv.model.cuda.autotune import seed as seed_autotune
from nemoconv.model.cuda.autotune import state as _autotune_state

_triton = None      # SimpleNamespace of the three kernels once imported, False if unavailable
_warned = False


def _load_submodules():
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    fused = importlib.import_module(__package__ + ".triton_ops")
    # The forward functions under the autograd wrappers, where this mamba-ssm has them: inference needs no
    # autograd bookkeeping, and in a long prefill the host's launch overhead is what the GPU waits for.
    return SimpleNamespace(chunk_scan=ssd.mamba_chunk_scan_combined, state_update=ssu.selective_state_update,
                           fused=fused, chunk_scan_fwd=getattr(ssd, "_mamba_chunk_scan_combined_fwd", None))


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
        if _triton:
            try:
                _autotune_state.update(seed_autotune())
            except Exception as exc:  # noqa: BLE001 - a bad table only costs autotuning time
                _autotune_state["error"] = f"{type(exc).__name__}: {exc}"
    return _triton or None


_triton_error = [""]


def _use_triton(t: torch.Tensor) -> bool:
    global _warned
    if not t.is_cuda or settings.current().kernels == "reference":
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


# ---------------------------------------------------------------------------------------------
# Matrix products of a few rows (decode)
# ---------------------------------------------------------------------------------------------
SKINNY_ROWS = 16     # up to this many rows take the skinny kernel (tensor-core tiles of 16 rows from 2 on)
_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def skinny_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., k] · weightᵀ can run as the skinny Triton product: CUDA with Triton, at most 16 rows, k a
    multiple of 16, contiguous weight rows, and NEMOCONV_SKINNY not 0.
    The dtypes are the caller's to check: both those of the model, or both FP8."""
    k = x.shape[-1]
    return settings.current().skinny and x.numel() <= SKINNY_ROWS * k and skinny_weight_ok(weight, k) and _use_triton(x)


def skinny_weight_ok(weight: torch.Tensor, k: int) -> bool:
    """Whether a weight [n, k] suits the skinny product (its part of `skinny_ok`)."""
    return k % 16 == 0 and weight.dim() == 2 and weight.stride(-1) == 1 and weight.shape[1] == k


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias); on CUDA a decode step's few rows through the skinny kernel, more rows through our
    Hopper GEMM where it applies (`gemm_ok`)."""
    if x.dtype == weight.dtype and x.dtype in _MODEL_DTYPES and skinny_ok(x, weight):
        return skinny_linear(x, weight, bias)
    if bias is None and gemm_ok(x, weight):
        return gemm(x, weight)
    return F.linear(x, weight, bias)


def skinny_linear(x, weight, bias=None, scales=None, relu2=False, quant_scale=None, out_dtype=None):
    """CUDA only (`skinny_ok`): x [..., k] · weightᵀ (+ bias) → [..., n] (see `triton_gemv.skinny_linear`: FP8
    operands with scales = (input_scale, weight_scale), relu² of the result, the result quantized to FP8)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = _fused().skinny_linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight, bias, scales=scales,
                               relu2=relu2, quant_scale=quant_scale, out_dtype=out_dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemm(x: torch.Tensor, weight: torch.Tensor, relu2: bool = False) -> torch.Tensor:
    """CUDA only (`gemm_ok`): x [..., k] · weightᵀ → [..., n] on our Hopper GEMM (relu2: relu² of the rounded product,
    rounded again, as `relu2` of the product)."""
    return _fused().gemm(x.reshape(-1, x.shape[-1]), weight, relu2=relu2).reshape(*x.shape[:-1], weight.shape[0])


def gemm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x [..., k] · weightᵀ (no bias) runs on our Hopper GEMM (`triton_gemm.gemm_ok`: sm90, bf16 or fp16,
    aligned rows, a product big enough to fill the GPU) and NEMOCONV_GEMM is not 0."""
    return settings.current().gemm and x.is_cuda and x.is_contiguous() and _use_triton(x) and \
        _fused().gemm_ok(x.reshape(-1, x.shape[-1]), weight)


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
        return _fused().gated_rmsnorm(y, z, weight, eps, group_size)   # z may be a strided column slice: no copy
    return reference.gated_rmsnorm(y, z, weight, eps, group_size)


def gated_rmsnorm_fp8(y2, z2, weight, eps, group_size, input_scale, rows):
    """CUDA only: gated_rmsnorm of y2, z2 [m, n] quantized to FP8 for the next linear ([rows, n], zero-padded)
    in one launch; the normed rows themselves are not kept."""
    return _fused().gated_rmsnorm(y2, z2, weight, eps, group_size, quant=(input_scale, rows))


# ---------------------------------------------------------------------------------------------
# Mamba-2: conv and scan
# ---------------------------------------------------------------------------------------------
def causal_conv1d_silu(x, weight, bias, conv_state=None):
    """x [b, s, c] → silu(causal depthwise conv) [b, s, c]; conv_state [b, c, k-1] is read and refreshed."""
    if _use_triton(x):
        return _fused().conv_silu(x, weight, bias, conv_state)
    return reference.causal_conv1d_silu(x, weight, bias, conv_state)


def _reference_step_size_and_A(dt, dt_bias, dt_limit, A_log):
    """softplus(dt + dt_bias) clamped to dt_limit, and A = -exp(A_log), both float32 (what the fused kernels
    compute alongside the conv)."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit), -torch.exp(A_log.float())


def mamba_sequence_inputs(xbc, dt, weight, bias, conv_state, dt_bias, dt_limit, A_log):
    """The element-wise front of a Mamba prefill, in two launches on CUDA (the conv, then its edges: the cached
    context, its refresh, the step sizes and A).

    xbc [b, s, c], dt [b, s, h] raw → (silu(causal conv) [b, s, c], softplus(dt + dt_bias) clamped to
    dt_limit [b, s, h] float32, A = -exp(A_log) [h] float32); conv_state [b, c, k-1], if given, is the left
    context and is then replaced by the last k-1 inputs.
    """
    if _use_triton(xbc):
        return _fused().conv_silu(xbc, weight, bias, conv_state, step=(dt, dt_bias, dt_limit, A_log))
    out = reference.causal_conv1d_silu(xbc, weight, bias, conv_state)
    return (out, *_reference_step_size_and_A(dt, dt_bias, dt_limit, A_log))


def mamba_step_inputs(xbc, dt, weight, bias, conv_state, dt_bias, dt_limit, A_log):
    """The element-wise front of a Mamba decode step, in one launch on CUDA.

    xbc [b, c], dt [b, h] raw → (silu(conv step) [b, c], softplus(dt + dt_bias) clamped to dt_limit
    [b, h] float32, A = -exp(A_log) [h] float32); conv_state [b, c, k-1] shifts by one in place.
    """
    if _use_triton(xbc):
        return _fused().conv_step(xbc, dt, weight, bias, conv_state, dt_bias, dt_limit, A_log)
    out = reference.causal_conv1d_silu_step(xbc, weight, bias, conv_state)
    return (out, *_reference_step_size_and_A(dt, dt_bias, dt_limit, A_log))


def ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state=None, return_final_state=False, state_out=None):
    """x [b, s, h, p], dt [b, s, h] (final step sizes), A [h], B/C [b, s, g, n], D [h] → y [b, s, h, p] (, state).
    state_out [b, h, p, n] (may be initial_state): receives the final state (our scan writes it there directly)."""
    want = return_final_state or state_out is not None
    if _use_triton(x) and _fused().ssd_supported(x, D, chunk_size):
        result = _fused().ssd_scan(x, dt, A, B, C, D, chunk_size, initial_state, want, state_out)
    elif _use_triton(x):
        tk = triton_kernels()                  # dt arrives softplus'd and clamped: the kernel applies neither
        args = (x, dt.float().contiguous(), A.float(), B, C, chunk_size)
        init = initial_state.float().contiguous() if initial_state is not None else None
        if tk.chunk_scan_fwd is None:
            result = tk.chunk_scan(*args, D=D.float(), initial_states=init, return_final_states=want)
        else:
            out, _, _, _, _, final_state, *_ = tk.chunk_scan_fwd(*args, D=D.float(), initial_states=init)
            result = (out, final_state) if want else out
    else:
        result = reference.ssd_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state, want)
    if not want:
        return result
    y, final_state = result
    if state_out is not None and final_state is not state_out:
        final_state = state_out.copy_(final_state)
    return (y, final_state) if return_final_state else y


def ssm_step(state, x, dt, A, B, C, D):
    """One decode step: state [b, h, p, n] updated in place; x [b, h, p], dt [b, h], B/C [b, g, n] → y [b, h, p]."""
    if _use_triton(x):
        return _fused().ssm_step(state, x, dt.float(), A.float(), B, C, D.float())
    return reference.ssm_step(state, x, dt, A, B, C, D)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def attention(q, k, v, mask, causal):
    """q [b, hq, s, d], k/v [b, hk, t, d], mask [b, 1, s, t] bool or None → [b, hq, s, d]. On CUDA torch's
    SDPA kernels (whether or not mamba-ssm is there), unless NEMOCONV_KERNELS=reference."""
    if q.is_cuda and settings.current().kernels != "reference":
        if mask is not None and q.shape[1] != k.shape[1]:
            # The memory-efficient kernel takes a mask but not grouped KV heads: expand them (else SDPA
            # would fall back to its unfused math path).
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if mask is not None and settings.current().sdpa_masked == "efficient":
            # With a mask, torch 2.11 may pick cuDNN's attention, whose results on an H100 were not bitwise
            # repeatable run to run (decode logits of two identical runs differed by ~2 bf16 ulps and flipped
            # a near-tie token); the memory-efficient kernel is. NEMOCONV_SDPA_MASKED=auto lets torch choose.
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return reference.attention(q, k, v, mask, causal)


def static_decode_ok(q) -> bool:
    """Whether decode attention can run with static shapes (position read from a device tensor)."""
    d = q.shape[-1]
    return _use_triton(q) and d >= 16 and d & (d - 1) == 0


def decode_attention(q, keys, values, valid, pos, new_kv=None):
    """One query per row over the whole cache: q [b, hq, d]; keys/values [b, hk, max_len, d]; valid
    [b, max_len] bool; pos int64 [1] on the device → [b, hq, d] (keys 0 … pos that are valid). new_kv = (k, v)
    [b, hk, d]: this token's key and value, first stored at pos (in the same launch on CUDA)."""
    if static_decode_ok(q):
        return _fused().decode_attention(q, keys, values, valid, pos, new_kv)
    if new_kv is not None:
        keys.index_copy_(2, pos, new_kv[0][:, :, None])
        values.index_copy_(2, pos, new_kv[1][:, :, None])
    end = int(pos.reshape(-1)[0]) + 1
    mask = valid[:, None, None, :end]
    out = attention(q[:, :, None], keys[:, :, :end], values[:, :, :end], mask, False)
    return out[:, :, 0]


def paged_decode_attention(q, keys, values, table, pos, block: int):
    """One query per row over its blocks of a paged pool: q [b, hq, d]; keys/values [blocks · block, hk, d]
    (one layer, flat); table [b, W] int64 block ids; pos int64 [b] each row's position → [b, hq, d] (keys
    0 … pos of each row). Static shapes on CUDA (Triton); elsewhere the blocks are gathered."""
    if static_decode_ok(q):
        return _fused().paged_decode_attention(q, keys, values, table, pos, block)
    end = int(pos.max()) + 1
    p = torch.arange(end, device=q.device)
    rows = reference.flat_rows(table, p.expand(table.shape[0], end), block)                 # [b, end]
    k = keys[rows].transpose(1, 2)                                                # [b, hk, end, d]
    v = values[rows].transpose(1, 2)
    mask = (p[None, :] <= pos[:, None])[:, None, None]                           # [b, 1, 1, end]
    return attention(q[:, :, None], k, v, mask, False)[:, :, 0]
