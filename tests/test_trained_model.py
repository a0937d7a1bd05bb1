"""The trained tiny Nemotron-H that ships with nemoconv (and, where present, ../shared's trained fixtures):
it loads, it is trained (held-out perplexity far below a uniform guess), and its default-preset FP8
output passes `verify` at the CLI's default settings. benchmarks/bench_fp8_fidelity.py is the full version.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli

import nemoconv
from nemoconv.data import heldout_loss, heldout_tokens, tiny_trained_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny"
HELDOUT_TOKENS = 2048  # enough to tell trained from random by far, a few seconds on CPU
# A small calibration with nemoconv's own hooks keeps this a CI-sized check (ModelOpt's takes minutes on a
# CPU); benchmarks/bench_fp8_fidelity.py uses quantize's defaults.
SMALL_CALIBRATION = dict(calib_samples=16, calib_seq_len=256, device="cpu", calibrator="builtin")


def assert_trained(checkpoint: Path, heldout: Path) -> None:
    model = nemoconv.load_model(checkpoint, device="cpu", dtype=torch.float32)
    loss = heldout_loss(model, heldout_tokens(heldout), max_tokens=HELDOUT_TOKENS)
    uniform = math.log(nemoconv.open_checkpoint(checkpoint).spec.vocab_size)
    assert loss < 0.5 * uniform, f"held-out loss {loss:.3f} is not far below the uniform {uniform:.3f}"


def assert_default_fp8_passes_verify(checkpoint: Path, out: Path, capsys) -> None:
    nemoconv.quantize(checkpoint, out, preset="default", **SMALL_CALIBRATION)
    code, stdout, stderr = run_cli(["verify", checkpoint, out], capsys)  # the CLI's default settings
    assert code == 0, stdout + stderr
    assert "PASS (fp8)" in stdout


def test_shipped_model_has_every_layer_kind_and_its_tokenizer():
    ck = nemoconv.open_checkpoint(tiny_trained_checkpoint())
    assert set(ck.spec.layer_codes) == {"M", "*", "-", "E"}  # Mamba, attention, MLP, MoE
    assert ck.quantization() is None
    assert {e.dtype_name for e in ck.entries.values()} == {"bfloat16"}
    assert (ck.path / "tokenizer.json").is_file()
    assert ck.total_bytes < 8_000_000


def test_shipped_model_heldout_perplexity_is_far_below_uniform():
    assert_trained(tiny_trained_checkpoint(), tiny_trained_checkpoint().parent / "heldout_tokens.safetensors")


def test_shipped_model_default_fp8_passes_verify_at_cli_defaults(tmp_path, capsys):
    assert_default_fp8_passes_verify(tiny_trained_checkpoint(), tmp_path / "fp8", capsys)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures/trained-tiny is not present")
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_shared_trained_fixture_is_trained_and_default_fp8_passes_verify(kind, tmp_path, capsys):
    assert_trained(FIXTURES / kind, FIXTURES / "heldout_tokens.safetensors")
    assert_default_fp8_passes_verify(FIXTURES / kind, tmp_path / "fp8", capsys)
