"""nemoconv quantize against nvidia-modelopt 0.47 itself (skipped where modelopt is not installed).

1. The same checkpoint quantized by ModelOpt (transformers' NemotronHForCausalLM, `mtq.quantize` with
   FP8_DEFAULT_CFG restricted to our targets, `export_hf_checkpoint`), its input amax set to ours: every
   tensor of the two exports has the same name, dtype, shape and bytes.
2. config.json's quantization_config is what ModelOpt's own converter makes of our hf_quant_config.json.
3. Calibration through ModelOpt (`mtq.quantize` per layer) and through our hooks gives identical amax.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings

import pytest
import torch
from conftest import transformers_checkpoint
from helpers import assert_same_tensors, excluded_modules, load_all, read_json

import nemoconv
from nemoconv.commands.quantize import quantize
from nemoconv.quant.calibrate import modelopt_status

transformers = pytest.importorskip("transformers")
mtq, MODELOPT_VERSION = modelopt_status()
pytestmark = pytest.mark.skipif(mtq is None, reason=f"nvidia-modelopt 0.47 not usable: {MODELOPT_VERSION}")

# ModelOpt 0.47 with transformers 5.x appends this to every module it names in exclude_modules (a bug in
# its reverse name mapping); stripped before comparing its list with ours.
SENTINEL = "\x00backbone.pt_name_sentinel"


def modelopt_export(src, amax: dict[str, float], out) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    model = transformers.NemotronHForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    # FP8_DEFAULT_CFG, minus the attention projections (nemoconv never quantizes them)
    cfg = {"quant_cfg": list(mtq.FP8_DEFAULT_CFG["quant_cfg"])
           + [{"quantizer_name": "*mixer.[qkvo]_proj*", "enable": False}], "algorithm": "max"}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, lambda m: m(ids))
        for name, module in model.named_modules():
            hf = re.sub(r"^model\.", "backbone.", name)
            if hf in amax:
                module.input_quantizer.amax = torch.tensor(amax[hf])  # "for the same amax"
        export_hf_checkpoint(model, export_dir=out)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(ours, ModelOpt's) exports of one transformers-written bf16 dense checkpoint."""
    root = tmp_path_factory.mktemp("modelopt")
    src = transformers_checkpoint(root / "src", "dense", dtype=torch.bfloat16)
    # bf16 activations, as ModelOpt's bf16 model keeps its amax: the same amax is representable on both sides
    result = quantize(src, root / "ours", calib_samples=4, calib_seq_len=16, device="cpu", dtype=torch.bfloat16,
                      calibrator="builtin")
    amax = {m: r["input_amax"] for m, r in result["quantization"]["modules"].items()}
    modelopt_export(src, amax, root / "theirs")
    return root / "ours", root / "theirs", result


def test_every_tensor_matches_modelopts_export(both):
    ours, theirs, result = both
    a, b = load_all(ours), load_all(theirs)
    assert_same_tensors(a, b)  # names, dtypes, shapes and bytes: FP8 weights, both scales, the bf16 rest
    assert sum(v.dtype == torch.float8_e4m3fn for v in b.values()) == len(result["quantization"]["targets"]) == 12


def test_hf_quant_config_has_modelopts_structure_and_stricter_exclusions(both):
    ours, theirs, result = both
    mine, their = read_json(ours / "hf_quant_config.json"), read_json(theirs / "hf_quant_config.json")
    assert their["producer"] == {"name": "modelopt", "version": "0.47.0"}
    assert mine["producer"] == {"name": "nemoconv", "version": nemoconv.__version__}  # who wrote the file
    assert mine["quantization"].keys() == their["quantization"].keys()
    for key in ("quant_algo", "kv_cache_quant_algo"):
        assert mine["quantization"][key] == their["quantization"][key]
    # ModelOpt summarizes with prefix wildcards ("backbone.layers.3*" for the attention layer), which
    # vLLM's substring/fnmatch matching would also apply to layers 30-39; our patterns stop at the layer index.
    quantized = set(result["quantization"]["targets"])
    modules = {n[: -len(".weight")] for n, v in load_all(ours).items() if n.endswith(".weight") and v.dim() >= 2}
    excluded = excluded_modules(mine["quantization"]["exclude_modules"], modules | {"backbone.embeddings"})
    for raw in their["quantization"]["exclude_modules"]:
        pattern = raw.replace(SENTINEL, "")
        if pattern.endswith("*"):
            hits = {m for m in excluded | quantized if m.startswith(pattern[:-1])}
        else:
            hits = {m for m in excluded | quantized if m == pattern.rstrip(".")}
        assert hits and hits <= excluded, pattern  # everything ModelOpt leaves in bf16, we exclude too
    assert not excluded & quantized


def test_config_json_quantization_config_is_modelopts_conversion(both):
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    ours, theirs, _ = both
    hf_quant = read_json(ours / "hf_quant_config.json")
    mine = read_json(ours / "config.json")["quantization_config"]
    assert json.dumps(mine) == json.dumps(convert_hf_quant_config_format(hf_quant))  # same keys, same order
    their = read_json(theirs / "config.json")["quantization_config"]
    differ = ("ignore", "producer")  # the exclusion lists (above) and who wrote the file
    assert {k: v for k, v in mine.items() if k not in differ} == {k: v for k, v in their.items() if k not in differ}


@pytest.mark.parametrize("kind", ["moe", "latent"])
def test_modelopt_and_builtin_calibration_agree_exactly(tmp_path, kind):
    from nemoconv.data.demo_checkpoint import write_tiny_checkpoint

    src = write_tiny_checkpoint(tmp_path / "src", kind, dtype=torch.bfloat16)
    runs = {}
    for calibrator in ("modelopt", "builtin"):
        runs[calibrator] = quantize(src, tmp_path / calibrator, preset="aggressive", calib_samples=4,
                                    calib_seq_len=16, device="cpu", calibrator=calibrator)
    a, b = (runs[c]["quantization"]["modules"] for c in ("modelopt", "builtin"))
    assert a == b
    assert runs["modelopt"]["quantization"]["calibration"]["calibrator"].startswith("nvidia-modelopt 0.47")
    assert_same_tensors(load_all(tmp_path / "modelopt"), load_all(tmp_path / "builtin"))
