"""`nemoconv demo`: the whole workflow on a tiny checkpoint built locally."""

from __future__ import annotations

import json

from helpers import run_cli


def test_demo_runs_the_whole_workflow(tmp_path, capsys):
    code, out, err = run_cli(["demo", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert "bit-exact" in out and "demo complete" in out
    for name in ("verify-nemo.json", "verify-max.json", "verify-fp8.json"):
        assert json.loads((tmp_path / "demo" / name).read_text())["passed"] is True
    fp8 = json.loads((tmp_path / "demo" / "fp8" / "hf_quant_config.json").read_text())
    assert fp8["quantization"]["quant_algo"] == "FP8"


def test_demo_refuses_an_occupied_directory(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x").write_text("mine")
    code, _, err = run_cli(["demo", tmp_path / "demo"], capsys)
    assert code == 2 and "not empty" in err and (tmp_path / "demo" / "x").read_text() == "mine"
