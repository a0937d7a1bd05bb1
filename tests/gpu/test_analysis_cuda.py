"""quantize --analyze on CUDA: FP8 weights quantized on the GPU are the CPU's bits, and the Fisher estimate on
CUDA equals the CPU's up to the FP8 products' summation order. Skips without CUDA or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
from cuda_cases import DEVICE, skip_reason

from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.quant import fisher, fp8
from nemoconv.quant.analyze import _analysable
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.sweep import _fp8_weights

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_weights_quantized_on_the_gpu_are_the_cpu_bits(dtype):
    """The analysis quantizes on the GPU, and quantize --device cuda too: the bits must be the CPU's (which
    tests/test_quantize_modelopt.py checks against ModelOpt's export); a plain CUDA `w / scale` is not."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(256, 512, generator=g) * torch.logspace(-4, 1, 512)).to(dtype)
    w[3, 5] = 37.0                                    # an outlier sets the scale
    name = "backbone.layers.0.mixer.in_proj"
    sqnr = {}
    (q, weight_scale, input_scale), = _fp8_weights([(f"{name}.weight", w)], {name}, {name: 3.5}, DEVICE, sqnr).values()
    cq, cscale, _ = fp8.quantize_weight(w, name)
    assert q.is_cuda and q.dtype == fp8.FP8_DTYPE
    assert torch.equal(q.cpu().view(torch.uint8), cq.view(torch.uint8))
    gq, gscale, _ = fp8.quantize_weight(w, name, torch.device(DEVICE))    # quantize's own GPU path
    assert torch.equal(gq.view(torch.uint8), cq.view(torch.uint8)) and float(gscale) == float(cscale)
    assert float(weight_scale) == float(cscale) and float(input_scale) == float(fp8.scale_from_amax(3.5))
    assert sqnr[name] > 20


def test_fisher_estimate_on_cuda_is_the_cpu_estimate(tiny_dir, monkeypatch):
    # the same labels on both devices (CUDA's sampler draws other ones from the same seed)
    monkeypatch.setattr(fisher, "_draw_labels", lambda p, samples, gen: torch.multinomial(
        p.double().cpu(), samples, replacement=True, generator=torch.Generator().manual_seed(5)).to(p.device))
    src = tiny_dir("dense", trained_like=True)
    ck = open_checkpoint(src)
    names = [m.name for m in _analysable(ck)]
    ids = calibration_tokens(ck, None, 8, 32).ids
    amax = run_calibration(ck, names, ids, torch.device("cpu"), torch.float32, "builtin").amax
    probe = ids[:4]
    cpu = fisher.estimate_kl(ck, probe, names, amax, torch.device("cpu"), torch.float32)
    gpu = fisher.estimate_kl(ck, probe, names, amax, torch.device(DEVICE), torch.float32)
    top = max(cpu.kl.values())
    assert top > 0 and max(gpu.kl, key=gpu.kl.get) == max(cpu.kl, key=cpu.kl.get)
    for name, value in cpu.kl.items():
        assert abs(gpu.kl[name] - value) <= 0.05 * value + 1e-3 * top, (name, gpu.kl[name], value)
