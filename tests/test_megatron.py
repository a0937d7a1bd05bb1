"""The `megatron` scheme: Megatron-core torch_dist checkpoints read and written with torch alone."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, load_all, tree_digest

from nemoconv.commands.convert import convert
from nemoconv.errors import NemoconvError
from nemoconv.storage.megatron.config import hf_config_from_megatron, split_layer_pattern
from nemoconv.stream.pipeline import iter_tensors

REPO = Path(__file__).resolve().parents[1]
MTP = {"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E"}
LAYOUTS = {"dense": ("dense", {}), "moe": ("moe", {}), "latent": ("latent", {}), "mtp": ("moe", MTP)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "nemoconv.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def megatron_dir(tiny_dir, tmp_path_factory):
    """Factory: (layout) → (hf source, megatron conversion of it), cached."""
    cache: dict = {}

    def make(layout: str):
        if layout not in cache:
            kind, overrides = LAYOUTS[layout]
            src = tiny_dir(kind, dtype=torch.bfloat16, **overrides)
            out = tmp_path_factory.mktemp(f"mg-{layout}") / "mg"
            convert(src, out, to="megatron")
            cache[layout] = (src, out)
        return cache[layout]

    return make


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_megatron_hf_round_trip_is_bit_exact(megatron_dir, layout, tmp_path):
    src, mg = megatron_dir(layout)
    manifest = convert(mg, tmp_path / "back", to="hf")
    assert manifest["scheme_from"] == "megatron" and manifest["lossless"]
    assert_same_tensors(load_all(src), load_all(tmp_path / "back"))


def test_torch_dcp_loads_what_we_write_bit_exactly(megatron_dir):
    import torch.distributed.checkpoint as dcp

    _, mg = megatron_dir("moe")
    metadata = dcp.FileSystemReader(mg).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(mg), no_dist=True)
    from nemoconv.checkpoint.local import open_checkpoint

    ck = open_checkpoint(mg)
    assert set(state) == set(ck.entries)
    for name, t in iter_tensors(ck, to="megatron", prefetch=0):
        assert torch.equal(t.view(torch.uint8), state[name].view(torch.uint8)), name


def test_megatron_keys_and_layouts_are_megatron_cores(megatron_dir):
    from nemoconv.checkpoint.local import open_checkpoint

    _, mg = megatron_dir("mtp")
    ck = open_checkpoint(mg)
    e, spec = ck.entries, ck.spec
    assert json.loads((mg / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert e["decoder.layers.1.mlp.experts.linear_fc1.weight"].shape == (spec.n_routed_experts,
                                                                         spec.moe_intermediate_size, spec.hidden_size)
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in e
    assert "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight" in e
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in e
    assert {f"decoder.layers.0.mixer.in_proj.weight.{p}" for p in "z x B C dt".split()} <= set(e)
    assert {f"decoder.layers.0.mixer.conv1d.bias.{p}" for p in "xBC"} <= set(e)
    assert e["decoder.layers.0.mixer.A_log"].dtype_name == "float32"
    assert e["decoder.layers.1.mlp.router.expert_bias"].dtype_name == "float32"
    assert "mtp.layers.0.enorm.weight" in e and "mtp.layers.0.final_layernorm.weight" in e
    assert "mtp.layers.0.mtp_model_layer.layers.1.mlp.experts.linear_fc2.weight" in e


def test_qkv_is_interleaved_per_kv_group(megatron_dir):
    from nemoconv.checkpoint.local import open_checkpoint

    src, mg = megatron_dir("dense")
    hf, spec = load_all(src), open_checkpoint(src).spec
    i = spec.layer_codes.index("*")
    q, k, v = (hf[f"backbone.layers.{i}.mixer.{p}_proj.weight"] for p in "qkv")
    groups, d = spec.num_key_value_heads, spec.head_dim
    per_group = spec.num_attention_heads // groups
    expected = []
    for g in range(groups):  # Megatron's order: the group's q heads, then its k head, then its v head
        expected += [q[(g * per_group + h) * d:(g * per_group + h + 1) * d] for h in range(per_group)]
        expected += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    fused = dict(iter_tensors(open_checkpoint(mg), to="megatron", prefetch=0))
    assert torch.equal(fused[f"decoder.layers.{i}.self_attention.linear_qkv.weight"], torch.cat(expected))


def test_verify_exact_passes_hf_against_megatron(megatron_dir):
    src, mg = megatron_dir("moe")
    result = _cli("verify", str(src), str(mg), "--profile", "exact", "--num-prompts", "2", "--seq-len", "8",
                  "--max-new-tokens", "2", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr


def _evil_metadata(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"state_dict_metadata": Evil()})


def test_metadata_with_a_forbidden_class_is_refused_and_runs_nothing(megatron_dir, tmp_path):
    _, mg = megatron_dir("dense")
    bad = tmp_path / "bad"
    shutil.copytree(mg, bad)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(_evil_metadata(marker))
    result = _cli("convert", str(bad), str(tmp_path / "out"), "--to", "hf")
    assert result.returncode == 2
    assert "system" in result.stderr and "refusing" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_tensor_item_with_a_forbidden_class_is_refused(tmp_path):
    from nemoconv.storage.megatron.restricted import load_tensor_record

    marker = tmp_path / "pwned"
    with pytest.raises(NemoconvError, match="refusing"):
        load_tensor_record(_evil_metadata(marker), "item")
    assert not marker.exists()


def test_training_layout_picks_latest_iteration_or_the_one_asked(megatron_dir, tmp_path):
    src, mg = megatron_dir("dense")
    run = tmp_path / "run"
    for it in (100, 200):
        shutil.copytree(mg, run / f"iter_{it:07d}")
    (run / "latest_checkpointed_iteration.txt").write_text("200\n")
    from nemoconv.checkpoint.local import open_checkpoint

    assert open_checkpoint(run).path.name == "iter_0000200"
    assert open_checkpoint(run, iteration=100).path.name == "iter_0000100"
    with pytest.raises(NemoconvError, match="iterations present: 100, 200"):
        open_checkpoint(run, iteration=300)
    result = _cli("convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--iteration", "100")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf" / "nemoconv-manifest.json").read_text())["scheme_from"] == "megatron"
    result = _cli("convert", str(src), str(tmp_path / "x"), "--to", "hf", "--iteration", "100")
    assert result.returncode == 2 and "--iteration applies to Megatron checkpoints" in result.stderr


def test_nemo2_weights_layout_is_found(megatron_dir, tmp_path):
    _, mg = megatron_dir("dense")
    shutil.copytree(mg, tmp_path / "nemo2" / "weights")
    from nemoconv.checkpoint.local import open_checkpoint

    assert open_checkpoint(tmp_path / "nemo2").path == tmp_path / "nemo2" / "weights"


def test_missing_config_is_a_clear_error_and_config_option_fixes_it(megatron_dir, tmp_path):
    src, mg = megatron_dir("dense")
    bare = tmp_path / "bare"
    shutil.copytree(mg, bare)
    (bare / "config.json").unlink()
    result = _cli("convert", str(bare), str(tmp_path / "out"), "--to", "hf")
    assert result.returncode == 2 and "--config" in result.stderr
    result = _cli("convert", str(bare), str(tmp_path / "out"), "--to", "hf", "--config", str(src / "config.json"))
    assert result.returncode == 0, result.stderr
    assert_same_tensors(load_all(src), load_all(tmp_path / "out"))


def test_config_is_derived_from_bridge_run_config(megatron_dir, tmp_path):
    src, mg = megatron_dir("mtp")
    hf = json.loads((src / "config.json").read_text())
    from nemoconv.storage.megatron.config import megatron_model_fields

    run = tmp_path / "run"
    shutil.copytree(mg, run)
    (run / "config.json").unlink()
    import yaml

    model = {"_target_": "megatron.bridge.models.NemotronHModelProvider", **megatron_model_fields(hf),
             "params_dtype": None}
    text = yaml.safe_dump({"model": model}).replace("params_dtype: null", "params_dtype: !!python/name:torch.bfloat16 ''")
    (run / "run_config.yaml").write_text(text)
    convert(run, tmp_path / "out", to="hf")
    assert_same_tensors(load_all(src), load_all(tmp_path / "out"))


def test_hybrid_layer_pattern_separators():
    assert split_layer_pattern("M-M-|M*E/*E/*E") == ("M-M-M*E", "*E", 2)
    cfg = hf_config_from_megatron({"hybrid_layer_pattern": "M*|ME/*E", "vocab_size": 8}, "x")
    assert cfg["hybrid_override_pattern"] == "M*ME" and cfg["num_nextn_predict_layers"] == 1
    with pytest.raises(NemoconvError, match="different patterns"):
        split_layer_pattern("MM/*E/E*")


def test_optimizer_state_and_extra_state_are_skipped_with_a_note(megatron_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    src, mg = megatron_dir("dense")
    from nemoconv.checkpoint.local import open_checkpoint

    state = dict(iter_tensors(open_checkpoint(mg), to="megatron", prefetch=0))
    state["optimizer.state.exp_avg.decoder.final_norm.weight"] = torch.zeros(4)
    state["decoder.layers.0.mixer.in_proj._extra_state"] = {"fp8": "meta"}  # a pickled object, never read
    train = tmp_path / "train"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(train), no_dist=True)
    shutil.copy(mg / "metadata.json", train)
    shutil.copy(mg / "config.json", train)
    manifest = convert(train, tmp_path / "out", to="hf")
    assert "optimizer.state.exp_avg.decoder.final_norm.weight" in manifest["keys_not_read"]
    assert any("_extra_state" in k for k in manifest["keys_not_read"])
    a, b = load_all(src), load_all(tmp_path / "out")  # no nemoconv manifest here: fp32 A_log stays fp32
    assert sorted(a) == sorted(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_failed_megatron_write_leaves_existing_output_untouched(megatron_dir, tiny_dir, tmp_path):
    _, mg = megatron_dir("dense")
    out = tmp_path / "out"
    shutil.copytree(mg, out)
    before = tree_digest(out)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir("dense", dtype=torch.bfloat16), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["hidden_size"] = 32  # shapes no longer match: fails in the plan, before writing
    (broken / "config.json").write_text(json.dumps(cfg))
    result = _cli("convert", str(broken), str(out), "--to", "megatron", "--overwrite")
    assert result.returncode == 2
    assert tree_digest(out) == before


def test_megatron_core_loads_what_we_write_with_the_expected_keys_shapes_and_values(megatron_dir):
    import hashlib
    import importlib.util

    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core is not installed")
    from nemoconv.checkpoint.local import open_checkpoint

    _, mg = megatron_dir("mtp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "peers" / "mcore_load.py"), str(mg)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    ours = dict(iter_tensors(open_checkpoint(mg), to="megatron", prefetch=0))
    assert sorted(loaded) == sorted(ours)
    for key, t in ours.items():
        digest = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert loaded[key] == {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "metadata_shape": list(t.shape), "sha256": digest}, key


# ---- Megatron-Bridge's own mappings (pip megatron-bridge --no-deps; its package __init__s need Transformer
# Engine, so the three package modules are stood in by plain namespaces and param_mapping.py is imported alone).


def _bridge_root() -> Path:
    import importlib.util

    if "megatron.bridge" in sys.modules:  # already stood in by _bridge_param_mapping
        return Path(sys.modules["megatron.bridge"].__path__[0])
    try:
        spec = importlib.util.find_spec("megatron.bridge")
        has_core = importlib.util.find_spec("megatron.core") is not None
    except ImportError:
        spec, has_core = None, False
    if spec is None or not has_core:
        pytest.skip("megatron-bridge / megatron-core are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _bridge_param_mapping():
    import importlib
    import types

    root = _bridge_root()
    for name, sub in (("megatron.bridge", ""), ("megatron.bridge.models", "models"),
                      ("megatron.bridge.models.conversion", "models/conversion")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(root / sub)]
            sys.modules[name] = module
    return importlib.import_module("megatron.bridge.models.conversion.param_mapping")


def _layer_prefixes(spec, code: str) -> list[tuple[str, str]]:
    """(HF prefix, Megatron prefix) of every main and MTP layer of one kind."""
    out = [(f"backbone.layers.{i}", f"decoder.layers.{i}") for i, c in enumerate(spec.layer_codes) if c == code]
    per_depth = len(spec.mtp_codes)
    for k in range(spec.num_mtp_layers * per_depth):
        if spec.mtp_layer_code(k) == code:
            out.append((f"mtp.layers.{k}", f"mtp.layers.{k // per_depth}.mtp_model_layer.layers.{k % per_depth}"))
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bridge_qkv_in_proj_and_conv1d_mappings_give_our_tensors(megatron_dir, layout):
    pm = _bridge_param_mapping()
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemoconv.checkpoint.local import open_checkpoint

    src, mg = megatron_dir(layout)
    spec = open_checkpoint(src).spec
    hf = load_all(src)
    ours = dict(iter_tensors(open_checkpoint(mg), to="megatron", prefetch=0))
    config = TransformerConfig(num_layers=1, hidden_size=spec.hidden_size, num_attention_heads=spec.num_attention_heads,
                               num_query_groups=spec.num_key_value_heads, kv_channels=spec.head_dim,
                               mamba_num_heads=spec.mamba_num_heads, mamba_head_dim=spec.mamba_head_dim,
                               mamba_state_dim=spec.ssm_state_size, mamba_num_groups=spec.n_groups)
    module = torch.nn.Module()
    module.config = config
    checked = 0
    for h, m in _layer_prefixes(spec, "*"):
        q, k, v = (hf[f"{h}.mixer.{p}_proj.weight"] for p in "qkv")
        assert torch.equal(pm.merge_qkv_weights(config, q, k, v), ours[f"{m}.self_attention.linear_qkv.weight"])
        checked += 1
    for h, m in _layer_prefixes(spec, "M"):
        in_proj = hf[f"{h}.mixer.in_proj.weight"]
        module.weight = torch.nn.Parameter(torch.empty_like(in_proj))
        bridge = pm.MambaInProjMapping(f"{m}.mixer.in_proj.weight", f"{h}.mixer.in_proj.weight")
        parts = torch.cat([ours[f"{m}.mixer.in_proj.weight.{p}"] for p in ("z", "x", "B", "C", "dt")])
        assert torch.equal(bridge.hf_to_megatron(in_proj, module), parts)
        for what in ("weight", "bias"):
            conv = hf[f"{h}.mixer.conv1d.{what}"]
            module.weight = torch.nn.Parameter(torch.empty_like(conv))
            bridge = pm.MambaConv1dMapping(f"{m}.mixer.conv1d.{what}", f"{h}.mixer.conv1d.{what}")
            parts = torch.cat([ours[f"{m}.mixer.conv1d.{what}.{p}"] for p in "xBC"])
            assert torch.equal(bridge.hf_to_megatron(conv, module), parts)
        checked += 1
    assert checked


def _bridge_rename_table(root: Path) -> list[tuple[str, str]]:
    """(megatron pattern, hf pattern) pairs of the nemotron_h bridge, read from its source (it does not import
    without Transformer Engine): the `param_mappings` dict and the per-submodule Column/RowParallel mappings."""
    import ast

    tree = ast.parse((root / "models" / "nemotronh" / "nemotron_h_bridge.py").read_text())
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "param_mappings":
            pairs += list(ast.literal_eval(node.value).items())
    for sub in ("A_log", "D", "dt_bias", "norm.weight"):  # the loop over mixer submodules in mapping_registry
        pairs.append((f"decoder.layers.*.mixer.{sub}", f"backbone.layers.*.mixer.{sub}"))
    pairs.append(("decoder.layers.*.mixer.out_proj.weight", "backbone.layers.*.mixer.out_proj.weight"))
    return pairs


@pytest.mark.parametrize("layout", ["dense", "moe"])
def test_our_renames_are_among_the_bridges_nemotron_h_mappings(megatron_dir, layout):
    import re

    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.schemes import get_scheme

    pairs = _bridge_rename_table(_bridge_root())
    src, _ = megatron_dir(layout)
    ck, scheme = open_checkpoint(src), get_scheme("megatron")
    transformed = re.compile(r"\.(q_proj|k_proj|v_proj|in_proj|conv1d)\.|\.experts\.\d+\.")  # compared above
    checked = 0
    for hf_name in ck.entries:
        if hf_name.startswith("mtp.") or transformed.search(hf_name):
            continue  # Megatron-Bridge 0.3.1's nemotron_h bridge maps no MTP or latent tensors
        ours = scheme.to_scheme(hf_name, ck.spec)
        candidates = []
        for mg_pattern, hf_pattern in pairs:
            m = re.fullmatch(re.escape(hf_pattern).replace(r"\*", r"(\d+)"), hf_name)
            if m:
                mg = mg_pattern
                for g in m.groups():
                    mg = mg.replace("*", g, 1)
                candidates.append(mg)
        if "latent_proj" in hf_name:
            continue
        assert ours in candidates, (hf_name, ours, candidates)
        checked += 1
    assert checked > 10


def test_we_read_what_megatron_core_saves_per_expert_and_tensor_parallel_shards(megatron_dir, tmp_path):
    import importlib.util

    for module in ("megatron.core", "psutil"):  # without psutil megatron-core's save hangs
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            pytest.skip(f"{module} is not installed")
    src, mg = megatron_dir("mtp")
    saved = tmp_path / "mcore"
    saved.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "peers" / "mcore_save.py"), str(mg), str(saved)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.copy(mg / "config.json", saved)  # megatron-core writes no HF config
    from nemoconv.checkpoint.local import open_checkpoint

    entries = open_checkpoint(saved).entries
    assert len(entries["decoder.layers.1.mlp.experts.linear_fc1.weight"].pieces) == 8  # one chunk per expert
    manifest = convert(saved, tmp_path / "hf", to="hf")
    assert not manifest.get("keys_not_read")
    a, b = load_all(src), load_all(tmp_path / "hf")  # no nemoconv manifest: fp32 A_log stays fp32
    assert sorted(a) == sorted(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_vocab_padding_rows_are_cut_on_read_and_reported(megatron_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    from nemoconv.checkpoint.local import open_checkpoint

    src, mg = megatron_dir("dense")
    state = dict(iter_tensors(open_checkpoint(mg), to="megatron", prefetch=0))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        state[key] = torch.cat([state[key], torch.full((64, state[key].shape[1]), 7.0, dtype=state[key].dtype)])
    padded = tmp_path / "padded"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(padded), no_dist=True)
    shutil.copy(mg / "metadata.json", padded)
    shutil.copy(mg / "config.json", padded)
    manifest = convert(padded, tmp_path / "hf", to="hf")
    trims = [s for s in manifest["lossy_steps"] if s["step"] == "trim"]
    assert sorted(s["tensor"] for s in trims) == ["backbone.embeddings.weight", "lm_head.weight"]
    a, b = load_all(src), load_all(tmp_path / "hf")
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_config_is_derived_from_nemo2_context(megatron_dir, tmp_path):
    import yaml

    from nemoconv.storage.megatron.config import megatron_model_fields

    src, mg = megatron_dir("moe")
    nemo2 = tmp_path / "nemo2"
    shutil.copytree(mg, nemo2 / "weights")
    (nemo2 / "weights" / "config.json").unlink()
    (nemo2 / "context").mkdir()
    model = {"_target_": "nemo.collections.llm.gpt.model.ssm.MambaModel",
             "config": {"_target_": "nemo.collections.llm.gpt.model.ssm.NemotronHConfig",
                        **megatron_model_fields(json.loads((src / "config.json").read_text()))}}
    (nemo2 / "context" / "model.yaml").write_text(yaml.safe_dump(model))
    convert(nemo2, tmp_path / "hf", to="hf")
    assert_same_tensors(load_all(src), load_all(tmp_path / "hf"))


def test_identical_inputs_give_byte_identical_megatron_outputs(megatron_dir, tmp_path):
    src, _ = megatron_dir("moe")
    convert(src, tmp_path / "a", to="megatron")
    convert(src, tmp_path / "b", to="megatron")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")  # no uuid, no timestamp anywhere


def test_storage_file_outside_the_checkpoint_is_refused(megatron_dir, tmp_path):
    from nemoconv.storage.megatron.dcp_write import _Written, metadata_pickle

    _, mg = megatron_dir("dense")
    bad = tmp_path / "bad"
    shutil.copytree(mg, bad)
    (bad / ".metadata").write_bytes(metadata_pickle([_Written("decoder.final_norm.weight", "bfloat16", (64,),
                                                              "../outside.distcp", 0, 1000)]))
    result = _cli("convert", str(bad), str(tmp_path / "out"), "--to", "hf")
    assert result.returncode == 2 and "not a plain .distcp name" in result.stderr


def test_truncated_distcp_is_a_clear_error(megatron_dir, tmp_path):
    _, mg = megatron_dir("dense")
    bad = tmp_path / "bad"
    shutil.copytree(mg, bad)
    data = bad / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    result = _cli("convert", str(bad), str(tmp_path / "out"), "--to", "hf")
    assert result.returncode == 2 and "lies outside the file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def _source_file(tmp_path, nbytes: int = 1 << 16) -> tuple[Path, bytes]:
    data = os.urandom(nbytes)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, data


def test_contiguous_copies_of_one_source_become_one_kernel_copy(tmp_path, monkeypatch):
    from nemoconv.storage.fileio import Appender

    src, data = _source_file(tmp_path)
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    out = Appender(tmp_path / "out.bin")
    out.write(b"head")
    for k in range(8):  # eight experts' slabs, back to back in the source: one copy
        out.copy(src, 1000 + k * 4096, 4096, f"experts.{k}")
    out.copy(src, 0, 1000, "elsewhere")  # not contiguous: a second copy
    out.write(b"tail")
    out.close()
    assert calls == [8 * 4096, 1000]
    assert (tmp_path / "out.bin").read_bytes() == b"head" + data[1000:1000 + 8 * 4096] + data[:1000] + b"tail"


def test_copies_fall_back_to_reads_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    import errno

    from nemoconv.storage.fileio import Appender

    src, data = _source_file(tmp_path)

    def cross_device(*_):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    out = Appender(tmp_path / "out.bin")
    out.copy(src, 100, 5000, "x")
    out.close()
    assert (tmp_path / "out.bin").read_bytes() == data[100:5100]


def test_copy_from_a_truncated_source_is_a_clear_error(tmp_path):
    from nemoconv.storage.fileio import Appender

    src, _ = _source_file(tmp_path, 1000)
    out = Appender(tmp_path / "out.bin")
    out.copy(src, 500, 1000, "decoder.final_norm.weight")
    with pytest.raises(NemoconvError, match="truncated while reading 'decoder.final_norm.weight'"):
        out.close()


def test_shard_planning_lives_in_storage_and_is_still_importable_from_stream_output():
    from nemoconv.storage.safetensors_io import PlannedTensor
    from nemoconv.storage.tensors import plan_shards
    from nemoconv.stream.output import plan_shards as from_output

    planned = [PlannedTensor(f"t{k}", "bfloat16", (1024,)) for k in range(5)]  # 2 KiB each
    assert from_output is plan_shards
    assert [len(s) for s in plan_shards(planned, 4096)] == [2, 2, 1]


def test_small_writes_are_gathered_and_keep_their_place_between_copies(tmp_path, monkeypatch):
    from nemoconv.storage.fileio import Appender

    src, data = _source_file(tmp_path)
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: writes.append(len(b)) or real(fd, b))
    out = Appender(tmp_path / "out.bin")
    for piece in (b"PK", b"header", b"pad"):  # a record's headers: one write
        out.write(piece)
    out.copy(src, 0, 4096, "a")
    out.write(b"between")  # after the copy, and it keeps the next copy from merging with the first
    out.copy(src, 4096, 4096, "b")
    out.write(b"x" * (1 << 17))  # large: written at once, after what is gathered
    out.write(b"end")
    assert out.pos == 2 + 6 + 3 + 4096 + 7 + 4096 + (1 << 17) + 3
    out.close()
    assert (tmp_path / "out.bin").read_bytes() == (b"PKheaderpad" + data[:4096] + b"between" + data[4096:8192]
                                                   + b"x" * (1 << 17) + b"end")
    assert writes == [11, 7, 1 << 17, 3]


def test_mamba_parts_are_split_and_joined_on_disk_into_the_same_bytes(megatron_dir, tmp_path, monkeypatch):
    """in_proj and conv1d are stored as parts in Megatron: cut and joined as byte runs, never read, and the outputs
    are byte for byte those of cutting and joining the values in memory."""
    import nemoconv.stream.pipeline as pipeline
    from nemoconv.storage.safetensors_io import TensorReader

    src, _ = megatron_dir("moe")
    read = []
    real_read = TensorReader.read
    monkeypatch.setattr(TensorReader, "read", lambda self, entry: read.append(entry.name) or real_read(self, entry))
    convert(src, tmp_path / "mg", to="megatron")
    convert(tmp_path / "mg", tmp_path / "back", to="hf")
    assert not [n for n in read if ".in_proj." in n or ".conv1d." in n]
    monkeypatch.setattr(pipeline, "_rows_on_disk", lambda parts: False)  # the values, in memory
    convert(src, tmp_path / "mg-mem", to="megatron")
    convert(tmp_path / "mg-mem", tmp_path / "back-mem", to="hf")
    assert [n for n in read if ".in_proj." in n or ".conv1d." in n]
    assert tree_digest(tmp_path / "mg") == tree_digest(tmp_path / "mg-mem")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == \
        (tmp_path / "back-mem" / "model.safetensors").read_bytes()


def test_early_writeback_starts_only_once_the_output_outgrows_the_page_cache(tmp_path, monkeypatch):
    """Below EARLY_WRITEBACK_AFTER bytes written by the process, the page cache holds the output (as cp's);
    past it, every WRITEBACK_STEP is handed to the disk, from where the file's last hand-off ended."""
    from nemoconv.storage import fileio

    calls = []
    monkeypatch.setattr(fileio, "start_writeback", lambda fd, offset, n: calls.append((offset, n)))
    monkeypatch.setattr(fileio, "WRITEBACK_STEP", 1 << 16)
    monkeypatch.setattr(fileio, "_appended", 0)
    monkeypatch.setattr(fileio, "EARLY_WRITEBACK_AFTER", 5 << 16)
    out = fileio.Appender(tmp_path / "out.bin")
    chunk = bytes(1 << 16)
    for _ in range(5):
        out.write(chunk)
    assert calls == []                                   # 5 steps: not past the threshold yet
    out.write(chunk)
    assert calls == [(0, 6 << 16)]                       # past it: everything so far, at once
    out.write(chunk)
    out.close()
    assert calls == [(0, 6 << 16), (6 << 16, 1 << 16)]
    assert (tmp_path / "out.bin").stat().st_size == 7 << 16
    quiet = fileio.Appender(tmp_path / "dcp.bin", writeback=False)   # the DCP writer never asks
    quiet.write(chunk)
    quiet.close()
    assert len(calls) == 2
