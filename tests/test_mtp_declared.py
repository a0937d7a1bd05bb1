"""A config that declares MTP layers (num_nextn_predict_layers) without their weights — what transformers'
save_pretrained writes — is reported by inspect and warned about by convert and quantize; quantize keeps
MTP layers that are present unquantized and says so."""

from __future__ import annotations

import json

import torch
from helpers import load_all, read_json, run_cli

from nemoconv.data.demo_checkpoint import write_tiny_checkpoint

QUICK = ["--calib-samples", "2", "--calib-seq-len", "8", "--device", "cpu", "--calibrator", "builtin"]


def declares_mtp_without_weights(directory):
    """A checkpoint without MTP tensors whose config declares one MTP layer."""
    src = write_tiny_checkpoint(directory, "dense", dtype=torch.bfloat16, trained_like=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_inspect_reports_declared_mtp_layers_without_weights(tmp_path, capsys):
    src = declares_mtp_without_weights(tmp_path / "src")
    code, out, err = run_cli(["inspect", src], capsys)
    assert code == 0, err
    assert "warning: config.json declares 1 MTP layer(s)" in out and "no MTP weights" in out
    code, out, err = run_cli(["inspect", src, "--json"], capsys)
    assert code == 0 and "no MTP weights" in json.loads(out)["warnings"][0]


def test_inspect_has_no_mtp_warning_when_the_weights_are_there(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src", "moe", num_nextn_predict_layers=1,
                                mtp_hybrid_override_pattern="*E")
    code, out, err = run_cli(["inspect", src, "--json"], capsys)
    assert code == 0 and json.loads(out)["warnings"] == []


def test_convert_warns_in_its_summary_and_manifest(tmp_path, capsys):
    src = declares_mtp_without_weights(tmp_path / "src")
    code, out, err = run_cli(["convert", src, tmp_path / "out", "--to", "max"], capsys)
    assert code == 0, err
    assert "warning: config.json declares 1 MTP layer(s)" in out
    assert "no MTP weights" in read_json(tmp_path / "out" / "nemoconv-manifest.json")["warnings"][0]


def test_quantize_warns_in_its_summary(tmp_path, capsys):
    src = declares_mtp_without_weights(tmp_path / "src")
    code, out, err = run_cli(["quantize", src, tmp_path / "out", *QUICK], capsys)
    assert code == 0, err
    assert "declares 1 MTP layer(s)" in out and "no MTP weights" in out


def test_quantize_keeps_present_mtp_layers_unquantized_and_says_so(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "src", "moe", dtype=torch.bfloat16, trained_like=True,
                                num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    code, out, err = run_cli(["quantize", src, tmp_path / "out", "--preset", "aggressive", *QUICK], capsys)
    assert code == 0, err
    assert "MTP layers" in out and "kept unquantized" in out
    t = load_all(tmp_path / "out")
    mtp = {n: v for n, v in t.items() if n.startswith("mtp.")}
    assert mtp and not any(v.dtype == torch.float8_e4m3fn or n.endswith("_scale") for n, v in mtp.items())
