"""`nemoconv inspect` and the CLI's help texts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

import nemoconv


def test_inspect_json_reports_layout_dims_params_and_shards(hf_dir, capsys):
    src = hf_dir("latent", torch.bfloat16, max_shard_size="20KB")
    code, out, err = run_cli(["inspect", src, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["scheme"] == "hf"
    model = info["model"]
    assert model["pattern"] == "ME*E" and model["counts"] == {"mamba": 1, "attention": 1, "mlp": 0, "moe": 2}
    assert model["moe"]["latent_size"] == 32 and model["moe"]["experts"] == 8
    assert info["dtypes"] == {"bfloat16": info["tensors"]}
    assert info["quantization"] is None
    assert info["shards"]["count"] == len(list(src.glob("*.safetensors"))) > 1
    from helpers import load_all

    assert info["parameters"] == sum(t.numel() for t in load_all(src).values())


@pytest.mark.parametrize("to", ["nemo", "max"])
def test_inspect_detects_every_scheme(tiny_dir, tmp_path, to):
    nemoconv.convert(tiny_dir("moe"), tmp_path / to, to=to)
    from nemoconv.commands.inspect import inspect_checkpoint

    info = inspect_checkpoint(tmp_path / to)
    assert info["scheme"] == to and info["converted_by_nemoconv"]
    assert info["parameters"] == inspect_checkpoint(tiny_dir("moe"))["parameters"]


def test_inspect_table_output(tiny_dir, capsys):
    code, out, err = run_cli(["inspect", tiny_dir("dense")], capsys)
    assert code == 0, err
    assert "scheme hf" in out and "M-M*-M-" in out and "parameters" in out and "quantized  no" in out


@pytest.mark.parametrize("command", ["inspect", "convert", "quantize", "verify", "demo"])
def test_every_command_explains_itself(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and "Usage" in out


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and nemoconv.__version__ in out
