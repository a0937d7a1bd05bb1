"""The front of a Mamba prefill in one launch (`kernels.mamba_sequence_inputs`): the causal conv + SiLU over the
strided xBC slice of in_proj's output, reading and refreshing the cached context, with the step sizes
softplus(dt + dt_bias) clamped and A = -exp(A_log) computed in the same launch, against the torch reference.

Covers the cases the kernel branches on: no cache, a cached context that only the first block of positions reads
(sequences of several blocks, and shorter than the conv window), a clamp that is active, and rows of a batch.
Skips without CUDA or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_cases import DEVICE, skip_reason

from nemoconv.model import reference
from nemoconv.model.cuda import kernels

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

HEADS, INNER, CONV, K = 16, 1024, 1536, 4          # conv channels = inner + 2·groups·state


def inputs(b: int, s: int, dtype, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    zxbcdt = torch.randn(b, s, INNER + CONV + HEADS, generator=g, device=DEVICE).to(dtype)
    xbc, dt = zxbcdt[..., INNER:INNER + CONV], zxbcdt[..., INNER + CONV:]        # strided, as the model passes them
    weight = (0.5 * torch.randn(CONV, K, generator=g, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(CONV, generator=g, device=DEVICE)).to(dtype)
    state = torch.randn(b, CONV, K - 1, generator=g, device=DEVICE).to(dtype)
    dt_bias = torch.randn(HEADS, generator=g, device=DEVICE) - 2.0
    A_log = torch.rand(HEADS, generator=g, device=DEVICE) * 3.0
    return xbc, dt, weight, bias, state, dt_bias, A_log


@pytest.mark.parametrize("b, s", [(1, 2048), (2, 300), (2, 33), (1, 2), (3, 1)])
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "fresh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefill_front_matches_the_reference(b, s, cached, dtype):
    xbc, dt, weight, bias, state, dt_bias, A_log = inputs(b, s, dtype, seed=s + 7 * b)
    dt_limit = (0.05, float("inf"))                                  # active for part of the steps (dt_bias ≈ -2)
    ours_state, ref_state = (state.clone(), state.clone()) if cached else (None, None)
    y, step, A = kernels.mamba_sequence_inputs(xbc, dt, weight, bias, ours_state, dt_bias, dt_limit, A_log)
    want = reference.causal_conv1d_silu(xbc, weight, bias, ref_state)
    want_step = F.softplus(dt.float() + dt_bias).clamp(*dt_limit)
    assert y.shape == want.shape and y.dtype == dtype and y.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y, want, **tol)
    torch.testing.assert_close(step, want_step, rtol=2e-6, atol=0)
    assert bool((step == dt_limit[0]).any()) and bool((step > dt_limit[0]).any())     # the clamp took part
    torch.testing.assert_close(A, -torch.exp(A_log), rtol=2e-6, atol=0)
    if cached:
        assert torch.equal(ours_state, ref_state)                   # the last k-1 inputs, reaching into the old


def test_only_the_first_block_reads_the_cached_context():
    """A context that is read by a later block of positions would change its outputs: compare one long prefill
    against the same inputs with a zero context, which may differ only at the first k-1 positions."""
    xbc, dt, weight, bias, state, dt_bias, A_log = inputs(1, 512, torch.float32, seed=3)
    limit = (0.0, float("inf"))
    with_ctx, _, _ = kernels.mamba_sequence_inputs(xbc, dt, weight, bias, state.clone(), dt_bias, limit, A_log)
    zero_ctx, _, _ = kernels.mamba_sequence_inputs(xbc, dt, weight, bias, torch.zeros_like(state), dt_bias, limit,
                                                   A_log)
    differs = (with_ctx != zero_ctx).any(dim=-1)[0]
    assert differs[:K - 1].all() and not differs[K - 1:].any()
