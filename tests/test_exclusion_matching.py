"""quantize's exclusion list is short and resolves to exactly the unquantized modules under each engine's own
matching rules, replayed here (our code, written from reading their sources):

- vLLM (ModelOptQuantConfigBase.is_layer_excluded + quant_utils.is_layer_skipped + apply_vllm_mapper): an entry
  `X*` (not `X.*`) becomes `X` and `X.*`; names are mapped backbone → model; a module is excluded if it is in
  the list (a fused qkv_proj when all of q/k/v are, and they must agree), or, for a name containing "experts",
  if it is a substring of an entry containing "experts" (that branch decides is_layer_skipped alone), or an
  entry is a substring of its name, or its name fnmatches an entry. vLLM's modules: fused `qkv_proj`, one fused
  `experts` per MoE layer, the rest as in the checkpoint.
- TensorRT-LLM (QuantConfig.is_module_excluded_from_quantization): fnmatchcase of the name against each entry
  (older releases); newer ones also try every ancestor and let `X.*` match `X`. Both must give the same set.
- MAX: FP8 layers are those with weight_scale tensors; checked on a real quantize output.
"""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
from helpers import load_all, read_json

import nemoconv
from nemoconv.data.demo_checkpoint import tiny_config, write_tiny_checkpoint
from nemoconv.quant.exclusions import compact_exclusions
from nemoconv.quant.targets import plan_targets
from nemoconv.storage.config import parse_config

NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # 52 layers, like Nemotron-3 Nano
LAYOUTS = {
    "dense": {},
    "moe": {},
    "latent": {},
    "mtp": {"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E"},
}


def layout_spec(layout: str, **extra):
    kind = "moe" if layout == "mtp" else layout
    return parse_config(tiny_config(kind, **LAYOUTS[layout], **extra))


def plan_for(spec, preset: str):
    names = set(spec.hf_shapes()) | set(spec.mtp_shapes())
    return plan_targets(spec, names, preset, [], lambda m: m)


def engine_modules(modules: list[str]) -> dict[str, list[str]]:
    """The engine's modules (fused where vLLM and TensorRT-LLM fuse) → the checkpoint modules each stands for."""
    out: dict[str, list[str]] = {}
    for name in modules:
        fused = re.sub(r"\.(q_proj|k_proj|v_proj)$", ".qkv_proj", name)
        fused = re.sub(r"\.experts\.\d+\.(up_proj|down_proj)$", ".experts", fused)
        out.setdefault(fused, []).append(name)
    return out


def intended(modules: list[str], unquantized: set[str]) -> set[str]:
    groups = engine_modules(modules)
    for fused, members in groups.items():
        assert len({m in unquantized for m in members}) == 1, f"{fused}: its members disagree"
    return {fused for fused, members in groups.items() if members[0] in unquantized}


# ---- vLLM -----------------------------------------------------------------------------------------------


def vllm_name(name: str) -> str:
    return re.sub(r"^backbone\.", "model.", name).replace(".embeddings", ".embed_tokens")


def vllm_entries(entries: list[str]) -> list[str]:
    split = []
    for e in entries:
        split += [e[:-1], e[:-1] + ".*"] if len(e) >= 2 and e[-1] == "*" and e[-2] != "." else [e]
    return [vllm_name(e) for e in split]


def vllm_skipped(prefix: str, entries: list[str]) -> bool:
    proj = prefix.split(".")[-1]
    if proj == "qkv_proj":
        shards = {prefix[: -len(proj)] + p in entries for p in ("q_proj", "k_proj", "v_proj")}
        assert len(shards) == 1, f"vLLM refuses {prefix}: some shards quantized, some not"
        return shards.pop()
    if "experts" in prefix:
        return any(prefix in e for e in entries if "experts" in e)
    return prefix in entries


def vllm_excluded(prefix: str, entries: list[str]) -> bool:
    return (vllm_skipped(prefix, entries) or any(e != prefix and e in prefix for e in entries)
            or any(fnmatch.fnmatch(prefix, e) for e in entries))


def vllm_resolves(modules: list[str], entries: list[str]) -> set[str]:
    mapped = vllm_entries(entries)
    return {m for m in engine_modules(modules) if vllm_excluded(vllm_name(m), mapped)}


# ---- TensorRT-LLM ---------------------------------------------------------------------------------------


def trtllm_excluded_old(name: str, entries: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, e) for e in entries)


def trtllm_excluded_new(name: str, entries: list[str]) -> bool:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        node = ".".join(parts[:k])
        for e in entries:
            if fnmatch.fnmatchcase(node, e) or (e.endswith(".*") and fnmatch.fnmatchcase(node, e[:-2])):
                return True
    return False


def trtllm_resolves(modules: list[str], entries: list[str], rule) -> set[str]:
    return {m for m in engine_modules(modules) if rule(m, entries)}


# ---- the tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("preset", ["conservative", "default", "aggressive"])
def test_every_engine_resolves_the_list_to_exactly_the_unquantized_modules(layout, preset):
    plan = plan_for(layout_spec(layout), preset)
    modules = [m.name for m in plan.modules]
    entries = compact_exclusions(modules, plan.unquantized)
    want = intended(modules, set(plan.unquantized))
    assert vllm_resolves(modules, entries) == want
    assert trtllm_resolves(modules, entries, trtllm_excluded_old) == want
    assert trtllm_resolves(modules, entries, trtllm_excluded_new) == want


def test_no_entry_reaches_into_another_layer_with_a_longer_index():
    spec = parse_config(tiny_config("moe", hybrid_override_pattern="M*" + "M-" * 5 + "ME"))  # layers 0..12
    plan = plan_for(spec, "default")
    modules = [m.name for m in plan.modules]
    entries = compact_exclusions(modules, plan.unquantized)
    assert "backbone.layers.1.mixer.*" in entries  # attention at layer 1; layers 10-12 are quantized mixers
    want = intended(modules, set(plan.unquantized))
    assert vllm_resolves(modules, entries) == want
    assert trtllm_resolves(modules, entries, trtllm_excluded_old) == want


def test_a_nano_like_moe_default_list_is_short():
    spec = parse_config(tiny_config("moe", hybrid_override_pattern=NANO_PATTERN, n_routed_experts=128))
    plan = plan_for(spec, "default")
    modules = [m.name for m in plan.modules]
    entries = compact_exclusions(modules, plan.unquantized)
    assert len(plan.unquantized) > 6000 and len(entries) <= 3 + NANO_PATTERN.count("E") + NANO_PATTERN.count("*")
    want = intended(modules, set(plan.unquantized))
    assert vllm_resolves(modules, entries) == want
    assert trtllm_resolves(modules, entries, trtllm_excluded_old) == want


def test_quantize_writes_the_short_list_and_max_reads_the_same_split_from_the_tensors(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", "moe", dtype=torch.bfloat16, trained_like=True)
    nemoconv.quantize(src, tmp_path / "out", preset="default", calib_samples=2, calib_seq_len=16, device="cpu",
                      calibrator="builtin")
    excluded = read_json(tmp_path / "out" / "hf_quant_config.json")["quantization"]["exclude_modules"]
    assert excluded == read_json(tmp_path / "out" / "config.json")["quantization_config"]["ignore"]
    assert any("*" in e for e in excluded) and len(excluded) < 10
    t = load_all(tmp_path / "out")
    modules = sorted({n[: -len(".weight")] for n, v in t.items() if n.endswith(".weight") and v.dim() >= 2}
                     | {"backbone.embeddings"})
    fp8 = {n[: -len(".weight_scale")] for n in t if n.endswith(".weight_scale")}  # what MAX reads
    resolved = vllm_resolves(modules, excluded)
    assert resolved == intended(modules, set(modules) - fp8)
    assert trtllm_resolves(modules, excluded, trtllm_excluded_old) == resolved
