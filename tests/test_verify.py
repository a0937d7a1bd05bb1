"""`nemoconv verify` as a CI gate: faithful conversions pass, planted faults fail (exit 1), bad input exits 2.

Faults are planted the way a buggy converter would produce them: the tensors are rewritten in place
and the manifest that still claims "lossless" is kept, so `--profile auto` picks `exact` on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import read_json, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nemoconv

FAST = ["--num-prompts", "2", "--seq-len", "24", "--max-new-tokens", "6"]
# bf16 weights make MAX's router cast lossless, so every scheme's conversion is bit-exact
SOURCE_DTYPE = {"dense": torch.float32, "moe": torch.bfloat16, "latent": torch.bfloat16}


def plant(directory: Path, edit) -> None:
    """Rewrite the checkpoint's tensors in place (same files, same metadata), keeping its manifest."""
    files = sorted(Path(directory).glob("*.safetensors"))
    tensors, owner, metadata = {}, {}, {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            metadata[f] = h.metadata()
        for name, t in load_file(str(f)).items():
            tensors[name], owner[name] = t, f
    edit(tensors)
    for f in files:
        save_file({n: t.contiguous() for n, t in tensors.items() if owner[n] == f}, str(f), metadata=metadata[f])


def converted(tiny_dir, tmp_path, kind: str, to: str) -> tuple[Path, Path]:
    src = tiny_dir(kind, SOURCE_DTYPE[kind])
    out = tmp_path / f"{kind}-{to}"
    manifest = nemoconv.convert(src, out, to=to)
    assert manifest["lossless"]
    return src, out


def assert_gate_fails(capsys, ref, cand, metric: str, *extra) -> dict:
    report = cand.parent / f"{cand.name}-report.json"
    code, out, err = run_cli(["verify", ref, cand, *FAST, "--report", report, *extra], capsys)
    assert code == 1, (code, out, err)
    line = err.rstrip("\n").split("\n")
    assert len(line) == 1 and line[0].startswith("FAIL: "), err
    assert metric in line[0], line[0]
    assert "overall" in out and "FAIL" not in out  # the table on stdout; the verdict once, on stderr
    data = read_json(report)
    assert data["passed"] is False and metric in data["failure"]
    return data


# ---- faithful conversions pass under `exact` ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "moe", "latent"])
@pytest.mark.parametrize("to", ["hf", "nemo", "max"])
def test_lossless_conversion_passes_exact_through_cli(tiny_dir, tmp_path, capsys, kind, to):
    src, cand = converted(tiny_dir, tmp_path, kind, to)
    report = tmp_path / "reports" / "verify.json"
    code, out, err = run_cli(["verify", src, cand, *FAST, "--report", report], capsys)
    assert code == 0, (out, err)
    assert "PASS" in out and "overall" in out
    data = read_json(report)
    assert data["passed"] is True and data["failure"] is None
    assert data["profile"] == "exact" and "lossless" in data["profile_reason"]
    assert data["thresholds"]["max_abs"] == 0.0 and data["thresholds"]["same_greedy"] is True
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    o = data["overall"]
    assert o["max_abs_diff"] == 0.0 and o["top1_agreement"] == 1.0 and o["kl_mean"] == 0.0
    assert o["greedy_identical_prompts"] == o["prompts"] == 2
    assert len(data["prompts"]) == 2
    for p in data["prompts"]:
        assert p["tokens"] == 24 and p["greedy_first_divergence"] is None
        assert len(p["candidate_tokens"]) == 6 and p["candidate_tokens"] == p["reference_tokens"]
    cache = data["cache_consistency"]
    assert cache["candidate"]["positions"] == 2 * (4 + 6)  # 4 teacher-forced + prefill + 5 decode steps each
    assert 0 <= cache["candidate"]["relative_max"] <= cache["tolerance_relative"] == 1e-3
    for side, path in (("reference", src), ("candidate", cand)):
        fp = data[side]["fingerprint"]
        assert len(fp["sha256_full"]) == 64 and fp["bytes"] > 0
        assert data[side]["path"] == str(Path(path).resolve()) or data[side]["path"] == str(path)
    assert data["candidate"]["scheme"] == to
    timings = data["timings_s"]
    for key in ("load", "forward", "generate", "metrics", "total"):
        assert timings[key] >= 0
    assert [c["metric"] for c in data["checks"] if not c["passed"]] == []


def test_python_api_can_be_called_twice(tiny_dir, tmp_path):
    src, cand = converted(tiny_dir, tmp_path, "dense", "nemo")
    for _ in range(2):  # the package attribute `verify` must stay callable after the module is imported
        report = nemoconv.verify(src, cand, num_prompts=1, seq_len=8, max_new_tokens=2)
        assert report.passed and report.to_dict()["passed"] is True


# ---- planted faults fail -----------------------------------------------------------------------------


@pytest.mark.parametrize("to,name", [("hf", "backbone.layers.1.norm.weight"),
                                     ("nemo", "model.layers.1.norm.weight"),
                                     ("max", "blocks.1.norm.weight")])
def test_norm_weight_scaled_by_1_02_fails(tiny_dir, tmp_path, capsys, to, name):
    src, cand = converted(tiny_dir, tmp_path, "dense", to)

    def edit(t):
        t[name] = t[name] * 1.02

    plant(cand, edit)
    data = assert_gate_fails(capsys, src, cand, "max_abs_diff")
    assert data["profile"] == "exact"


def test_two_same_shape_layers_swapped_fails(tiny_dir, tmp_path, capsys):
    src, cand = converted(tiny_dir, tmp_path, "dense", "max")  # pattern M-M*-M-: layers 0 and 2 are Mamba

    def edit(t):
        for name in [n for n in t if n.startswith("blocks.0.")]:
            other = "blocks.2." + name[len("blocks.0."):]
            assert t[other].shape == t[name].shape
            t[name], t[other] = t[other], t[name]

    plant(cand, edit)
    assert_gate_fails(capsys, src, cand, "max_abs_diff")


def test_one_routed_expert_scaled_fails(tiny_dir, tmp_path, capsys):
    src, cand = converted(tiny_dir, tmp_path, "moe", "nemo")

    def edit(t):
        merged = t["model.layers.1.mixer.experts.down_projs"].clone()   # [E, moe_inter, hidden]
        merged[3] *= 1.05
        t["model.layers.1.mixer.experts.down_projs"] = merged

    plant(cand, edit)
    assert_gate_fails(capsys, src, cand, "max_abs_diff")


def test_conv_bias_zeroed_fails(tiny_dir, tmp_path, capsys):
    src, cand = converted(tiny_dir, tmp_path, "dense", "max")

    def edit(t):
        t["blocks.2.mixer.conv1d.bias"] = torch.zeros_like(t["blocks.2.mixer.conv1d.bias"])

    plant(cand, edit)
    assert_gate_fails(capsys, src, cand, "max_abs_diff")


def test_fault_is_caught_even_when_told_to_ignore_max_abs(tiny_dir, tmp_path, capsys):
    """With max |Δ| waived, `exact` still demands top-1 1.0 and identical greedy tokens."""
    src, cand = converted(tiny_dir, tmp_path, "dense", "nemo")

    def edit(t):
        t["model.layers.0.mixer.out_proj.weight"] = t["model.layers.0.mixer.out_proj.weight"] * 3.0

    plant(cand, edit)
    data = assert_gate_fails(capsys, src, cand, "top1_agreement", "--max-abs", "1e9")
    assert data["thresholds"]["max_abs"] == 1e9 and data["thresholds"]["overridden"] == ["max_abs"]


# ---- FP8 -------------------------------------------------------------------------------------------


def write_fp8_pair(directory: Path) -> tuple[Path, Path]:
    """A float32 reference and its per-tensor static FP8 version (MLP up/down, ModelOpt format).

    The reference's MLP outputs are damped (down_proj × 0.3): in a random tiny network the MLPs
    otherwise dominate the residual stream, far more than in a trained model, and the next-token
    distribution is nearly flat, so FP8 noise alone would flip ~10 % of argmaxes.
    """
    from nemoconv.data.demo_checkpoint import write_tiny_checkpoint
    from nemoconv.model import quantize_fp8
    from nemoconv.verification.prompts import builtin_prompts

    ref = write_tiny_checkpoint(directory / "ref", "dense", seed=0)
    tensors = load_file(str(ref / "model.safetensors"))
    for name in tensors:
        if name.endswith("mixer.down_proj.weight"):
            tensors[name] = tensors[name] * 0.3
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})

    targets = [n[: -len(".weight")] for n in tensors if n.endswith(("mixer.up_proj.weight", "mixer.down_proj.weight"))]
    model = nemoconv.load_model(ref)
    amax: dict[str, float] = {}
    for module in targets:  # calibration: running amax of each quantized linear's input
        model.get_submodule(module).register_forward_hook(
            lambda mod, args, out, m=module: amax.__setitem__(m, max(amax.get(m, 0.0), float(args[0].abs().max()))))
    model(torch.tensor([p.ids for p in builtin_prompts(4, 32, None, 256)]))
    for module in targets:
        w = tensors[module + ".weight"].float()
        scale = w.abs().max() / 448.0
        tensors[module + ".weight"] = quantize_fp8(w, scale)
        tensors[module + ".weight_scale"] = scale.reshape(()).float()
        tensors[module + ".input_scale"] = torch.tensor(amax[module] / 448.0, dtype=torch.float32)

    cand = directory / "fp8"
    cand.mkdir()
    save_file(tensors, str(cand / "model.safetensors"), metadata={"format": "pt"})
    excluded = sorted(n[: -len(".weight")] for n in tensors if n.endswith("proj.weight") and
                      n[: -len(".weight")] not in targets) + ["lm_head"]
    config = json.loads((ref / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "modelopt", "quant_algo": "FP8", "producer": {"name": "modelopt", "version": "0.47.0"},
        "ignore": excluded, "config_groups": {"group_0": {
            "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
            "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}}
    (cand / "config.json").write_text(json.dumps(config, indent=2))
    (cand / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": excluded}}))
    return ref, cand


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    return write_fp8_pair(tmp_path_factory.mktemp("fp8"))


@pytest.mark.parametrize("scheme", ["hf", "max"])
def test_faithful_fp8_passes_fp8_profile(fp8_pair, tmp_path, capsys, scheme):
    ref, cand = fp8_pair
    if scheme == "max":
        nemoconv.convert(cand, tmp_path / "max", to="max")
        cand = tmp_path / "max"
    report = tmp_path / "r.json"
    code, out, err = run_cli(["verify", ref, cand, *FAST, "--report", report], capsys)
    assert code == 0, (out, err)
    data = read_json(report)
    assert data["profile"] == "fp8" and "quantized" in data["profile_reason"]
    assert data["thresholds"]["min_cosine"] == 0.99 and data["thresholds"]["max_kl"] == 0.05
    assert 0 < data["overall"]["max_abs_diff"]  # FP8 changes logits, within the profile's bounds
    assert data["cache_consistency"]["tolerance_relative"] == 5e-2
    assert data["candidate"]["quantization"]["fp8_weights"] == 6


@pytest.mark.parametrize("scheme,name", [("hf", "backbone.layers.1.mixer.down_proj.weight_scale"),
                                         ("max", "blocks.1.mixer.down_proj.weight_scale")])
def test_fp8_weight_scale_doubled_fails(fp8_pair, tmp_path, capsys, scheme, name):
    ref, cand = fp8_pair
    out = tmp_path / scheme
    if scheme == "max":
        nemoconv.convert(cand, out, to="max")
    else:
        shutil.copytree(cand, out)

    def edit(t):
        t[name] = t[name] * 2.0

    plant(out, edit)
    data = assert_gate_fails(capsys, ref, out, "cosine_mean")
    assert data["profile"] == "fp8"


# ---- profiles chosen from the tensors ---------------------------------------------------------------


def test_lossy_bf16_cast_is_judged_with_bf16_thresholds(tiny_dir, tmp_path, capsys):
    src = tiny_dir("dense", torch.float32)
    nemoconv.convert(src, tmp_path / "bf16", to="nemo", dtype="bfloat16")
    report = tmp_path / "r.json"
    code, out, err = run_cli(["verify", src, tmp_path / "bf16", *FAST, "--report", report], capsys)
    data = read_json(report)
    assert code == 0, (out, err, data["checks"])
    assert data["profile"] == "bf16" and "lossy" in data["profile_reason"]
    assert data["overall"]["max_abs_diff"] > 0
    assert data["thresholds"]["min_cosine"] == 0.999 and data["thresholds"]["min_top1"] == 0.99
    # the same pair under a stricter cosine than bf16 rounding allows fails, naming the override
    code, out, err = run_cli(["verify", src, tmp_path / "bf16", *FAST, "--min-cosine", "0.99999999999"], capsys)
    assert code == 1 and "cosine_mean 0.9999" in err and "< min_cosine 0.99999999999 (profile bf16)" in err, err


def test_exact_requested_for_a_lossy_cast_fails(tiny_dir, tmp_path, capsys):
    src = tiny_dir("dense", torch.float32)
    nemoconv.convert(src, tmp_path / "bf16", to="max", dtype="bfloat16")
    code, out, err = run_cli(["verify", src, tmp_path / "bf16", *FAST, "--profile", "exact"], capsys)
    assert code == 1 and "max_abs_diff" in err and "(profile exact)" in err


def test_no_manifest_with_the_same_dtypes_gets_exact(tiny_dir, tmp_path):
    # the profile follows from the tensors, not from a manifest (issue 13: the old bf16 fallback let faults pass)
    src = tiny_dir("dense", torch.float32)
    cand = tmp_path / "copy"
    shutil.copytree(src, cand)
    report = nemoconv.verify(src, cand, num_prompts=1, seq_len=8, max_new_tokens=2)
    assert report.passed and report.profile == "exact"
    assert report.profile_reason == "lossless: the same 44 tensors with identical dtypes"
    assert report.to_dict()["summary"]["max_abs_diff"] == 0.0


# ---- bad input: exit 2 with one line -----------------------------------------------------------------


def assert_bad_input(capsys, args, *needles) -> str:
    code, out, err = run_cli(args, capsys)
    lines = err.rstrip("\n").split("\n")
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_different_layer_pattern_is_bad_input(tiny_dir, tmp_path, capsys):
    ref = tiny_dir("dense")                                             # M-M*-M-
    other = tiny_dir("dense", hybrid_override_pattern="M-M-*M-")
    assert_bad_input(capsys, ["verify", ref, other, *FAST], "different networks",
                     "different layer pattern: M-M*-M- vs M-M-*M-")


def test_different_dimensions_are_bad_input(tiny_dir, capsys):
    assert_bad_input(capsys, ["verify", tiny_dir("moe"), tiny_dir("moe", n_routed_experts=4), *FAST],
                     "different n_routed_experts: 8 vs 4")


def test_missing_candidate_is_bad_input(tiny_dir, tmp_path, capsys):
    assert_bad_input(capsys, ["verify", tiny_dir("dense"), tmp_path / "nope"], "no such checkpoint")


def test_report_path_that_is_a_directory_is_bad_input(tiny_dir, tmp_path, capsys):
    src = tiny_dir("dense")
    assert_bad_input(capsys, ["verify", src, src, *FAST, "--report", tmp_path], "is a directory")


def test_cuda_requested_without_cuda_is_bad_input(tiny_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_bad_input(capsys, ["verify", tiny_dir("dense"), tiny_dir("dense"), "--device", "cuda"], "no CUDA device")
