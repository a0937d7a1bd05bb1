"""The decode step's element-wise kernels against the torch reference (CUDA; skips without it):
  conv step   `kernels.mamba_step_inputs`: silu(conv) of the cached window and this step's input, the cache
              shifted by one in place, the step sizes softplus(dt + dt_bias) clamped, and A = -exp(A_log)
The cache shift must be exact (it is a copy); the conv within a few float32 roundings of the reference's sum.
"""

from __future__ import annotations

import pytest
import torch
from cuda_cases import DEVICE, skip_reason

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

