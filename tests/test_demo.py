"""`nemoconv demo`: the whole workflow on the trained model that ships with nemoconv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from nemoconv.data import tiny_trained_checkpoint
from nemoconv.verification.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run (about 30 s of CPU) shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "nemoconv.cli", "demo", str(root)], env=env, capture_output=True,
                          text=True, timeout=600)
    return root, done


def test_demo_runs_the_whole_workflow_on_the_shipped_model(demo_run):
    root, done = demo_run
    assert done.returncode == 0, done.stderr
    assert "shipped trained Nemotron-H" in done.stdout and "bit-exact" in done.stdout
    assert "demo complete" in done.stdout
    for name in ("verify-nemo.json", "verify-max.json", "verify-fp8.json"):
        assert json.loads((root / name).read_text())["passed"] is True
    fp8 = json.loads((root / "fp8" / "hf_quant_config.json").read_text())
    assert fp8["quantization"]["quant_algo"] == "FP8"
    shipped = (tiny_trained_checkpoint() / "model.safetensors").read_bytes()
    assert (root / "source-hf" / "model.safetensors").read_bytes() == shipped


def test_demo_fp8_verify_used_the_cli_default_settings(demo_run):
    root, done = demo_run
    assert done.returncode == 0, done.stderr
    report = json.loads((root / "verify-fp8.json").read_text())
    settings = report["settings"]
    assert (settings["num_prompts"], settings["seq_len"], settings["max_new_tokens"]) == (4, 64, 16)
    assert report["profile"] == "fp8" and report["overrides"] == []
    assert {k: report["thresholds"][k] for k in PROFILES["fp8"]} == PROFILES["fp8"]
    assert report["passed"] is True


def test_cli_verify_at_its_defaults_passes_the_demo_fp8_output(demo_run, capsys):
    root, _ = demo_run
    code, out, err = run_cli(["verify", root / "source-hf", root / "fp8"], capsys)
    assert code == 0 and "PASS (fp8)" in out, out + err


def test_demo_refuses_an_occupied_directory(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x").write_text("mine")
    code, _, err = run_cli(["demo", tmp_path / "demo"], capsys)
    assert code == 2 and "not empty" in err and (tmp_path / "demo" / "x").read_text() == "mine"
