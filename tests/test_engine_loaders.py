"""What vLLM, TensorRT-LLM and MAX need from an FP8 output's config files, replayed on a real quantize output.

Our own replays of their loaders' decisions (read in their sources, none of their code copied):
- vLLM (config normalisation, then ModelOptFp8Config.from_config): a `quantization_config` with `quant_method`
  "modelopt" is used as is; only one without `quant_method` falls back to `producer.name == "modelopt"`. The
  flat config.json form needs `quant_algo` FP8 and a list `ignore`; hf_quant_config.json needs
  `quantization.quant_algo` and a list `quantization.exclude_modules`.
- TensorRT-LLM (load_modelopt_quant_config / read_modelopt_quant_config): hf_quant_config.json's
  `quantization` section; a flat config is recognised by `quant_method` starting with "modelopt", or by the
  producer.
- MAX (nemotron_h build_fp8_quant_config / populate_fp8_layers): float8 weights and `weight_scale` tensors;
  the producer is never read.
So a truthful producer ("nemoconv") loads in all three; these tests fail if we ever depend on the producer.
"""

from __future__ import annotations

import pytest
import torch
from helpers import load_all, read_json

import nemoconv
from nemoconv.data import tiny_trained_checkpoint

VLLM_FP8_ALGOS = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"}


def vllm_quant_method(quantization_config: dict) -> str | None:
    cfg = dict(quantization_config)
    if "quant_method" not in cfg and (cfg.get("producer") or {}).get("name") == "modelopt":
        if (cfg.get("quantization") or {}).get("quant_algo") == "FP8":
            cfg["quant_method"] = "modelopt"
    return cfg.get("quant_method")


def vllm_modelopt_settings(cfg: dict) -> tuple[str, list]:
    if "quantization" in cfg:
        algo, excluded = cfg["quantization"].get("quant_algo"), cfg["quantization"].get("exclude_modules", [])
    else:
        algo, excluded = cfg.get("quant_algo"), cfg.get("ignore", [])
    assert str(algo).upper() in VLLM_FP8_ALGOS and isinstance(excluded, list)
    return str(algo).upper(), excluded


def trtllm_settings(cfg: dict) -> tuple[str, list]:
    if "quantization" in cfg:
        q = cfg["quantization"]
    else:
        recognised = str(cfg.get("quant_method", "")).lower().startswith("modelopt") or \
            (cfg.get("producer") or {}).get("name") == "modelopt"
        assert recognised, "TensorRT-LLM would not read this as a ModelOpt config"
        q = {k: v for k, v in cfg.items() if k not in {"producer", "quant_method", "ignore", "config_groups"}}
        q["exclude_modules"] = cfg.get("ignore")
    return q.get("quant_algo"), q.get("exclude_modules")


def max_fp8_layers(tensors: dict) -> set[int]:
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    return {int(n.split(".")[2]) for n in tensors if n.endswith(".weight_scale")}


@pytest.fixture(scope="module")
def fp8_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "out"
    nemoconv.quantize(tiny_trained_checkpoint(), out, calib_samples=2, calib_seq_len=16, device="cpu",
                      calibrator="builtin")
    return out


def test_output_names_nemoconv_as_producer(fp8_output):
    for q in (read_json(fp8_output / "hf_quant_config.json"),
              read_json(fp8_output / "config.json")["quantization_config"]):
        assert q["producer"] == {"name": "nemoconv", "version": nemoconv.__version__}


def test_vllm_picks_modelopt_fp8_without_a_modelopt_producer(fp8_output):
    qc = read_json(fp8_output / "config.json")["quantization_config"]
    assert vllm_quant_method(qc) == "modelopt"
    assert vllm_modelopt_settings(qc)[0] == "FP8"
    assert vllm_modelopt_settings(read_json(fp8_output / "hf_quant_config.json"))[0] == "FP8"


def test_tensorrt_llm_reads_fp8_and_the_same_exclusions_from_either_file(fp8_output):
    hq = read_json(fp8_output / "hf_quant_config.json")
    qc = read_json(fp8_output / "config.json")["quantization_config"]
    assert trtllm_settings(hq) == trtllm_settings(qc) == ("FP8", hq["quantization"]["exclude_modules"])


def test_max_finds_the_fp8_layers_from_the_tensors(fp8_output):
    tensors = load_all(fp8_output)
    layers = max_fp8_layers(tensors)
    spec = nemoconv.open_checkpoint(fp8_output).spec
    assert layers == {i for i, c in enumerate(spec.layer_codes) if c in "M-"}  # default preset: Mamba + MLP


def test_fp8_card_names_the_engines_and_does_not_claim_transformers(fp8_output):
    card = (fp8_output / "README.md").read_text()
    front = card.split("---", 2)[1]
    assert "library_name: nemoconv" in front and "transformers" not in front
    assert "## Where this FP8 checkpoint runs" in card
    for engine in ("vLLM", "TensorRT-LLM", "MAX", "Not transformers"):
        assert engine in card


def test_lossless_hf_conversion_card_still_says_transformers(tmp_path):
    nemoconv.convert(tiny_trained_checkpoint(), tmp_path / "out", to="hf")
    front = (tmp_path / "out" / "README.md").read_text().split("---", 2)[1]
    assert "library_name: transformers" in front
