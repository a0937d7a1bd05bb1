"""`nemoconv quantize`: presets, pairs, exclusion lists, the exact FP8 file format (as vLLM and MAX parse it),
layer-by-layer calibration, errors, and the parity gate on tiny checkpoints."""

from __future__ import annotations

import fnmatch
import json
import re
import weakref
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, excluded_modules, load_all, read_json, run_cli, tree_digest
from safetensors.torch import load_file, save_file

import nemoconv
from nemoconv import settings
from nemoconv.cli.render_quantize import render_summary
from nemoconv.commands.quantize import quantize
from nemoconv.data.calib_data import CALIBRATION_TEXTS
from nemoconv.data.demo_checkpoint import write_tiny_checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.quant import calibrate, observers

FAST = dict(calib_samples=4, calib_seq_len=16, device="cpu", calibrator="builtin")
FP8 = torch.float8_e4m3fn


def conditioned_checkpoint(directory: Path, kind: str, seed: int = 0) -> Path:
    """A tiny bf16 checkpoint conditioned like a trained network (see random_tensors' `trained_like`)."""
    return write_tiny_checkpoint(directory, kind, dtype=torch.bfloat16, seed=seed, trained_like=True)


def word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json over the built-in calibration text, ids < 256 (the tiny vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for text in CALIBRATION_TEXTS for w in text.split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words[:255])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Factory of bf16 tiny checkpoints (cached per kind)."""
    cache = {}

    def make(kind: str = "dense") -> Path:
        if kind not in cache:
            cache[kind] = write_tiny_checkpoint(tmp_path_factory.mktemp(kind) / "src", kind, dtype=torch.bfloat16)
        return cache[kind]

    return make


def weight_modules(tensors: dict) -> set[str]:
    return {n[: -len(".weight")] for n, t in tensors.items() if n.endswith(".weight") and t.dim() >= 2}


# ---- presets and pairs -----------------------------------------------------------------------------


def test_default_preset_quantizes_mamba_and_mlp_projections(src, tmp_path):
    result = quantize(src("dense"), tmp_path / "out", **FAST)
    t = load_all(tmp_path / "out")
    fp8 = sorted(n[: -len(".weight")] for n, v in t.items() if v.dtype == FP8)
    # dense pattern M-M*-M-: Mamba layers 0, 2, 5; MLP layers 1, 4, 6; attention layer 3
    expected = sorted([f"backbone.layers.{i}.mixer.{p}" for i in (0, 2, 5) for p in ("in_proj", "out_proj")]
                      + [f"backbone.layers.{i}.mixer.{p}" for i in (1, 4, 6) for p in ("up_proj", "down_proj")])
    assert fp8 == expected
    assert sorted(result["quantization"]["targets"]) == expected
    assert not any(v.dtype == FP8 for n, v in t.items() if "q_proj" in n or "lm_head" in n or "conv1d" in n)


def test_conservative_quantizes_mlp_only_and_aggressive_adds_experts(src, tmp_path):
    quantize(src("dense"), tmp_path / "c", preset="conservative", **FAST)
    fp8 = {n for n, v in load_all(tmp_path / "c").items() if v.dtype == FP8}
    assert fp8 and all(re.search(r"mixer\.(up|down)_proj\.weight$", n) for n in fp8)

    quantize(src("latent"), tmp_path / "a", preset="aggressive", **FAST)
    fp8 = {n for n, v in load_all(tmp_path / "a").items() if v.dtype == FP8}
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in fp8
    assert "backbone.layers.1.mixer.shared_experts.up_proj.weight" in fp8
    assert "backbone.layers.0.mixer.in_proj.weight" in fp8
    # never: router gate, latent projections, attention
    assert not fp8 & {"backbone.layers.1.mixer.gate.weight", "backbone.layers.1.mixer.fc1_latent_proj.weight",
                      "backbone.layers.1.mixer.fc2_latent_proj.weight", "backbone.layers.2.mixer.q_proj.weight"}


def test_preset_selecting_nothing_is_an_error(src, tmp_path):
    # the moe kind (ME*EME) has no dense MLP layer: conservative has nothing to do
    with pytest.raises(NemoconvError, match="nothing to quantize"):
        quantize(src("moe"), tmp_path / "out", preset="conservative", **FAST)
    assert not (tmp_path / "out").exists()


def test_excluding_one_projection_excludes_its_pair_and_says_so(src, tmp_path):
    from rich.console import Console

    result = quantize(src("dense"), tmp_path / "out", exclude=["backbone.layers.2.mixer.in_proj"], **FAST)
    t = load_all(tmp_path / "out")
    assert t["backbone.layers.2.mixer.in_proj.weight"].dtype == torch.bfloat16
    assert t["backbone.layers.2.mixer.out_proj.weight"].dtype == torch.bfloat16
    assert "backbone.layers.2.mixer.out_proj.weight_scale" not in t
    assert t["backbone.layers.0.mixer.out_proj.weight"].dtype == FP8
    reasons = {e["module"]: e["reason"] for e in result["quantization"]["excluded"]}
    assert reasons == {"backbone.layers.2.mixer.in_proj": "--exclude", "backbone.layers.2.mixer.out_proj": "pair"}
    console = Console(record=True, width=200)
    render_summary(result, console)
    text = console.export_text()
    assert "excluded with their pair: 1" in text and "kept with backbone.layers.2.mixer.in_proj" in text


def test_exclude_globs_in_the_output_schemes_names(src, tmp_path):
    quantize(src("dense"), tmp_path / "out", to="max", exclude=["blocks.4.mixer.*"], **FAST)
    t = load_all(tmp_path / "out")
    assert t["blocks.4.mixer.up_proj.weight"].dtype == torch.bfloat16
    assert t["blocks.4.mixer.down_proj.weight"].dtype == torch.bfloat16
    assert t["blocks.1.mixer.down_proj.weight"].dtype == FP8


def test_exclude_matching_no_module_is_an_error(src, tmp_path):
    with pytest.raises(NemoconvError, match="matches no module"):
        quantize(src("dense"), tmp_path / "out", exclude=["backbone.layers.99.*"], **FAST)


# ---- the file format -------------------------------------------------------------------------------


def test_tensors_are_modelopt_fp8_with_0d_float32_scales(src, tmp_path):
    result = quantize(src("dense"), tmp_path / "out", **FAST)
    source = load_all(src("dense"))
    t = load_all(tmp_path / "out")
    assert not any(v.dtype == torch.uint8 for v in t.values())  # MAX reads U8 as FP4
    modules = result["quantization"]["modules"]
    for module, rec in modules.items():
        w = source[module + ".weight"]
        q, ws, ins = t[module + ".weight"], t[module + ".weight_scale"], t[module + ".input_scale"]
        assert q.dtype == FP8 and q.shape == w.shape
        assert ws.dtype == ins.dtype == torch.float32 and ws.shape == ins.shape == torch.Size([])
        amax = w.abs().max().float()
        assert ws.item() == (amax / 448.0).item() == rec["weight_scale"]
        # the quotient in the weight's own dtype (bf16), clamped, cast: what ModelOpt's export does
        expected = (w / ws).clamp(-448, 448).to(FP8)
        assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
        assert ins.item() == (torch.tensor(rec["input_amax"], dtype=torch.float32) / 448.0).item() > 0
        assert q.float().abs().max() <= 448
    # everything else is the source's bytes
    for name, v in source.items():
        if name[: -len(".weight")] not in modules:
            assert torch.equal(v.view(torch.uint8), t[name].view(torch.uint8)), name


def test_quant_configs_name_every_unquantized_linear_exactly(src, tmp_path):
    quantize(src("latent"), tmp_path / "out", preset="aggressive", **FAST)
    t = load_all(tmp_path / "out")
    hq = read_json(tmp_path / "out" / "hf_quant_config.json")
    assert hq == {"producer": {"name": "nemoconv", "version": nemoconv.__version__},
                  "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                                   "exclude_modules": hq["quantization"]["exclude_modules"]}}
    excluded = hq["quantization"]["exclude_modules"]
    quantized = {n[: -len(".weight_scale")] for n in t if n.endswith(".weight_scale")}
    assert excluded_modules(excluded, weight_modules(t)) == weight_modules(t) - quantized
    assert len(set(excluded)) == len(excluded)
    assert "lm_head" in excluded and "backbone.layers.1.mixer.gate" in excluded
    assert all(e.endswith((".*", "experts*")) or "*" not in e or e == "backbone.layers.*.mixer.conv1d"
               for e in excluded)  # no bare prefixes (vLLM also matches by substring)
    qc = read_json(tmp_path / "out" / "config.json")["quantization_config"]
    assert qc == {"config_groups": {"group_0": {
        "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
        "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}},
        "ignore": excluded, "quant_algo": "FP8", "producer": {"name": "nemoconv", "version": nemoconv.__version__},
        "quant_method": "modelopt"}


def test_max_output_names_exclusions_in_max_names_with_fused_qkv(src, tmp_path):
    quantize(src("moe"), tmp_path / "out", to="max", **FAST)
    t = load_all(tmp_path / "out")
    excluded = read_json(tmp_path / "out" / "hf_quant_config.json")["quantization"]["exclude_modules"]
    assert read_json(tmp_path / "out" / "config.json")["quantization_config"]["ignore"] == excluded
    assert "blocks.2.mixer.qkv_proj" in excluded and "blocks.2.mixer.o_proj" in excluded
    assert "blocks.1.mixer.gate.gate_score" in excluded and "embed_tokens" in excluded
    assert not any(e.startswith("backbone.") or e.endswith(("q_proj", "k_proj", "v_proj")) and "qkv" not in e
                   for e in excluded)
    quantized = {n[: -len(".weight_scale")] for n in t if n.endswith(".weight_scale")}
    assert set(excluded) == weight_modules(t) - quantized
    assert t["blocks.0.mixer.in_proj.weight"].dtype == FP8 and t["blocks.0.mixer.in_proj.input_scale"].dim() == 0


def vllm_is_layer_excluded(prefix: str, exclude_modules: list[str], stack_qkv: bool) -> bool:
    """vLLM's decision for one layer of a ModelOpt FP8 checkpoint, mirrored from its modelopt.py
    (`is_layer_excluded` after `apply_vllm_mapper` with nemotron_h's WeightsMapper) and
    quant_utils.is_layer_skipped. `stack_qkv`: whether the mapper also renames q/k/v to qkv_proj."""
    mapped = []
    for e in exclude_modules:  # nemotron_h's hf_to_vllm_mapper: backbone → model, mtp dropped
        if e.startswith("mtp"):
            continue
        e = re.sub(r"^backbone", "model", e).replace("embeddings", "embed_tokens")
        if stack_qkv:
            e = re.sub(r"\.[qkv]_proj$", ".qkv_proj", e)
        if e not in mapped:
            mapped.append(e)
    if prefix.endswith(".qkv_proj"):  # a fused layer: every shard must agree
        shards = {prefix.replace("qkv_proj", s) in mapped for s in ("q_proj", "k_proj", "v_proj")}
        assert len(shards) == 1, f"vLLM would refuse {prefix}: some but not all shards excluded"
        skipped = shards.pop()
    elif "experts" in prefix:
        skipped = any(prefix in e for e in mapped if "experts" in e)
    else:
        skipped = prefix in mapped
    if skipped:
        return True
    if any(e != prefix and e in prefix for e in mapped):  # substring matching: why bare prefixes are wrong
        return True
    return any(fnmatch.fnmatch(prefix, e) for e in mapped)


@pytest.mark.parametrize("kind,preset", [("dense", "default"), ("moe", "default"), ("moe", "aggressive"),
                                         ("latent", "aggressive")])
def test_vllm_quantizes_exactly_the_fp8_modules(src, tmp_path, kind, preset):
    quantize(src(kind), tmp_path / "out", preset=preset, **FAST)
    t = load_all(tmp_path / "out")
    excluded = read_json(tmp_path / "out" / "hf_quant_config.json")["quantization"]["exclude_modules"]
    fp8 = {n[: -len(".weight")] for n, v in t.items() if v.dtype == FP8}
    # vLLM's layers: q/k/v fused, routed experts one FusedMoE per layer
    layers: dict[str, set[str]] = {}
    for module in weight_modules(t) - {m for m in weight_modules(t) if m.startswith("mtp.")}:
        if "embeddings" in module or module.endswith("conv1d"):
            continue
        v = re.sub(r"^backbone", "model", module)
        v = re.sub(r"\.[qkv]_proj$", ".qkv_proj", v)
        v = re.sub(r"\.experts\.\d+\.(up|down)_proj$", ".experts", v)
        layers.setdefault(v, set()).add(module)
    for layer, members in layers.items():
        quantized = {m in fp8 for m in members}
        assert len(quantized) == 1, f"{layer} mixes FP8 and bf16 members"
        fp8_layer = quantized.pop()
        for stack in (False, True):
            assert vllm_is_layer_excluded(layer, excluded, stack) == (not fp8_layer), layer
    for module in fp8:  # what vLLM's FP8 linear / MoE method loads for each quantized module
        assert t[module + ".weight_scale"].dtype == torch.float32 and t[module + ".weight_scale"].numel() == 1
        assert t[module + ".input_scale"].dtype == torch.float32 and t[module + ".input_scale"].numel() == 1


@pytest.mark.parametrize("kind,preset", [("dense", "default"), ("moe", "aggressive"), ("latent", "aggressive")])
def test_max_reads_every_fp8_mixer_whole(src, tmp_path, kind, preset):
    """MAX (populate_fp8_layers) marks a mixer FP8 when any projection has a weight_scale and then loads all
    of its projections (Mamba in/out, MLP up/down, MoE routed + shared experts) as FP8."""
    quantize(src(kind), tmp_path / "out", to="max", preset=preset, exclude=["blocks.0.mixer.out_proj"], **FAST)
    t = load_all(tmp_path / "out")
    fp8_layers = {int(n.split(".")[1]) for n in t if n.startswith("blocks.") and n.endswith(".weight_scale")}
    assert 0 not in fp8_layers  # excluding out_proj took in_proj along
    for i in fp8_layers:
        projections = [n for n in t if n.startswith(f"blocks.{i}.mixer.") and re.search(
            r"(in_proj|out_proj|up_proj|down_proj)\.weight$", n)]
        assert projections and all(t[p].dtype == FP8 for p in projections), i
        for p in projections:
            base = p[: -len(".weight")]
            assert t[base + ".weight_scale"].dtype == t[base + ".input_scale"].dtype == torch.float32
            assert t[base + ".weight_scale"].shape in (torch.Size([]), torch.Size([1]))
    assert not any(v.dtype == torch.uint8 for v in t.values())


# ---- calibration -----------------------------------------------------------------------------------


def test_calibration_holds_one_layer_at_a_time(src, tmp_path, monkeypatch):
    built = calibrate._build_block
    alive: list = []
    peak = []

    def tracking(*args, **kwargs):
        block = built(*args, **kwargs)
        live = [r for r in alive if r() is not None and any(not p.is_meta for p in r().parameters())]
        peak.append(len(live))
        alive.append(weakref.ref(block))
        return block

    monkeypatch.setattr(calibrate, "_build_block", tracking)
    quantize(src("moe"), tmp_path / "out", preset="aggressive", **FAST)
    assert len(peak) == 6 and max(peak) == 0  # every earlier layer was released before the next was built


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_input_amax_is_the_max_over_all_calibration_batches(src, tmp_path, kind, monkeypatch):
    """Recompute with the whole model: the amax at each target's input over the same token ids (routed
    experts: over the tokens routed to them), here in three micro-batches of two sequences."""
    from nemoconv.model.fp8 import Linear

    monkeypatch.setitem(calibrate.TOKENS_PER_BATCH, "cpu", 48)
    result = quantize(src(kind), tmp_path / "out", preset="aggressive", calib_samples=6, calib_seq_len=24,
                      device="cpu", calibrator="builtin")
    ck = nemoconv.open_checkpoint(src(kind))
    ids = calibrate.calibration_tokens(ck, None, 6, 24).ids
    model = nemoconv.load_model(src(kind))
    seen: dict[str, float] = {}
    rows: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            def hook(m, a, n=name):
                seen[n] = max(seen.get(n, 0.0), float(a[0].abs().max()))
                rows[n] = rows.get(n, 0) + a[0].shape[0] * (a[0].shape[1] if a[0].dim() == 3 else 1)
            mod.register_forward_pre_hook(hook)
    for rows_ in ids.split(2):  # batched as calibration ran it (another batching moves float32 sums by an ulp)
        model(rows_)
    modules = result["quantization"]["modules"]
    assert modules
    assert result["quantization"]["calibration"]["micro_batch_sequences"] == 2
    for module, rec in modules.items():
        if rec.get("input_amax_filled"):
            continue
        assert rec["input_amax"] == seen[module], module
        assert rec["calibration_tokens"] == rows[module], module


def test_mtp_heads_are_never_quantized_and_are_excluded_by_name(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "src", "latent", dtype=torch.bfloat16, num_nextn_predict_layers=1,
                                   mtp_hybrid_override_pattern="*E")
    for to in ("hf", "max"):
        quantize(source, tmp_path / to, preset="aggressive", to=to, **FAST)
        t = load_all(tmp_path / to)
        excluded = read_json(tmp_path / to / "hf_quant_config.json")["quantization"]["exclude_modules"]
        mtp = {m for m in weight_modules(t) if m.startswith("mtp.")}
        assert mtp and mtp <= excluded_modules(excluded, weight_modules(t))
        assert "mtp.layers.1.mixer.experts.0.up_proj" in mtp and "mtp.layers.0.eh_proj" in mtp
        assert not any(v.dtype == FP8 for n, v in t.items() if n.startswith("mtp."))


def test_idle_experts_take_the_largest_amax_of_their_layer(src, tmp_path):
    # one calibration token: each MoE layer routes it to 2 of its 8 experts
    result = quantize(src("moe"), tmp_path / "out", preset="aggressive", calib_samples=1, calib_seq_len=1,
                      device="cpu", calibrator="builtin")
    modules = result["quantization"]["modules"]
    for layer in (1, 3, 5):
        for proj in ("up_proj", "down_proj"):
            experts = {j: modules[f"backbone.layers.{layer}.mixer.experts.{j}.{proj}"] for j in range(8)}
            used = [e["input_amax"] for e in experts.values() if e["calibration_tokens"] > 0]
            idle = [e for e in experts.values() if e["calibration_tokens"] == 0]
            assert len(used) == 2 and len(idle) == 6
            assert all(e["input_amax"] == max(used) and "input_amax_filled" in e for e in idle)
    assert any("no calibration token" in n for n in result["quantization"]["notes"])
    t = load_all(tmp_path / "out")
    assert all(t[f"backbone.layers.1.mixer.experts.{j}.up_proj.input_scale"] > 0 for j in range(8))


def test_calibration_text_file_through_the_tokenizer(src, tmp_path):
    ckpt = tmp_path / "src"
    ckpt.mkdir()
    for p in src("dense").iterdir():
        (ckpt / p.name).write_bytes(p.read_bytes())
    word_tokenizer(ckpt / "tokenizer.json")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIBRATION_TEXTS[:3]) + "\n")
    result = quantize(ckpt, tmp_path / "out", calib_file=calib, **FAST)
    info = result["quantization"]["calibration"]
    assert info["kind"] == "file" and info["tokens"] == 64 and not info["cycled"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    # no file: the built-in text goes through the same tokenizer; it is short, so it is cycled
    result = quantize(ckpt, tmp_path / "builtin", calib_samples=64, calib_seq_len=64, device="cpu",
                      calibrator="builtin")
    info = result["quantization"]["calibration"]
    assert info["kind"] == "builtin-text" and info["cycled"] and info["distinct_tokens"] < 64 * 64
    assert any("cycled" in n for n in result["quantization"]["notes"])


def test_calibration_jsonl_ids_and_text_without_tokenizer(src, tmp_path):
    ids_file = tmp_path / "calib.jsonl"
    ids_file.write_text("\n".join(json.dumps({"input_ids": list(range(k, k + 40))}) for k in range(3)) + "\n")
    result = quantize(src("dense"), tmp_path / "out", calib_file=ids_file, **FAST)
    assert result["quantization"]["calibration"]["kind"] == "file"
    text = tmp_path / "calib.txt"
    text.write_text("plain text needs a tokenizer\n")
    with pytest.raises(NemoconvError, match="needs a tokenizer.json"):
        quantize(src("dense"), tmp_path / "out2", calib_file=text, **FAST)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 999]}\n')
    with pytest.raises(NemoconvError, match="outside the model's vocabulary"):
        quantize(src("dense"), tmp_path / "out3", calib_file=bad, **FAST)


# ---- errors ----------------------------------------------------------------------------------------


def edited_copy(source: Path, directory: Path, edit) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_nan_weight_is_exit_2_with_no_output(src, tmp_path, capsys):
    def poison(t):
        t["backbone.layers.1.mixer.up_proj.weight"][3, 5] = float("nan")

    bad = edited_copy(src("dense"), tmp_path / "bad", poison)
    code, out, err = run_cli(["quantize", bad, tmp_path / "out", "--calib-samples", "2", "--calib-seq-len", "8",
                              "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "backbone.layers.1.mixer.up_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_infinite_activations_are_an_error(src, tmp_path):
    def overflow(t):
        t["backbone.embeddings.weight"][:, 0] = float("inf")

    bad = edited_copy(src("dense"), tmp_path / "bad", overflow)
    with pytest.raises(NemoconvError, match="NaN/Inf"):
        quantize(bad, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_already_quantized_source_is_refused(src, tmp_path):
    quantize(src("dense"), tmp_path / "fp8", **FAST)
    with pytest.raises(NemoconvError, match="already quantized"):
        quantize(tmp_path / "fp8", tmp_path / "again", **FAST)


@pytest.mark.parametrize("kwargs,message", [
    (dict(preset="extreme"), "--preset"), (dict(to="nemo"), "--to"), (dict(calib_samples=0), "--calib-samples"),
    (dict(device="tpu"), "--device"), (dict(calibrator="other"), "calibrator")])
def test_bad_arguments_are_one_line_errors(src, tmp_path, kwargs, message):
    args = {**FAST, **kwargs}
    with pytest.raises(NemoconvError, match=message):
        quantize(src("dense"), tmp_path / "out", **args)


def test_existing_output_is_refused_before_calibration(src, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    monkeypatch.setattr(calibrate, "run_calibration", lambda *a, **k: pytest.fail("calibrated anyway"))
    with pytest.raises(NemoconvError, match="not empty"):
        quantize(src("dense"), tmp_path / "out", **FAST)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


# ---- outputs as a whole ----------------------------------------------------------------------------


def test_same_inputs_give_byte_identical_outputs(src, tmp_path):
    quantize(src("moe"), tmp_path / "a", preset="aggressive", **FAST)
    quantize(src("moe"), tmp_path / "b", preset="aggressive", **FAST)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_any_source_scheme_gives_the_same_fp8_tensors(src, tmp_path):
    nemoconv.convert(src("moe"), tmp_path / "nemo", to="nemo")
    nemoconv.convert(src("moe"), tmp_path / "max", to="max")
    quantize(src("moe"), tmp_path / "q-hf", preset="aggressive", **FAST)
    expected = load_all(tmp_path / "q-hf")
    for name in ("nemo", "max"):  # streamed in another order, so compare tensors, not file bytes
        quantize(tmp_path / name, tmp_path / f"q-{name}", preset="aggressive", **FAST)
        assert_same_tensors(load_all(tmp_path / f"q-{name}"), expected)


def test_manifest_records_the_quantization(src, tmp_path):
    quantize(src("dense"), tmp_path / "out", exclude=["*.layers.5.*"], **FAST)
    m = read_json(tmp_path / "out" / "nemoconv-manifest.json")
    q = m["quantization"]
    assert m["lossless"] is False and m["scheme_to"] == "hf"
    assert {s["step"] for s in m["lossy_steps"]} == {"quantize"} and len(m["lossy_steps"]) == len(q["targets"])
    assert q["preset"] == "default" and q["calibration"]["samples"] == 4 and q["calibration"]["seq_len"] == 16
    assert q["calibration"]["kind"] == "random"
    assert {e["module"]: e["reason"] for e in q["excluded"]} == {
        "backbone.layers.5.mixer.in_proj": "--exclude", "backbone.layers.5.mixer.out_proj": "--exclude"}
    rec = q["modules"]["backbone.layers.1.mixer.up_proj"]
    assert rec["input_amax"] > 0 and rec["weight_amax"] > 0
    entries = {t["name"]: t for t in m["tensors"]}
    assert entries["backbone.layers.1.mixer.up_proj.weight"]["cast_from"] == {"dtype": "bfloat16", "by": "quantize"}
    assert entries["backbone.layers.1.mixer.up_proj.input_scale"]["from"] == "calibration"
    assert set(entries) == set(load_all(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "FP8 E4M3 per-tensor static" in card and "fp8" in card


def test_cli_quantize_prints_the_summary(src, tmp_path, capsys):
    code, out, err = run_cli(["quantize", src("dense"), tmp_path / "out", "--calib-samples", "2",
                              "--calib-seq-len", "8", "--device", "cpu", "--to", "max",
                              "--exclude", "backbone.layers.1.mixer.up_proj"], capsys)
    assert code == 0, err
    assert "quantized 10 linears" in out and "excluded with their pair: 1" in out and "calibration: 2 × 8" in out
    assert (tmp_path / "out" / "hf_quant_config.json").is_file()


# ---- the parity gate -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,preset,to", [("dense", "default", "hf"), ("moe", "default", "max"),
                                            ("latent", "aggressive", "hf")])
def test_output_loads_in_the_builtin_model_and_passes_verify(tmp_path, kind, preset, to):
    source = conditioned_checkpoint(tmp_path / "src", kind)
    quantize(source, tmp_path / "fp8", preset=preset, to=to, calib_samples=8, calib_seq_len=32, device="cpu")
    model = nemoconv.load_model(tmp_path / "fp8")
    assert any(getattr(m, "quantized", False) for m in model.modules())
    report = nemoconv.verify(source, tmp_path / "fp8", profile="fp8", device="cpu", num_prompts=4, seq_len=32,
                             max_new_tokens=8)
    assert report.passed, report.failure_line()
    assert report.summary()["max_abs_diff"] > 0  # FP8 did change the logits


def test_raw_demo_checkpoints_are_too_chaotic_for_the_fp8_gate(src, tmp_path):
    """Documents why the parity test above conditions its checkpoints: on the raw random moe network,
    rounding the weights of a single Mamba in_proj to FP8 (no activation quantization) already moves
    some positions' logits far apart."""
    from nemoconv.model.fp8 import quantize_fp8

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = nemoconv.load_model(src("moe"))
    model = nemoconv.load_model(src("moe"))
    lin = model.get_submodule("backbone.layers.0.mixer.in_proj")
    scale = lin.weight.float().abs().max() / 448
    lin.weight = torch.nn.Parameter(quantize_fp8(lin.weight, scale).float() * scale, requires_grad=False)
    cos = torch.nn.functional.cosine_similarity(ref(ids), model(ids), dim=-1)
    assert cos.min() < 0.9


def test_environment_chooses_the_calibrator_behind_auto(src, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "current", settings.Settings.from_environ)  # read at each use, not once
    monkeypatch.setenv("NEMOCONV_CALIBRATOR", "builtin")
    result = quantize(src("dense"), tmp_path / "out", calib_samples=2, calib_seq_len=8, device="cpu")
    assert result["quantization"]["calibration"]["calibrator"].startswith("nemoconv")
    monkeypatch.setenv("NEMOCONV_CALIBRATOR", "fastest")
    with pytest.raises(NemoconvError, match="calibrator must be"):
        quantize(src("dense"), tmp_path / "out2", calib_samples=2, calib_seq_len=8, device="cpu")


# ---- the calibrator: chosen by --calibrator, shown in the summary, recorded in the manifest ---------------


def _no_modelopt(monkeypatch):
    monkeypatch.delenv("NEMOCONV_CALIBRATOR", raising=False)
    monkeypatch.setattr(observers, "modelopt_status", lambda: (None, "not importable (ModuleNotFoundError: No "
                                                                    "module named 'requests')"))


def test_cli_calibrator_builtin_is_shown_and_recorded(src, tmp_path, capsys):
    code, out, err = run_cli(["quantize", src("dense"), tmp_path / "out", "--calib-samples", "2",
                              "--calib-seq-len", "8", "--device", "cpu", "--calibrator", "builtin"], capsys)
    assert code == 0, err
    assert "calibrator: nemoconv (forward pre-hooks, running max)" in out
    calibration = read_json(tmp_path / "out" / "nemoconv-manifest.json")["quantization"]["calibration"]
    assert calibration["calibrator_used"] == "builtin"


def test_cli_calibrator_auto_without_modelopt_says_it_fell_back(src, tmp_path, capsys, monkeypatch):
    _no_modelopt(monkeypatch)
    code, out, err = run_cli(["quantize", src("dense"), tmp_path / "out", "--calib-samples", "2",
                              "--calib-seq-len", "8", "--device", "cpu"], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if "calibrator:" in line)
    assert "nvidia-modelopt not importable" in line and "nemoconv[modelopt]" in line
    calibration = read_json(tmp_path / "out" / "nemoconv-manifest.json")["quantization"]["calibration"]
    assert calibration["calibrator_used"] == "builtin"


def test_cli_calibrator_modelopt_without_modelopt_is_refused(src, tmp_path, capsys, monkeypatch):
    _no_modelopt(monkeypatch)
    code, out, err = run_cli(["quantize", src("dense"), tmp_path / "out", "--calib-samples", "2",
                              "--calib-seq-len", "8", "--device", "cpu", "--calibrator", "modelopt"], capsys)
    assert code == 2 and "calibrator 'modelopt' requested" in err and "requests" in err
    assert not (tmp_path / "out").exists()


def test_modelopt_extra_pins_the_version_and_what_its_import_needs():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["modelopt"] == ["nvidia-modelopt==0.47.0", "requests"]
