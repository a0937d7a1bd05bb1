"""CUDA path (mamba-ssm Triton kernels, SDPA, FP8 GEMM) against the CPU reference, on a small real-shaped model
(`cuda_cases.build`). Skips without CUDA or without mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache

import pytest
import torch
from cuda_cases import BATCH, DEVICE, SEQ, build, fp8_default_preset, inputs, skip_reason, spec_and_tensors, sync

from nemoconv.model import build_model, fp8, reference
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import fp8_linear, fp8_linear_emulated, quantize_fp8

NEW = 16
pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a vs reference b (both [n, vocab] float32, on CPU)."""
    diff = (a - b).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "rel_max_diff": (diff.max() / b.abs().max()).item(),
        "mean_abs_diff": diff.mean().item(),
        "cosine": torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return None if len(diff) == 0 else int(diff[:, 1].min())


@lru_cache(maxsize=None)
def cpu_reference(dtype: torch.dtype = torch.float32):
    ids, mask = inputs()
    model = build("cpu", dtype)
    logits = model(ids, attention_mask=mask)
    tokens = model.generate(ids, NEW, attention_mask=mask)
    return logits, tokens


def cuda_run(dtype: torch.dtype) -> dict:
    """CUDA model in `dtype` vs the CPU float32 reference. For bf16 the CPU bf16 model's own distance to
    float32 is the yardstick: with MoE layers, bf16 rounding flips some routing choices on any device."""
    ids, mask = inputs()
    ref_logits, ref_tokens = cpu_reference(torch.float32)
    model = build(DEVICE, dtype)
    real = mask.bool()
    sync()
    t0 = time.perf_counter()
    logits = model(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).cpu()
    forward_s = time.perf_counter() - t0
    tokens = model.generate(ids.to(DEVICE), NEW, attention_mask=mask.to(DEVICE)).cpu()
    out = {"backend": kernels.backend(torch.empty(1, device=DEVICE)), "forward_s": forward_s,
           "triton_f32_default": os.environ.get("TRITON_F32_DEFAULT"),
           "logits_vs_cpu": compare(logits[real], ref_logits[real]),
           "greedy_equal": bool(torch.equal(tokens, ref_tokens)),
           "greedy_first_divergence": first_divergence(tokens[:, SEQ:], ref_tokens[:, SEQ:])}
    if dtype != torch.float32:
        same_logits, same_tokens = cpu_reference(dtype)
        out["cpu_same_dtype_vs_cpu_fp32"] = compare(same_logits[real], ref_logits[real])
        out["logits_vs_cpu_same_dtype"] = compare(logits[real], same_logits[real])
        out["greedy_equal_cpu_same_dtype"] = bool(torch.equal(tokens, same_tokens))

    # Cache consistency on the GPU: prefill in two chunks (the second starts from a non-zero state),
    # then single-token decode steps, each against the GPU full forward of the same prefix.
    cache = model.new_cache(BATCH, SEQ)
    m = mask.to(DEVICE)
    steps = [model.prefill(ids[:, :173].to(DEVICE), cache, m[:, :173]),
             model.prefill(ids[:, 173:250].to(DEVICE), cache, m[:, 173:250])]
    steps += [model.decode_step(ids[:, t].to(DEVICE), cache)[:, None] for t in range(250, SEQ)]
    cached = torch.cat(steps, dim=1).cpu()
    out["cached_vs_full_forward"] = compare(cached[real], logits[real])
    out["cached_vs_cpu"] = compare(cached[real], ref_logits[real])

    # Decode speed, batch 1 (informative; no CUDA graphs).
    cache = model.new_cache(1, SEQ + 65)
    model.prefill(ids[:1].to(DEVICE), cache)
    token = ids[:1, -1].to(DEVICE)
    for _ in range(5):
        model.decode_step(token, cache)
    sync()
    t0 = time.perf_counter()
    for _ in range(60):
        model.decode_step(token, cache)
    sync()
    out["decode_tokens_per_s_batch1"] = 60 / (time.perf_counter() - t0)
    return out


def fp8_gemm() -> dict:
    """torch._scaled_mm against the exact emulation, on the same FP8 operands."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 512, generator=g)
    w = torch.randn(1024, 512, generator=g) / 512 ** 0.5
    w_scale = (w.abs().max() / 448).float()
    in_scale = (x.abs().max() / 448).float()
    w8 = quantize_fp8(w, w_scale)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        ref = fp8_linear_emulated(x.to(dtype), w8, w_scale, in_scale).float()   # same (rounded) input
        fp8._scaled_mm_failed.clear()
        y = fp8_linear(x.to(DEVICE).to(dtype), w8.to(DEVICE), w_scale.to(DEVICE), in_scale.to(DEVICE)).float().cpu()
        out[str(dtype).removeprefix("torch.")] = {
            "max_abs_diff": (y - ref).abs().max().item(),
            "rel_max_diff": ((y - ref).abs().max() / ref.abs().max()).item(),
            "scaled_mm": fp8._scaled_mm_ok(x.to(DEVICE).to(dtype), w8) and not fp8._scaled_mm_failed}
    return out


def fp8_model() -> dict:
    """A model with FP8 Mamba and MLP projections: CUDA (FP8 GEMM) vs CPU (exact emulation), fp32 activations.

    Each FP8 linear is checked on the very input the CPU model gave it. End to end, the two are only
    loosely comparable: Hopper's FP8 GEMM differs from the emulation by ~2e-4 relative, which flips
    some activations' FP8 rounding and some MoE routing choices downstream (an H100 gave cosine 0.9941
    end to end for this model, about what bf16 vs fp32 gives).
    """
    spec, tensors = spec_and_tensors()
    tensors = dict(tensors)
    targets = fp8_default_preset(spec, tensors)
    ids, mask = inputs()
    real = mask.bool()
    cpu = build_model(spec, tensors.items(), device="cpu", dtype=torch.float32)
    gpu = build_model(spec, tensors.items(), device=DEVICE, dtype=torch.float32)
    seen = {}
    hooks = [cpu.get_submodule(k).register_forward_hook(
        lambda mod, args, out, k=k: seen.__setitem__(k, (args[0].clone(), out.clone()))) for k in targets]
    cpu_logits = cpu(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    per_linear = {k: _diff(gpu.get_submodule(k)(x.to(DEVICE)), y)["rel_max_diff"] for k, (x, y) in seen.items()}
    gpu_logits = gpu(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).cpu()
    return {"per_linear_rel_max_diff": per_linear, "worst_linear_rel_max_diff": max(per_linear.values()),
            "end_to_end": compare(gpu_logits[real], cpu_logits[real])}


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().cpu(), b.float().cpu()
    return {"max_abs_diff": (a - b).abs().max().item(), "rel_max_diff": ((a - b).abs().max() / b.abs().max()).item()}


def op_checks() -> dict:
    """Each Triton kernel against its torch reference on random inputs of the model's shapes."""
    g = torch.Generator().manual_seed(1)
    b, s, h, p, ng, n = BATCH, SEQ, 16, 64, 4, 64
    x = torch.randn(b, s, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, s, h, generator=g) - 1)
    A = -torch.exp(torch.rand(h, generator=g) * 2)
    Bm, Cm = torch.randn(b, s, ng, n, generator=g) / 4, torch.randn(b, s, ng, n, generator=g) / 4
    D = torch.randn(h, generator=g)
    init = torch.randn(b, h, p, n, generator=g) * 0.1
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        xs, Bs, Cs = x.to(dtype), Bm.to(dtype), Cm.to(dtype)
        ref_y, ref_state = reference.ssd_chunk_scan(xs, dt, A, Bs, Cs, D, 64, init, True)
        on = lambda t: t.to(DEVICE)  # noqa: E731
        y, state = kernels.ssd_chunk_scan(on(xs), on(dt), on(A), on(Bs), on(Cs), on(D), 64, on(init), True)
        out[f"chunk_scan_{str(dtype)[6:]}"] = {"y": _diff(y, ref_y), "final_state": _diff(state, ref_state)}
        ref_state = init.clone()
        ref_y = reference.ssm_step(ref_state, xs[:, 0], dt[:, 0], A, Bs[:, 0], Cs[:, 0], D)
        state = on(init.clone())
        y = kernels.ssm_step(state, on(xs[:, 0]), on(dt[:, 0]), on(A), on(Bs[:, 0]), on(Cs[:, 0]), on(D))
        out[f"state_update_{str(dtype)[6:]}"] = {"y": _diff(y, ref_y), "state": _diff(state, ref_state)}
        yy, zz = x.reshape(b, s, h * p).to(dtype), torch.randn(b, s, h * p, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(h * p, generator=g)).to(dtype)
        out[f"gated_rmsnorm_{str(dtype)[6:]}"] = _diff(kernels.gated_rmsnorm(on(yy), on(zz), on(w), 1e-5, h * p // ng),
                                                      reference.gated_rmsnorm(yy, zz, w, 1e-5, h * p // ng))
    return out


@lru_cache(maxsize=None)
def _run(dtype):
    return cuda_run(dtype)

def test_fp32_cuda_matches_cpu_reference():
    r = _run(torch.float32)
    print(json.dumps(r, indent=1))
    assert r["backend"] == "triton"
    # A MoE router whose two best experts tie to within fp32 summation-order noise can pick differently
    # on the GPU than on the CPU at a single position (seen on an H100: 1 of 600 positions, 0.17
    # relative, identical with NEMOCONV_KERNELS=reference). So the max is not the test; the mean,
    # the cosine over all positions, top-1 agreement and greedy tokens are.
    cpu = r["logits_vs_cpu"]
    assert cpu["mean_abs_diff"] < 1e-4 and cpu["cosine"] > 0.99999 and cpu["top1_agreement"] >= 0.99, cpu
    cached = r["cached_vs_full_forward"]
    assert cached["mean_abs_diff"] < 1e-4 and cached["cosine"] > 0.99999, cached
    assert r["greedy_equal"], r

def test_bf16_cuda_is_as_close_to_fp32_as_cpu_bf16():
    r = _run(torch.bfloat16)
    print(json.dumps(r, indent=1))
    cuda, cpu = r["logits_vs_cpu"], r["cpu_same_dtype_vs_cpu_fp32"]
    assert cuda["cosine"] > cpu["cosine"] - 0.003
    assert cuda["mean_abs_diff"] < 2 * cpu["mean_abs_diff"]
    assert cuda["top1_agreement"] > cpu["top1_agreement"] - 0.03
    assert r["cached_vs_full_forward"]["cosine"] > 0.99

def test_fp8_gemm_matches_emulation():
    r = fp8_gemm()
    print(json.dumps(r, indent=1))
    assert r["float32"]["scaled_mm"] and r["bfloat16"]["scaled_mm"]
    # The FP8 products are exact in both; Hopper's FP8 MMA accumulates with less than fp32 precision
    # (an H100 gave 2.1e-4 here), the emulation in fp32.
    assert r["float32"]["rel_max_diff"] < 1e-3
    assert r["bfloat16"]["rel_max_diff"] < 1e-2           # output rounded to bf16 (H100: 3.5e-3)

def test_triton_kernels_match_the_reference():
    r = op_checks()
    print(json.dumps(r, indent=1))
    assert r["chunk_scan_float32"]["y"]["rel_max_diff"] < 5e-3
    assert r["chunk_scan_float32"]["final_state"]["rel_max_diff"] < 5e-3
    assert r["state_update_float32"]["y"]["rel_max_diff"] < 1e-4
    assert r["state_update_float32"]["state"]["rel_max_diff"] < 1e-5
    assert r["gated_rmsnorm_float32"]["rel_max_diff"] < 1e-5
    assert r["chunk_scan_bfloat16"]["y"]["rel_max_diff"] < 3e-2

def test_fp8_model_cuda_matches_cpu_emulation():
    r = fp8_model()
    print(json.dumps(r, indent=1))
    assert r["worst_linear_rel_max_diff"] < 1e-3          # same bound as the bare GEMM above
    assert r["end_to_end"]["cosine"] > 0.98               # gross errors only (see fp8_model)
