"""Linear layers whose weight may be FP8 (per-tensor static scaling, ModelOpt format; docs/DESIGN.md §7).

A quantized linear stores
    weight        float8_e4m3fn [out, in]   W_fp8, so that W ≈ W_fp8 * weight_scale
    weight_scale  float32 []                per-tensor weight scale
    input_scale   float32 []                per-tensor static activation scale (from calibration)
and computes
    y = (quant(x / input_scale) @ W_fp8ᵀ) * (input_scale * weight_scale) + bias
    quant(v) = e4m3(clamp(v, -448, 448))      (round to nearest, ties to even)

On CUDA the product runs on FP8 tensor cores through `torch._scaled_mm`. Everywhere else (and for
shapes `_scaled_mm` refuses) the same arithmetic is emulated exactly: the FP8 values are widened to
float32, which holds every e4m3 value exactly, and multiplied in float32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == FP8_DTYPE


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale, saturated to ±448, rounded to e4m3 (torch's cast rounds to nearest even)."""
    scaled = x.float() / scale
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_linear_emulated(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        input_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact float32 emulation of the FP8 GEMM: x [..., in], weight fp8 [out, in] → [..., out] in x's dtype."""
    x_q = quantize_fp8(x, input_scale)                              # [..., in] fp8
    acc = x_q.float() @ weight.float().t()                          # [..., out], exact products, fp32 sums
    y = acc * (input_scale.float() * weight_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


_scaled_mm_failed: set[tuple] = set()


def _scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # cuBLASLt FP8 needs the reduction and output widths to be multiples of 16.
    out_features, in_features = weight.shape
    return (x.is_cuda and hasattr(torch, "_scaled_mm") and in_features % 16 == 0 and out_features % 16 == 0
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def _quantize_padded(x2: torch.Tensor, scale: torch.Tensor, rows: int) -> torch.Tensor:
    """quantize_fp8 of x2 [m, in] zero-padded to `rows` rows: one fused Triton launch where available."""
    from nemoconv.model.cuda import kernels

    if kernels.backend(x2) == "triton":
        return kernels.triton_kernels().fused.quantize_fp8(x2, scale, rows)
    if rows != x2.shape[0]:
        x2 = F.pad(x2, (0, 0, 0, rows - x2.shape[0]))
    return quantize_fp8(x2, scale)


def fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product on FP8 tensor cores; rows are zero-padded to a multiple of 16 for cuBLASLt.

    The activation is quantized with the static scale in the same stream (no host sync), so the
    whole linear can sit inside a CUDA graph.
    """
    *lead, in_features = x.shape
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    x_q = _quantize_padded(x2, input_scale, padded_rows(rows))     # [M, in] fp8, row-major
    return fp8_matmul_quantized(x_q, rows, lead, weight, weight_scale, input_scale, bias, x.dtype)


def padded_rows(rows: int) -> int:
    """Rows of the quantized activation handed to cuBLASLt (a multiple of 16)."""
    return rows + (-rows) % 16


def fp8_matmul_quantized(x_q: torch.Tensor, rows: int, lead, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM of fp8_linear_cuda on an activation already quantized (x_q [padded_rows(rows), in] fp8,
    e.g. by the RMSNorm or relu² kernel that produced it) → [*lead, out] in out_dtype.

    A decode step's few rows take the skinny Triton product (`kernels.skinny_ok`): one launch, the weight
    streamed once, and float32 sums of the exact FP8 products (on an H200 equal to the exactly rounded sum but
    for rare last-bit flips; cuBLASLt's differed from it in 6 % of the bf16 outputs of the FP8 test model's first
    in_proj, tests/gpu/test_skinny_gemv.py). More rows take cuBLASLt."""
    from nemoconv.model.cuda import kernels

    real = x_q[:rows]                                                # the padding rows are cuBLASLt's alone
    if kernels.skinny_ok(real, weight):
        y = kernels.skinny_linear(real, weight, bias, scales=(input_scale, weight_scale), out_dtype=out_dtype)
        return y.reshape(*lead, weight.shape[0])
    y = torch._scaled_mm(x_q, weight.t(),                           # weight.t(): [in, out], column-major
                         scale_a=input_scale.float().reshape(()), scale_b=weight_scale.float().reshape(()),
                         out_dtype=out_dtype)
    y = y[:rows]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, weight.shape[0])


def prequantize_ok(linear: "Linear", x: torch.Tensor) -> bool:
    """Whether `linear` can take an activation quantized by the kernel that produced x (CUDA FP8 GEMM)."""
    return (linear.quantized and _scaled_mm_ok(x, linear.weight) and (x.device.index, x.dtype) not in _scaled_mm_failed
            and not (linear._forward_hooks or linear._forward_pre_hooks))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 GEMM on CUDA when the shapes allow it, else the exact emulation."""
    key = (x.device.index, x.dtype)
    if _scaled_mm_ok(x, weight) and key not in _scaled_mm_failed:
        try:
            return fp8_linear_cuda(x, weight, weight_scale, input_scale, bias)
        except RuntimeError as exc:  # e.g. a GPU without FP8 tensor cores
            _scaled_mm_failed.add(key)
            warnings.warn(f"torch._scaled_mm unavailable ({exc}); emulating FP8 linears in float32", stacklevel=2)
    return fp8_linear_emulated(x, weight, weight_scale, input_scale, bias)


class Linear(nn.Module):
    """y = x Wᵀ + b, with W in the model dtype or in FP8 with its two per-tensor scales.

    The loader fills `weight` (and `weight_scale`/`input_scale` for FP8 checkpoints) tensor by tensor,
    so the parameters are created here with the expected shape only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.register_buffer("weight_scale", None)  # float32 [] when weight is FP8
        self.register_buffer("input_scale", None)   # float32 [] when weight is FP8

    @property
    def quantized(self) -> bool:
        return is_fp8(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)
        if x.is_cuda:
            from nemoconv.model.cuda import kernels

            return kernels.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "fp8" if self.quantized else str(self.weight.dtype).removeprefix("torch.")
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {kind}"
