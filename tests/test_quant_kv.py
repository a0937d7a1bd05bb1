"""quantize --kv-cache fp8: k_scale/v_scale as ModelOpt 0.47 writes them, used by the built-in model."""

from __future__ import annotations

import json

import pytest
import torch

import nemoconv
from tests.helpers import load_all, read_json, run_cli

CALIB = ["--calib-samples", "4", "--calib-seq-len", "32", "--device", "cpu"]
ATTN = "backbone.layers.3.mixer"   # "M-M*-M-"


@pytest.fixture(scope="module")
def kv_pair(tmp_path_factory):
    from nemoconv.data.demo_checkpoint import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("kv")
    src = write_tiny_checkpoint(base / "src", "dense", trained_like=True, seed=7)
    nemoconv.quantize(src, base / "plain", calib_samples=4, calib_seq_len=32, device="cpu")
    nemoconv.quantize(src, base / "kv", calib_samples=4, calib_seq_len=32, device="cpu", kv_cache="fp8")
    return src, base / "plain", base / "kv"


def test_kv_scales_are_written_with_modelopt_names_shapes_and_dtypes(kv_pair):
    _, _, out = kv_pair
    tensors = load_all(out)
    scales = {n: t for n, t in tensors.items() if n.endswith(("k_scale", "v_scale"))}
    assert sorted(scales) == [f"{ATTN}.k_proj.k_scale", f"{ATTN}.v_proj.v_scale"]
    assert all(t.dtype == torch.float32 and t.shape == () and float(t) > 0 for t in scales.values())
    manifest = read_json(out / "nemoconv-manifest.json")["quantization"]["kv_cache"]
    k = manifest["scales"][f"{ATTN}.k_proj.k_scale"]
    assert float(scales[f"{ATTN}.k_proj.k_scale"]) == float(torch.tensor(k["amax"], dtype=torch.float32) / 448)
    assert read_json(out / "hf_quant_config.json")["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert read_json(out / "config.json")["quantization_config"]["kv_cache_scheme"] == \
        {"dynamic": False, "num_bits": 8, "type": "float"}


def test_kv_scale_is_the_amax_of_the_keys_over_calibration(kv_pair):
    src, _, out = kv_pair
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.quant.calibrate import calibration_tokens

    ids = calibration_tokens(open_checkpoint(src), None, 4, 32).ids
    model = nemoconv.load_model(src)
    seen = []
    model.backbone.layers[3].mixer.k_proj.register_forward_hook(lambda m, a, o: seen.append(o.abs().amax()))
    model(ids)
    k_scale = load_all(out)[f"{ATTN}.k_proj.k_scale"]
    assert float(k_scale) == pytest.approx(float(max(seen)) / 448, rel=1e-6)


def test_fp8_kv_model_differs_from_the_plain_one_by_a_small_bounded_amount(kv_pair):
    _, plain, kv = kv_pair
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    a, b = nemoconv.load_model(plain), nemoconv.load_model(kv)
    assert b.backbone.layers[3].mixer.k_scale is not None and a.backbone.layers[3].mixer.k_scale is None
    la, lb = a(ids), b(ids)
    rel = float((la - lb).abs().max() / la.abs().max())
    assert 0 < rel < 0.05
    # its cached decode agrees with its own full forward (the FP8 round trip is the same in every path)
    full = b(ids)
    cache = b.new_cache(2, 48)
    first = b.prefill(ids[:, :40], cache)
    steps = [b.decode_step(ids[:, t], cache) for t in range(40, 48)]
    cached = torch.cat([first, torch.stack(steps, 1)], 1)
    assert float((cached - full).abs().max() / full.abs().max()) < 1e-3


def test_verify_reports_the_fp8_kv_candidate_and_passes(kv_pair, tmp_path, capsys):
    src, _, kv = kv_pair
    report = tmp_path / "v.json"
    code, out, err = run_cli(["verify", src, kv, "--device", "cpu", "--report", report], capsys)
    assert code == 0, err
    assert "FP8 KV cache (2 k_scale/v_scale tensors)" in out
    assert json.loads(report.read_text())["candidate"]["kv_cache_scales"] == 2


def test_max_scheme_drops_kv_scales_and_says_so(kv_pair, tmp_path, capsys):
    src, _, _ = kv_pair
    out = tmp_path / "max"
    code, stdout, err = run_cli(["quantize", src, out, *CALIB, "--kv-cache", "fp8", "--to", "max"], capsys)
    assert code == 0, err
    assert not any(n.endswith(("k_scale", "v_scale")) for n in load_all(out))
    assert read_json(out / "hf_quant_config.json")["quantization"]["kv_cache_quant_algo"] is None
    assert "max scheme drops KV-cache scales" in " ".join(stdout.split())


def test_kv_cache_fp8_needs_an_attention_layer(tiny_dir, tmp_path, capsys):
    src = tiny_dir("dense", hybrid_override_pattern="M-M-")
    code, _, err = run_cli(["quantize", src, tmp_path / "q", *CALIB, "--kv-cache", "fp8"], capsys)
    assert code == 2 and "no attention layer" in err
    assert not (tmp_path / "q").exists()
