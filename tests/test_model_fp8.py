"""FP8 linears: the CPU emulation of per-tensor static FP8 (ModelOpt format) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from nemoconv.model.fp8 import FP8_DTYPE, Linear, fp8_linear, fp8_linear_emulated, quantize_fp8


def test_quantize_rounds_to_nearest_even_and_saturates_at_448():
    scale = torch.tensor(0.5)
    # x / 0.5 = 1.0625 (tie of 1.0 and 1.125 → even mantissa 1.0), 1.1875 (tie of 1.125 and 1.25 → 1.25),
    # 600 and -2000 (saturate to ±448), 2.0 (exact), 0.
    x = torch.tensor([0.53125, 0.59375, 300.0, -1000.0, 1.0, 0.0])
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE
    assert q.float().tolist() == [1.0, 1.25, 448.0, -448.0, 2.0, 0.0]


def test_emulated_linear_matches_hand_computation():
    input_scale, weight_scale = torch.tensor(0.5), torch.tensor(0.25)
    x = torch.tensor([[0.53125, 1.0, -0.75],
                      [300.0, 0.0, 0.59375]])
    # quant(x / 0.5) = [[1.0, 2.0, -1.5], [448, 0, 1.25]]
    w = torch.tensor([[1.0, -2.0, 0.5],
                      [3.0, 0.25, -1.0]]).to(FP8_DTYPE)            # exactly representable in e4m3
    bias = torch.tensor([0.5, -2.0])
    # row 0: [1 - 4 - 0.75, 3 + 0.5 + 1.5] = [-3.75, 5.0];  row 1: [448 + 0.625, 1344 - 1.25] = [448.625, 1342.75]
    # × input_scale·weight_scale = 0.125, then + bias
    expected = torch.tensor([[-3.75 * 0.125 + 0.5, 5.0 * 0.125 - 2.0],
                             [448.625 * 0.125 + 0.5, 1342.75 * 0.125 - 2.0]])
    y = fp8_linear_emulated(x, w, weight_scale, input_scale, bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # the dispatching entry point takes the emulation on CPU
    torch.testing.assert_close(fp8_linear(x, w, weight_scale, input_scale, bias), expected, rtol=0, atol=0)


def test_emulation_keeps_bfloat16_activations_in_their_dtype():
    x = torch.tensor([[0.53125, 1.0, -0.75]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, -2.0, 0.5]]).to(FP8_DTYPE)
    y = fp8_linear_emulated(x, w, torch.tensor(0.25), torch.tensor(0.5))
    assert y.dtype == torch.bfloat16 and y.item() == -3.75 * 0.125


def test_linear_module_runs_fp8_weights_with_their_scales():
    torch.manual_seed(0)
    dense = torch.randn(24, 32) / 32 ** 0.5
    weight_scale = dense.abs().max() / 448
    lin = Linear(32, 24)
    lin.weight = torch.nn.Parameter(quantize_fp8(dense, weight_scale), requires_grad=False)
    lin.weight_scale = weight_scale.float()
    x = torch.randn(5, 32)
    lin.input_scale = (x.abs().max() / 448).float()
    assert lin.quantized
    y = lin(x)
    torch.testing.assert_close(y, fp8_linear_emulated(x, lin.weight, lin.weight_scale, lin.input_scale), rtol=0, atol=0)
    # and it approximates the unquantized product (e4m3 keeps ~2 significant digits)
    exact = x @ dense.t()
    assert ((y - exact).norm() / exact.norm()).item() < 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantize_never_produces_non_finite_from_large_values(bad):
    # ±inf saturates like any large value; NaN stays NaN (it is not a number to clamp)
    q = quantize_fp8(torch.tensor([bad, -1e30]), torch.tensor(1.0)).float()
    assert q[1].item() == -448.0
    assert (q[0].item() == 448.0) if bad == float("inf") else torch.isnan(q[0])
