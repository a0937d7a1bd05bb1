"""Conversion between the hf, nemo and max schemes: bit-exact round trips, layouts, shards, manifests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, load_all, read_json, rewrite, run_cli, tree_digest
from safetensors import safe_open

import nemoconv

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from cases import add_fp8_weights  # noqa: E402

KINDS = ["dense", "moe", "latent"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("to", ["nemo", "max"])
def test_round_trip_through_scheme_is_bit_exact(hf_dir, tmp_path, kind, to):
    src = hf_dir(kind, torch.bfloat16)
    nemoconv.convert(src, tmp_path / to, to=to)
    back = nemoconv.convert(tmp_path / to, tmp_path / "back", to="hf")
    assert back["scheme_from"] == to and back["lossless"]
    assert_same_tensors(load_all(src), load_all(tmp_path / "back"))


@pytest.mark.parametrize("kind", KINDS)
def test_scheme_to_scheme_equals_going_through_hf(tiny_dir, tmp_path, kind):
    src = tiny_dir(kind, torch.bfloat16)  # bf16: MAX's router cast is lossless, so all paths agree
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    nemoconv.convert(src, tmp_path / "max", to="max")
    nemoconv.convert(tmp_path / "nemo", tmp_path / "nemo2max", to="max")
    nemoconv.convert(tmp_path / "max", tmp_path / "max2nemo", to="nemo")
    assert_same_tensors(load_all(tmp_path / "max"), load_all(tmp_path / "nemo2max"))
    assert_same_tensors(load_all(tmp_path / "nemo"), load_all(tmp_path / "max2nemo"))


def test_nemo_layout_merges_transposed_experts_and_fp32_mamba_params(hf_dir, tmp_path):
    src = hf_dir("moe", torch.bfloat16)
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    hf, nemo = load_all(src), load_all(tmp_path / "nemo")
    spec = nemoconv.open_checkpoint(src).spec
    e, h, inter = spec.n_routed_experts, spec.hidden_size, spec.moe_intermediate_size
    up = nemo["model.layers.1.mixer.experts.gate_and_up_projs"]
    down = nemo["model.layers.1.mixer.experts.down_projs"]
    assert up.shape == (e, h, inter) and down.shape == (e, inter, h)
    for j in range(e):
        assert torch.equal(up[j], hf[f"backbone.layers.1.mixer.experts.{j}.up_proj.weight"].T)
        assert torch.equal(down[j], hf[f"backbone.layers.1.mixer.experts.{j}.down_proj.weight"].T)
    for p in ("A_log", "D", "dt_bias"):
        t = nemo[f"model.layers.0.mixer._fp32_params.{p}"]
        assert t.dtype == torch.float32
        assert torch.equal(t, hf[f"backbone.layers.0.mixer.{p}"].float())
    assert torch.equal(nemo["model.embed_tokens.weight"], hf["backbone.embeddings.weight"])
    assert torch.equal(nemo["model.norm.weight"], hf["backbone.norm_f.weight"])
    assert not any(k.startswith("backbone.") for k in nemo)


def test_max_layout_fuses_qkv_and_casts_router_and_ssm_params(hf_dir, tmp_path):
    src = hf_dir("moe", torch.float32)
    manifest = nemoconv.convert(src, tmp_path / "max", to="max")
    hf, mx = load_all(src), load_all(tmp_path / "max")
    qkv = mx["blocks.2.mixer.qkv_proj.weight"]
    expected = torch.cat([hf[f"backbone.layers.2.mixer.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    assert "blocks.2.mixer.q_proj.weight" not in mx and torch.equal(mx["blocks.2.mixer.o_proj.weight"],
                                                                     hf["backbone.layers.2.mixer.o_proj.weight"])
    gate = mx["blocks.1.mixer.gate.gate_score.weight"]
    assert gate.dtype == torch.bfloat16
    assert torch.equal(gate, hf["backbone.layers.1.mixer.gate.weight"].bfloat16())
    for name in ("blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.dt_bias", "blocks.0.mixer.norm.weight",
                 "blocks.1.mixer.gate.e_score_correction_bias"):
        assert mx[name].dtype == torch.float32, name
    assert torch.equal(mx["embed_tokens.weight"], hf["backbone.embeddings.weight"])
    # fp32 → bf16 router cast loses bits: reported, per tensor
    assert not manifest["lossless"]
    lossy = {s["tensor"] for s in manifest["lossy_steps"]}
    assert lossy == {"backbone.layers.1.mixer.gate.weight", "backbone.layers.3.mixer.gate.weight",
                     "backbone.layers.5.mixer.gate.weight"}


def test_bf16_source_to_max_is_lossless(hf_dir, tmp_path):
    manifest = nemoconv.convert(hf_dir("moe", torch.bfloat16), tmp_path / "max", to="max")
    assert manifest["lossless"] and manifest["lossy_steps"] == []


def test_sharded_input_and_output_with_valid_index(hf_dir, tmp_path):
    src = hf_dir("moe", torch.bfloat16, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    manifest = nemoconv.convert(src, tmp_path / "nemo", to="nemo", max_shard_size="30KB")
    out = tmp_path / "nemo"
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == manifest["bytes_out"]
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt", "nemoconv_scheme": "nemo"}
            for k in f.keys():
                assert index["weight_map"][k] == shard
            tensors = [f.get_tensor(k) for k in f.keys()]
        # at most --max-shard-size of tensor bytes, unless one tensor alone is larger than that
        assert sum(t.numel() * t.element_size() for t in tensors) <= 30_000 or len(tensors) == 1
    nemoconv.convert(out, tmp_path / "back", to="hf")
    assert_same_tensors(load_all(src), load_all(tmp_path / "back"))


def test_model_prefix_and_singular_embedding_are_read_as_hf(tiny_dir, tmp_path):
    src = tiny_dir("dense")
    variant = tmp_path / "variant"
    variant.mkdir()
    for f in src.iterdir():
        (variant / f.name).write_bytes(f.read_bytes())

    def to_v5_names(t):
        for k in list(t):
            new = k.replace("backbone.", "model.").replace("model.embeddings.", "model.embedding.")
            t[new] = t.pop(k)

    rewrite(variant, to_v5_names)
    ck = nemoconv.open_checkpoint(variant)
    assert ck.scheme == "hf"
    nemoconv.convert(variant, tmp_path / "out", to="hf")
    assert_same_tensors(load_all(src), load_all(tmp_path / "out"))


def test_layers_block_type_config_is_written_back_as_found(hf_dir, tmp_path):
    src = hf_dir("dense", torch.float32)
    assert "layers_block_type" in read_json(src / "config.json")
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    cfg = read_json(tmp_path / "nemo" / "config.json")
    assert cfg == read_json(src / "config.json")


def test_identical_inputs_give_byte_identical_outputs(tiny_dir, tmp_path):
    src = tiny_dir("moe", torch.bfloat16)
    nemoconv.convert(src, tmp_path / "a", to="max", max_shard_size="40KB")
    nemoconv.convert(src, tmp_path / "b", to="max", max_shard_size="40KB")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_manifest_accounts_for_every_tensor(tiny_dir, tmp_path):
    src = tiny_dir("moe")
    manifest = nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    on_disk = read_json(tmp_path / "nemo" / "nemoconv-manifest.json")
    assert on_disk == json.loads(json.dumps(manifest))
    sources = [s for t in manifest["tensors"] for s in t["sources"]]
    assert sorted(sources) == sorted(load_all(src))  # every source tensor used exactly once
    assert {t["name"] for t in manifest["tensors"]} == set(load_all(tmp_path / "nemo"))
    merged = next(t for t in manifest["tensors"] if t["name"].endswith("gate_and_up_projs"))
    assert len(merged["sources"]) == 8


def test_dry_run_writes_nothing_and_lists_lossy_steps(hf_dir, tmp_path, capsys):
    src = hf_dir("moe", torch.float32)
    code, out, err = run_cli(["convert", src, tmp_path / "out", "--to", "max", "--dry-run"], capsys)
    assert code == 0, err
    assert not (tmp_path / "out").exists()
    assert "lossy" in out and "gate.weight" in out and "nothing written" in out
    assert list(tmp_path.iterdir()) == []


def test_dtype_option_casts_and_reports_narrowing(tiny_dir, tmp_path):
    manifest = nemoconv.convert(tiny_dir("dense"), tmp_path / "bf16", to="hf", dtype="bfloat16")
    assert not manifest["lossless"]
    tensors = load_all(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def fp8_quantize_by_hand(directory, modules):
    rewrite(directory, lambda t: add_fp8_weights(t, modules, input_scale=0.02))


def test_fp8_checkpoint_round_trips_and_keeps_fp8_attention_unfused(tiny_dir, tmp_path):
    src = tmp_path / "fp8"
    src.mkdir()
    for f in tiny_dir("moe", torch.bfloat16).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    fp8_quantize_by_hand(src, ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
                               "backbone.layers.2.mixer.q_proj", "backbone.layers.2.mixer.k_proj",
                               "backbone.layers.2.mixer.v_proj"])
    rewrite(src, lambda t: t.update({"backbone.layers.2.mixer.k_proj.k_scale": torch.tensor(1.0),
                                     "backbone.layers.2.mixer.v_proj.v_scale": torch.tensor(1.0)}))
    manifest = nemoconv.convert(src, tmp_path / "max", to="max")
    mx = load_all(tmp_path / "max")
    assert mx["blocks.0.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn
    assert mx["blocks.0.mixer.in_proj.weight_scale"].dtype == torch.float32
    assert "blocks.2.mixer.qkv_proj.weight" not in mx and "blocks.2.mixer.q_proj.weight_scale" in mx
    assert not any(k.endswith(("k_scale", "v_scale")) for k in mx)
    dropped = {s["tensor"] for s in manifest["lossy_steps"] if s["step"] == "drop"}
    assert dropped == {"backbone.layers.2.mixer.k_proj.k_scale", "backbone.layers.2.mixer.v_proj.v_scale"}
    # nemo keeps FP8 tensors and scales as they are (only names change): lossless round trip
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    nemoconv.convert(tmp_path / "nemo", tmp_path / "back", to="hf")
    assert_same_tensors(load_all(src), load_all(tmp_path / "back"))


def test_quantization_exclusions_are_renamed_into_the_target_scheme(tiny_dir, tmp_path):
    src = tmp_path / "q"
    src.mkdir()
    for f in tiny_dir("dense", torch.bfloat16).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    fp8_quantize_by_hand(src, ["backbone.layers.1.mixer.up_proj", "backbone.layers.1.mixer.down_proj"])
    excluded = ["backbone.layers.3.mixer.q_proj", "backbone.layers.3.mixer.k_proj", "backbone.layers.3.mixer.v_proj",
                "backbone.layers.3.mixer.o_proj", "backbone.layers.0.mixer.in_proj", "lm_head"]
    (src / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.47.0"},
         "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": excluded}}))
    cfg = read_json(src / "config.json")
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": excluded}
    (src / "config.json").write_text(json.dumps(cfg))
    nemoconv.convert(src, tmp_path / "max", to="max")
    want = ["blocks.3.mixer.qkv_proj", "blocks.3.mixer.o_proj", "blocks.0.mixer.in_proj", "lm_head"]
    assert read_json(tmp_path / "max" / "hf_quant_config.json")["quantization"]["exclude_modules"] == want
    assert read_json(tmp_path / "max" / "config.json")["quantization_config"]["ignore"] == want
    nemoconv.convert(tmp_path / "max", tmp_path / "back", to="hf")
    assert read_json(tmp_path / "back" / "hf_quant_config.json")["quantization"]["exclude_modules"] == excluded


def test_side_files_are_carried_and_pickles_are_not(tiny_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_dir("dense").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    code, out, err = run_cli(["convert", src, tmp_path / "out", "--to", "nemo"], capsys)
    assert code == 0, err
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "generation_config.json", "config.json", "nemoconv-manifest.json"} <= names
    assert "pytorch_model.bin" not in names and "pytorch_model.bin" in out


def test_biases_that_transformers_writes_are_accepted(hf_dir, tmp_path):
    # use_bias → Mamba in/out biases; mlp_bias → MLP, shared expert and latent projection biases
    src = hf_dir("latent", torch.bfloat16, use_bias=True, mlp_bias=True, hybrid_override_pattern="ME*E-")
    names = set(load_all(src))
    assert {"backbone.layers.0.mixer.in_proj.bias", "backbone.layers.1.mixer.shared_experts.up_proj.bias",
            "backbone.layers.1.mixer.fc1_latent_proj.bias", "backbone.layers.4.mixer.up_proj.bias"} <= names
    for to in ("nemo", "max"):
        nemoconv.convert(src, tmp_path / to, to=to)
        nemoconv.convert(tmp_path / to, tmp_path / f"{to}-back", to="hf")
        assert_same_tensors(load_all(src), load_all(tmp_path / f"{to}-back"))


# ---- the torch-free convert path (issue 2: start-up) ---------------------------------------------------


def test_convert_command_never_imports_torch(tiny_dir, tmp_path):
    """`nemoconv convert` moves bits with numpy: importing torch alone would cost ~1.5 s of start-up."""
    import subprocess

    src = tiny_dir("moe", torch.bfloat16)
    code = (
        "import sys\n"
        "from nemoconv.cli import main\n"
        f"rc = main(['--quiet', 'convert', {str(src)!r}, {str(tmp_path / 'nemo')!r}, '--to', 'nemo'])\n"
        f"rc |= main(['--quiet', 'convert', {str(tmp_path / 'nemo')!r}, {str(tmp_path / 'max')!r}, '--to', 'max'])\n"
        "assert rc == 0, rc\n"
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub', 'rich.table') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert_same_tensors(load_all(tmp_path / "max"), load_all(_converted(src, tmp_path / "direct", "max")))


def _converted(src, out, to):
    nemoconv.convert(src, out, to=to)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("to", ["hf", "nemo", "max"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_and_torch_streams_agree_bit_for_bit(hf_dir, tmp_path, kind, to, dtype):
    """One stream, two array kinds: numpy bits (convert) and torch tensors (model loading, quantize)."""
    from nemoconv.stream.pipeline import stream_converted

    src = hf_dir(kind, dtype)
    if to != "hf":  # and back: splits, unfusions and restores
        src = _converted(src, tmp_path / to, to)
    ck = nemoconv.open_checkpoint(src)
    target = "hf" if to != "hf" else "nemo"
    for cast in (None, "bfloat16", "float32"):
        host = list(stream_converted(ck, to=target, dtype=cast, host=True))
        ref = list(stream_converted(ck, to=target, dtype=cast))
        assert [i.name for i in host] == [i.name for i in ref]
        for h, r in zip(host, ref):
            assert h.tensor.dtype == str(r.tensor.dtype).removeprefix("torch."), h.name
            assert h.tensor.shape == tuple(r.tensor.shape), h.name
            assert h.tensor.bits.tobytes() == r.tensor.contiguous().view(torch.uint8).numpy().tobytes(), h.name


@pytest.mark.parametrize("pair", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16"),
                                  ("float16", "bfloat16"), ("bfloat16", "float16")])
def test_host_casts_round_like_torch(pair):
    """Every cast, NaN, infinities, ties and subnormals included, gives torch's bits."""
    from nemoconv.storage.safetensors_io import HostTensor
    from nemoconv.stream.tensor_ops import _convert_dtype

    src, dst = (getattr(torch, p) for p in pair)
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(4099, generator=g) * 100, torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 3.0e38, 1.00390625, 1.01171875])])
    x = values.to(src)
    bits_t = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    host = HostTensor(pair[0], x.shape, x.view(bits_t).numpy().view(f"u{x.element_size()}"))
    got = _convert_dtype(host, pair[1])
    want = x.to(dst)
    assert got.dtype == pair[1]
    assert got.bits.tobytes() == want.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(64, 48), (5, 7), (3, 32), (32, 3), (1, 16), (0, 16)])
def test_fast_transpose_is_a_transpose(itemsize, shape):
    import numpy as np

    from nemoconv.stream.tensor_ops import _transpose_into

    a = np.arange(int(np.prod(shape)), dtype=f"u{itemsize}").reshape(shape)
    out = np.empty(shape[::-1], dtype=a.dtype)
    _transpose_into(a, out)
    assert (out == a.T).all()
