"""The prefill's SSD scan (`triton_ssd.ssd_scan`, through `kernels.ssd_chunk_scan`) against the float64 reference,
and against mamba-ssm's five-kernel scan on the same inputs: the outputs and the final state, with and without an
initial state, lengths that end inside a chunk, one position and none, rows of a batch, head and state sizes that
are not powers of two, x/B/C as strided views of one xBC tensor (as the model passes them), and the three model
dtypes. A chunk size ours does not take goes to mamba-ssm's scan. Skips without CUDA or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_cases import DEVICE, skip_reason

from nemoconv.model import reference
from nemoconv.model.cuda import kernels

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def inputs(b, s, h, p, g, n, dtype, init, seed=0):
    """x, B, C as views of one [b, s, h·p + 2·g·n] tensor; dt as the conv kernel leaves it (float32, softplus'd)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    xbc = torch.randn(b, s, h * p + 2 * g * n, generator=gen, device=DEVICE)
    xbc[..., h * p:] *= 0.4
    xbc = xbc.to(dtype)
    x, B, C = xbc.split([h * p, g * n, g * n], dim=-1)
    dt = F.softplus(torch.randn(b, s, h, generator=gen, device=DEVICE) - 2.0)
    A = -(torch.rand(h, generator=gen, device=DEVICE) * 4.0 + 0.5)
    D = torch.randn(h, generator=gen, device=DEVICE)
    state = torch.randn(b, h, p, n, generator=gen, device=DEVICE) if init else None
    return x.reshape(b, s, h, p), dt, A, B.reshape(b, s, g, n), C.reshape(b, s, g, n), D, state


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def against_reference(args, chunk):
    x, dt, A, B, C, D, state = args
    y, final = kernels.ssd_chunk_scan(x, dt, A, B, C, D, chunk, initial_state=state, return_final_state=True)
    ref_y, ref_final = reference.ssd_chunk_scan(*(t.double() for t in (x, dt, A, B, C, D)), chunk,
                                                state.double() if state is not None else None, True)
    assert y.dtype == x.dtype and y.shape == x.shape and final.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    return y, final, ref_y, ref_final


CASES = [  # b, s, h, p, g, n, chunk
    (1, 2048, 32, 64, 4, 128, 128),
    (3, 700, 16, 64, 4, 64, 64),
    (2, 33, 8, 32, 2, 16, 16),
    (1, 1, 8, 64, 2, 64, 128),
    (2, 130, 4, 24, 1, 20, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}s{}h{}p{}g{}n{}q{}".format(*c))
@pytest.mark.parametrize("init", [False, True], ids=["fresh", "from_state"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_scan_matches_the_float64_reference(case, init, dtype):
    b, s, h, p, g, n, chunk = case
    args = inputs(b, s, h, p, g, n, dtype, init)
    assert kernels._fused().ssd_supported(args[0], args[5], chunk)
    y, final, ref_y, ref_final = against_reference(args, chunk)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert rel(y, ref_y) < tol
    assert rel(final, ref_final) < tol


@pytest.mark.parametrize("init", [False, True], ids=["fresh", "from_state"])
def test_rounding_is_of_the_size_of_mamba_ssms_scan(init):
    """Same inputs, same chunk size: our errors against float64 of the same order as mamba-ssm's. Both multiply bf16
    operands into float32 sums and round one operand of the chunk-state product to bf16 after scaling it by
    decay·dt: mamba-ssm rounds B's, ours x's, which is measured to be 1.3-2.4× worse for the final state on H200 (this
    case: 2.85e-3 against 1.21e-3; the 8B layout at 2048 tokens: 1.9e-3 against 1.5e-3) and comes out better in a
    float64 simulation of other inputs. The outputs measured equal (3.2e-3) at the 8B layout."""
    x, dt, A, B, C, D, state = inputs(2, 1000, 32, 64, 4, 128, torch.bfloat16, init, seed=3)
    y, final, ref_y, ref_final = against_reference((x, dt, A, B, C, D, state), 128)
    tk = kernels.triton_kernels()
    theirs, _, _, _, _, their_final, *_ = tk.chunk_scan_fwd(x, dt, A, B, C, 128, D=D, initial_states=state)
    assert rel(y, ref_y) <= 2 * rel(theirs, ref_y)
    assert rel(final, ref_final) <= 3 * rel(their_final, ref_final)


def test_an_empty_sequence_keeps_the_state():
    x, dt, A, B, C, D, state = inputs(2, 0, 8, 64, 2, 64, torch.bfloat16, True)
    y, final = kernels.ssd_chunk_scan(x, dt, A, B, C, D, 64, initial_state=state, return_final_state=True)
    assert y.shape == (2, 0, 8, 64)
    assert torch.equal(final, state)


@pytest.mark.parametrize("chunk,length", [(64, 700), (64, 0), (48, 700)], ids=["ours", "ours_empty", "mamba_ssm"])
def test_the_final_state_written_into_the_initial_one_is_the_returned_one(chunk, length):
    """state_out = initial_state (the cache's state, updated in place, as the model passes it): bit for bit the
    final state returned into a new tensor, and the same outputs; a state_out of another layout is copied into."""
    x, dt, A, B, C, D, state = inputs(3, length, 16, 64, 4, 64, torch.bfloat16, True)
    y, final = kernels.ssd_chunk_scan(x, dt, A, B, C, D, chunk, initial_state=state.clone(), return_final_state=True)
    cache = state.clone()
    y2, final2 = kernels.ssd_chunk_scan(x, dt, A, B, C, D, chunk, initial_state=cache, return_final_state=True,
                                        state_out=cache)
    assert final2 is cache and torch.equal(cache, final) and torch.equal(y2, y)
    strided = torch.empty(3, 16, 64, 64, 2, device=DEVICE)[..., 0]               # not contiguous
    y3 = kernels.ssd_chunk_scan(x, dt, A, B, C, D, chunk, initial_state=state.clone(), state_out=strided)
    assert torch.equal(strided, final) and torch.equal(y3, y)


def test_a_chunk_size_ours_does_not_take_goes_to_mamba_ssm():
    args = inputs(1, 200, 8, 64, 2, 64, torch.bfloat16, True)
    assert not kernels._fused().ssd_supported(args[0], args[5], 48)
    y, final, ref_y, ref_final = against_reference(args, 48)
    assert rel(y, ref_y) < 1.5e-2 and rel(final, ref_final) < 1.5e-2
