"""The decode step's kernels (CUDA; skips without it):
  conv step   `kernels.mamba_step_inputs`: silu(conv) of the cached window and this step's input, the cache
              shifted by one in place, the step sizes softplus(dt + dt_bias) clamped, and A = -exp(A_log)
  attention   `kernels.decode_attention` storing this token's key and value itself (new_kv): bit for bit the
              copy into the cache and then the attention
  PDL         a captured chain of the step's kernels launched with programmatic dependent launch: bit for bit
              the same graph without it (NEMOCONV_PDL=0)
The cache shift must be exact (it is a copy); the conv within a few float32 roundings of the reference's sum.
"""

from __future__ import annotations

import pytest
import torch
from cuda_cases import DEVICE, skip_reason

from nemoconv import settings
from nemoconv.model import fp8
from nemoconv.model.cuda import kernels

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,channels,taps,bias", [(1, 10240, 4, True), (3, 1000, 4, False), (2, 77, 3, True),
                                                    (8, 2560, 4, True)])
def test_conv_step_is_the_reference_step(dtype, rows, channels, taps, bias):
    g = torch.Generator().manual_seed(rows * channels + taps)
    heads = 24
    # xBC and dt as strided column slices of one in_proj row, as the model passes them
    zxbcdt = torch.randn(rows, 64 + channels + heads, generator=g).to(dtype)
    xbc, dt = zxbcdt[:, 64:64 + channels], zxbcdt[:, 64 + channels:]
    weight = torch.randn(channels, taps, generator=g).to(dtype) / 2
    b = torch.randn(channels, generator=g).to(dtype) if bias else None
    state = torch.randn(rows, channels, taps - 1, generator=g).to(dtype)
    dt_bias, a_log = torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    limit = (1e-3, float("inf"))
    ref_state = state.clone()
    ref_y, ref_dt, ref_a = kernels.mamba_step_inputs(xbc, dt, weight, b, ref_state, dt_bias, limit, a_log)  # CPU
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    gpu_state = on(state)
    y, step, a = kernels.mamba_step_inputs(on(zxbcdt)[:, 64:64 + channels], on(zxbcdt)[:, 64 + channels:], on(weight),
                                           on(b), gpu_state, on(dt_bias), limit, on(a_log))
    assert torch.equal(gpu_state.cpu(), ref_state)                       # the shift is a copy: exact
    assert torch.equal(ref_state[..., -1], xbc.to(ref_state.dtype))      # …ending with this step's input
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.cpu().float(), ref_y.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(step.cpu(), ref_dt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.cpu(), ref_a, rtol=1e-6, atol=0)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pos", [0, 63, 64, 200])
def test_decode_attention_storing_the_new_key_is_the_copy_then_the_attention(dtype, pos):
    g = torch.Generator(device=DEVICE).manual_seed(pos)
    b, hk, rep, d, length = 3, 2, 4, 64, 256
    q = torch.randn(b, hk * rep, d, generator=g, device=DEVICE).to(dtype)
    keys = torch.randn(b, hk, length, d, generator=g, device=DEVICE).to(dtype)
    values = torch.randn(b, hk, length, d, generator=g, device=DEVICE).to(dtype)
    valid = torch.ones(b, length, dtype=torch.bool, device=DEVICE)
    valid[2, :min(pos, 5)] = False                                    # a left-padded row
    where = torch.tensor([pos], device=DEVICE)
    # the new key/value as the model passes them: [b, hk, 1, d] projections, viewed [b, hk, d]
    k_new = torch.randn(b, hk, 1, d, generator=g, device=DEVICE).to(dtype)
    v_new = torch.randn(b, hk, 1, d, generator=g, device=DEVICE).to(dtype)
    copied_k, copied_v = keys.clone(), values.clone()
    copied_k.index_copy_(2, where, k_new)
    copied_v.index_copy_(2, where, v_new)
    want = kernels.decode_attention(q, copied_k, copied_v, valid, where)
    got = kernels.decode_attention(q, keys, values, valid, where, new_kv=(k_new[:, :, 0], v_new[:, :, 0]))
    assert torch.equal(got, want)
    assert torch.equal(keys, copied_k) and torch.equal(values, copied_v)


def _step_chain(residual, delta, w):
    """A decode step's kernel sequence on 8B-like shapes: add+RMSNorm, bf16 product, RMSNorm with FP8 output, FP8
    product with relu² quantized, FP8 product, gated norm with FP8 output, FP8 product, conv step, SSM step."""
    r, y = kernels.add_rmsnorm(residual, delta, w["norm"], 1e-5)
    a = kernels.skinny_linear(y, w["bf16"])
    rows = y.shape[0]
    _, _, q = kernels.rmsnorm_fp8(residual, a, w["norm"], 1e-5, w["s_in"], fp8.padded_rows(rows))
    h = kernels.skinny_linear(q[:rows], w["up"], scales=(w["s_in"], w["s_w"]), relu2=True, quant_scale=w["s_mid"],
                              out_dtype=y.dtype)
    o = kernels.skinny_linear(h, w["down"], scales=(w["s_mid"], w["s_w"]), out_dtype=y.dtype)
    gq = kernels.gated_rmsnorm_fp8(o, y, w["gnorm"], 1e-5, 512, w["s_in"], fp8.padded_rows(rows))
    p = kernels.skinny_linear(gq[:rows], w["proj"], scales=(w["s_in"], w["s_w"]), out_dtype=y.dtype)
    xbc, dt, A = kernels.mamba_step_inputs(p[:, :w["conv"].shape[0]], p[:, -16:], w["conv"], None, w["conv_state"],
                                           w["dt_bias"], (1e-3, float("inf")), w["a_log"])
    out = kernels.ssm_step(w["ssm_state"], xbc[:, :1024].reshape(rows, 16, 64), dt, A,
                           xbc[:, 1024:1088].reshape(rows, 1, 64), xbc[:, 1088:1152].reshape(rows, 1, 64), w["D"])
    return r, a, o, p, out


@pytest.mark.parametrize("rows", [1, 8])
def test_a_graph_with_pdl_is_bitwise_the_graph_without(rows):
    g = torch.Generator(device=DEVICE).manual_seed(rows)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE)  # noqa: E731
    hidden, inner = 2048, 4096
    w = {"norm": rand(hidden).bfloat16(), "gnorm": rand(hidden).bfloat16(),
         "bf16": (rand(hidden, hidden) / 40).bfloat16(),
         "s_in": torch.tensor(0.02, device=DEVICE), "s_mid": torch.tensor(0.05, device=DEVICE),
         "s_w": torch.tensor(0.001, device=DEVICE), "conv": (rand(1152, 4) / 2).bfloat16(),
         "dt_bias": rand(16), "a_log": rand(16), "D": rand(16)}
    for name, (n, k) in {"up": (inner, hidden), "down": (hidden, inner), "proj": (1152 + 16, hidden)}.items():
        w[name] = fp8.quantize_fp8(rand(n, k) / 3, w["s_w"] * 448)
    residual, delta = rand(rows, hidden).bfloat16(), rand(rows, hidden).bfloat16()
    results = {}
    for pdl in (False, True):
        w["conv_state"] = torch.zeros(rows, 1152, 3, device=DEVICE).bfloat16()
        w["ssm_state"] = torch.zeros(rows, 16, 64, 64, device=DEVICE)
        with settings.override(pdl=pdl):
            _step_chain(residual, delta, w)                     # compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = _step_chain(residual, delta, w)
            for _ in range(3):                                  # the states move on at each replay
                graph.replay()
        torch.cuda.synchronize()
        results[pdl] = [t.clone() for t in outs] + [w["conv_state"].clone(), w["ssm_state"].clone()]
    for off, on in zip(results[False], results[True]):
        assert torch.equal(off, on)
