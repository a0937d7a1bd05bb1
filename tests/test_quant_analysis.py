"""quantize --analyze: per-linear FP8 sensitivity, layer by layer (nemoconv/quant/analyze.py, sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import nemoconv
from nemoconv.data.demo_checkpoint import write_tiny_checkpoint
from tests.helpers import rewrite, run_cli

DAMAGED = "backbone.layers.4.mixer.up_proj"   # "M-M*-M-": layer 4 is an MLP


def _damaged(tmp_path: Path) -> Path:
    """A trained-like dense model whose one up_proj has an outlier input channel (×400): its FP8 scale
    then leaves the other channels a few e4m3 steps, the error the analysis must find first."""
    d = write_tiny_checkpoint(tmp_path / "damaged", "dense", trained_like=True, seed=3)

    def edit(t):
        w = t[f"{DAMAGED}.weight"]
        w[:, 5] *= 400.0
    rewrite(d, edit)
    return d


def test_analysis_ranks_the_damaged_linear_first(tmp_path, capsys):
    src = _damaged(tmp_path)
    report = tmp_path / "analysis.json"
    code, out, err = run_cli(["quantize", src, "--analyze", "--calib-samples", "8", "--calib-seq-len", "32",
                              "--analyze-samples", "2", "--device", "cpu", "--report", report], capsys)
    assert code == 0, err
    result = json.loads(report.read_text())
    first = result["modules"][0]
    assert first["module"] == DAMAGED
    assert first["kl"] > 1.2 * result["modules"][1]["kl"]
    # (its SQNR need not be the worst: the outlier column dominates ‖W‖², so the KL is what ranks it)
    assert DAMAGED.removeprefix("backbone.") in out   # the rich table names it


def test_analysis_covers_every_linear_any_preset_quantizes(tiny_dir):
    result = nemoconv.analyze_fp8(tiny_dir("moe"), calib_samples=4, calib_seq_len=16, probe_samples=1, device="cpu")
    names = {r["module"] for r in result["modules"]}
    assert "backbone.layers.1.mixer.experts.0.up_proj" in names           # MoE experts (aggressive only)
    assert "backbone.layers.0.mixer.in_proj" in names                     # Mamba
    assert not any("q_proj" in n or "gate" == n.rsplit(".", 1)[-1] for n in names)
    kls = [r["kl"] for r in result["modules"] if r["kl"] is not None]
    assert kls == sorted(kls, reverse=True)
    assert all(r["in_preset"] == (r["kind"] != "moe") for r in result["modules"])


def test_layerwise_kl_matches_the_quantized_model_run_whole(tiny_dir, tmp_path):
    """The sweep's KL for a set of FP8 linears equals the KL of the checkpoint quantize writes with exactly
    that set, run whole by the built-in model."""
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.quant.calibrate import calibration_tokens, run_calibration
    from nemoconv.quant.sweep import Variant, compare_variants
    from nemoconv.verification.metrics import LogitStats

    src = tiny_dir("dense", trained_like=True)
    pair = frozenset({"backbone.layers.2.mixer.in_proj", "backbone.layers.2.mixer.out_proj"})
    ck = open_checkpoint(src)
    ids = calibration_tokens(ck, None, 4, 16).ids
    calib = run_calibration(ck, sorted(pair), ids, torch.device("cpu"), torch.float32, "builtin")
    swept = compare_variants(ck, ids[:2], [Variant("pair", pair)], calib.amax, torch.device("cpu"),
                             torch.float32)["pair"].summary()
    out = tmp_path / "q"
    nemoconv.quantize(src, out, exclude=["backbone.layers.[013456].*"], calib_samples=4, calib_seq_len=16,
                      device="cpu", calibrator="builtin")
    ref = nemoconv.load_model(src)(ids[:2])
    q = nemoconv.load_model(out)(ids[:2])
    whole = LogitStats().add(ref.reshape(-1, ref.shape[-1]), q.reshape(-1, q.shape[-1])).summary()
    assert whole["kl_mean"] > 0
    assert abs(whole["kl_mean"] - swept["kl_mean"]) <= 1e-3 * whole["kl_mean"]
    assert whole["top1_agreement"] == swept["top1_agreement"]


def test_analyze_refuses_an_output_directory(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(["quantize", tiny_dir("dense"), tmp_path / "out", "--analyze"], capsys)
    assert code == 2
    assert "--analyze writes no checkpoint; drop OUT" in err
    assert not (tmp_path / "out").exists()


def test_quantize_without_out_or_analyze_is_a_usage_error(tiny_dir, capsys):
    code, _, err = run_cli(["quantize", tiny_dir("dense")], capsys)
    assert code == 2
    assert "quantize needs OUT" in err
