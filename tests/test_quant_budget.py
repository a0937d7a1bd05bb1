"""quantize --max-kl / --min-top1: keep the most harmful mixers in bf16 until held-out prompts meet the budget."""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path

import pytest

from tests.helpers import read_json, run_cli

CALIB = ["--calib-samples", "8", "--calib-seq-len", "32", "--device", "cpu"]
TRAINED_MOE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny" / "moe"


@pytest.fixture(scope="module")
def preset_numbers(tmp_path_factory):
    """What the default preset alone gives on the held-out prompts of a trained-like dense model."""
    import nemoconv
    from nemoconv.data.demo_checkpoint import write_tiny_checkpoint

    src = write_tiny_checkpoint(tmp_path_factory.mktemp("budget") / "src", "dense", trained_like=True, seed=5)
    out = tmp_path_factory.mktemp("loose") / "q"
    result = nemoconv.quantize(src, out, calib_samples=8, calib_seq_len=32, device="cpu", max_kl=10.0)
    return src, result["quantization"]["budget"]


def test_a_loose_budget_keeps_the_whole_preset(preset_numbers):
    _, budget = preset_numbers
    assert budget["result"]["kept"] == 0 and budget["kept_in_bf16"] == []
    assert budget["preset_result"]["kl"] > 0


def test_a_tight_budget_is_met_and_passes_verify_with_it(preset_numbers, tmp_path, capsys):
    src, loose = preset_numbers
    target = loose["preset_result"]["kl"] / 3
    out = tmp_path / "q"
    code, stdout, err = run_cli(["quantize", src, out, *CALIB, "--max-kl", f"{target:.6g}"], capsys)
    assert code == 0, err
    manifest = read_json(out / "nemoconv-manifest.json")
    budget = manifest["quantization"]["budget"]
    assert budget["result"]["kl"] <= target and budget["result"]["kept"] >= 1
    kept = {m for k in budget["kept_in_bf16"] for m in k["modules"]}
    excluded = {e["module"]: e for e in manifest["quantization"]["excluded"]}
    assert all(excluded[m]["reason"] == "budget" and "--max-kl" in excluded[m]["detail"] for m in kept)
    assert kept.isdisjoint(manifest["quantization"]["targets"])
    hf_quant = read_json(out / "hf_quant_config.json")
    entries = hf_quant["quantization"]["exclude_modules"]  # exact names or the short patterns engines match
    assert all(any(fnmatch.fnmatchcase(m, e) for e in entries) for m in kept), (kept, entries)
    assert "nemoconv verify" in stdout and "--max-kl" in stdout
    # the printed command, run as printed: the gate uses the same budget and passes
    command = shlex.split(budget["verify_command"])
    assert command[:2] == ["nemoconv", "verify"]
    report = tmp_path / "verify.json"
    code, _, err = run_cli([*command[1:], "--device", "cpu", "--report", report], capsys)
    assert code == 0, err
    verdict = json.loads(report.read_text())
    assert verdict["thresholds"]["max_kl"] == pytest.approx(target, rel=1e-5)
    assert verdict["overall"]["kl_mean"] <= target
    assert verdict["overrides"] == []          # a tighter gate is not a loosening override


def test_an_impossible_budget_exits_2_with_the_best_numbers(preset_numbers, tmp_path, capsys):
    src, _ = preset_numbers
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", src, out, *CALIB, "--max-kl", "0"], capsys)
    assert code == 2
    assert "cannot meet --max-kl 0" in err and "the best reachable is KL" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_budget_out_of_range_is_a_usage_error(preset_numbers, tmp_path, capsys):
    src, _ = preset_numbers
    code, _, err = run_cli(["quantize", src, tmp_path / "q", "--min-top1", "1.5"], capsys)
    assert code == 2 and "--min-top1 must be a number in [0, 1.0]" in err


@pytest.mark.skipif(not TRAINED_MOE.is_dir(), reason="../shared/fixtures/trained-tiny/moe is absent")
def test_trained_moe_aggressive_preset_meets_a_tighter_budget_and_passes_verify(tmp_path, capsys):
    """The issue's "done means": aggressive preset, --max-kl tighter than the preset reaches."""
    import nemoconv

    loose = nemoconv.quantize(TRAINED_MOE, tmp_path / "loose", preset="aggressive", calib_samples=8,
                              calib_seq_len=128, device="cpu", max_kl=10.0)["quantization"]["budget"]
    target = loose["preset_result"]["kl"] / 2
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", TRAINED_MOE, out, "--preset", "aggressive", "--calib-samples", "8",
                            "--calib-seq-len", "128", "--device", "cpu", "--max-kl", f"{target:.6g}"], capsys)
    assert code == 0, err
    budget = read_json(out / "nemoconv-manifest.json")["quantization"]["budget"]
    assert budget["result"]["kl"] <= target < budget["preset_result"]["kl"]
    code, _, err = run_cli([*shlex.split(budget["verify_command"])[1:], "--device", "cpu"], capsys)
    assert code == 0, err
