"""`nemoconv.model.device`: the one reading of --device and --dtype."""

from __future__ import annotations

import pytest
import torch

from nemoconv.errors import NemoconvError
from nemoconv.model.device import resolve_device, resolve_dtype

CPU = torch.device("cpu")


def test_auto_device_is_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected


def test_a_device_object_and_cpu_pass_through():
    assert resolve_device(CPU) is CPU
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_bad_input():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(NemoconvError, match="no CUDA device is available"):
            resolve_device(name)


def test_an_unknown_device_is_bad_input():
    with pytest.raises(NemoconvError, match="--device must be auto, cpu or cuda, got 'tpu'"):
        resolve_device("tpu")


def test_auto_dtype_follows_the_device():
    assert resolve_dtype("auto", CPU) == torch.float32 and resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_dtype_names_and_their_short_spellings():
    for names, dtype in ((("float32", "fp32"), torch.float32), (("bfloat16", "bf16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)):
        assert all(resolve_dtype(n, CPU) == dtype for n in names)
    assert resolve_dtype(torch.bfloat16, CPU) == torch.bfloat16


@pytest.mark.parametrize("value", ["int8", ["bf16"], 3])
def test_an_unknown_dtype_is_bad_input(value):
    with pytest.raises(NemoconvError, match="--dtype must be auto, float32 or bfloat16"):
        resolve_dtype(value, CPU)


def test_a_torch_dtype_the_model_cannot_compute_in_is_bad_input():
    with pytest.raises(NemoconvError, match="unsupported compute dtype torch.float64"):
        resolve_dtype(torch.float64, CPU)
