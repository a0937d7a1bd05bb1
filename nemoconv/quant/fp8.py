"""FP8 tensors and config files exactly as nvidia-modelopt 0.47's HF export writes them (docs/DESIGN.md §7).

Per quantized linear:
    weight        float8_e4m3fn [out, in]   e4m3(clamp(W / weight_scale, ±448)), the quotient computed
                                            in W's own dtype, as ModelOpt does (`weight / scale`)
    weight_scale  float32 []                amax(|W|) / 448, a float32 division, as ModelOpt does
    input_scale   float32 []                amax(|x|) / 448 (running max over calibration batches)

The quotient's dtype matters: for a bf16 W, torch rounds W / scale to bf16 before the cast to e4m3, so
about 3 % of elements land one e4m3 step away from a single rounding of the exact quotient. We follow
ModelOpt so that our files are bit-identical to its export (tests/test_quantize_modelopt.py checks it).
Non-finite weights or activations are an error, never a silent scale.
"""

from __future__ import annotations

import math

import torch

from nemoconv.errors import NemoconvError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MODELOPT_VERSION = "0.47.0"  # the exporter whose format we write
# The files say who wrote them: nemoconv (whatever observed the amax). Engines do not need "modelopt" here:
# vLLM and TensorRT-LLM recognise the format by config.json's quant_method "modelopt" (or hf_quant_config.json's
# "quantization" section), MAX by the float8 weights and their weight_scale tensors (tests/test_engine_loaders.py).
PRODUCER_NAME = "nemoconv"
# A scale must be positive: an all-zero weight (or an input that was always zero) gets 1.0, which
# quantizes zeros exactly; the manifest notes it.
ZERO_AMAX_SCALE = 1.0


def check_amax(amax: float, what: str) -> None:
    if not math.isfinite(amax):
        kind = "NaN" if math.isnan(amax) else "Inf"
        raise NemoconvError(f"{what} holds {kind} values; cannot compute an FP8 scale")


def scale_from_amax(amax: float) -> torch.Tensor:
    """float32 0-d amax / 448, divided in float32 as ModelOpt does for a per-tensor (0-d) amax."""
    if amax <= 0:
        return torch.tensor(ZERO_AMAX_SCALE, dtype=torch.float32)
    return torch.tensor(amax, dtype=torch.float32) / FP8_MAX


def usable_scale(scale: torch.Tensor) -> bool:
    """A scale is written only when it is a finite, normal, positive float32: 0 or a subnormal makes
    W / scale overflow (NaN or ±448 everywhere) and readers divide by it."""
    value = float(scale)
    return math.isfinite(value) and value >= torch.finfo(torch.float32).tiny


def weight_scale_problem(amax: float) -> str | None:
    """Why a weight of this amax cannot be FP8 (None when it can). All-zero weights can: scale 1.0."""
    if amax != 0 and not usable_scale(scale_from_amax(amax)):
        return f"its weight amax {amax:.3g} is too small for an FP8 scale (amax / 448 underflows float32)"
    return None


def input_scale_problem(amax: float) -> str | None:
    """Why an input of this calibrated amax gives no input_scale (None when it does)."""
    if amax == 0:
        return "its input was zero on every calibration token, so no input_scale can be calibrated"
    if not usable_scale(scale_from_amax(amax)):
        return f"its input amax {amax:.3g} is too small for an FP8 scale (amax / 448 underflows float32)"
    return None


def check_scale(scale: torch.Tensor, what: str) -> torch.Tensor:
    """The last guard before a scale is written (quantize excludes such linears before writing)."""
    if not usable_scale(scale):
        raise NemoconvError(f"{what}: FP8 scale {float(scale)!r} is zero, subnormal or not finite; not written")
    return scale


def quantize_weight(w: torch.Tensor, what: str, device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """W → (fp8 weight on CPU, float32 0-d weight_scale, amax), computed on `device` when given (the same
    bits: IEEE division and round-to-nearest-even casts on both). Meta tensors give meta results."""
    if w.is_meta:
        return (torch.empty(w.shape, dtype=FP8_DTYPE, device="meta"),
                torch.empty((), dtype=torch.float32, device="meta"), 0.0)
    if device is not None and device.type != "cpu":
        w = w.to(device, non_blocking=True)
    q, scale, amax = quantize_weight_here(w, what)
    return q.cpu(), scale, amax


def abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| (0-d, on t's device) in one pass without |t|'s copy: aminmax, ~5× faster than abs().amax() on a
    CPU. Exact; NaN and ±inf propagate."""
    low, high = torch.aminmax(t)
    return torch.maximum(-low, high).abs()


def quantize_weight_here(w: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """quantize_weight on w's own device, the FP8 weight left there (the analysis quantizes on the GPU it
    runs on: a CPU quantization of an 8B's projections costs more than the whole estimate)."""
    if not w.is_floating_point() or w.dtype in (FP8_DTYPE, torch.float8_e5m2):
        raise NemoconvError(f"{what} is {w.dtype}; quantize needs a bf16/fp16/fp32 weight")
    amax = float(abs_max(w))                # exact in w's dtype; NaN/Inf propagate
    check_amax(amax, what)
    scale = check_scale(scale_from_amax(amax), what)
    # The quotient is the float32 one rounded to W's dtype: what torch's CPU `w / scale` computes (a 0-d CPU
    # divisor stays float32). On CUDA that expression would first round the divisor to W's dtype (and a
    # Python-number divisor becomes a multiplication by its reciprocal): other bits. So a GPU spells it out,
    # and both devices write ModelOpt's (CPU) export bit for bit.
    if w.device.type == "cpu":
        q = w / scale
    else:
        q = (w.float() / scale.to(w.device)).to(w.dtype)
    # finite W and a normal scale give a finite quotient or ±inf, which the clamp makes ±448: no NaN in q
    q = q.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale, amax


def producer() -> dict:
    from nemoconv.version import __version__

    return {"name": PRODUCER_NAME, "version": __version__}


# KV-cache scales (names: schemes.scales.KV_SCALE_OF), as ModelOpt 0.47's HF export writes them: its attention
# module's k_bmm_quantizer / v_bmm_quantizer amax becomes `<attn>.k_proj.k_scale` / `<attn>.v_proj.v_scale`
# (quant_utils.py _KV_CACHE_REPLACEMENTS), float32 amax / 448, a 0-d tensor for a per-tensor amax.


def hf_quant_config(exclude_modules: list[str], kv_cache: str | None = None) -> dict:
    """hf_quant_config.json, the file vLLM and TensorRT-LLM read first. `kv_cache`: "FP8" when the
    attention layers carry k_scale/v_scale."""
    return {"producer": producer(),
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": kv_cache,
                             "exclude_modules": list(exclude_modules)}}


def config_quantization(hf_quant: dict) -> dict:
    """config.json's `quantization_config`, as ModelOpt's `convert_hf_quant_config_format` builds it
    from hf_quant_config.json for FP8 (same keys, same order)."""
    q = hf_quant["quantization"]
    if q.get("quant_algo") != "FP8":
        raise ValueError("only FP8 is written")
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    out = {"config_groups": {"group_0": {"input_activations": dict(fp8), "weights": dict(fp8),
                                         "targets": ["Linear"]}},
           "ignore": list(q.get("exclude_modules") or []),
           "quant_algo": "FP8"}
    if q.get("kv_cache_quant_algo") == "FP8":  # as convert_hf_quant_config_format writes it
        out["kv_cache_scheme"] = dict(fp8)
    elif q.get("kv_cache_quant_algo"):
        raise ValueError("only an FP8 KV cache is written")
    out["producer"] = dict(hf_quant["producer"])
    out["quant_method"] = "modelopt"
    return out
