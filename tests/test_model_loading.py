"""build_model / load_model: every tensor accounted for, names normalised, dtypes and FP8 handled."""

from __future__ import annotations

import pytest
import torch

from nemoconv.data.demo_checkpoint import random_tensors, tiny_config
from nemoconv.errors import NemoconvError
from nemoconv.model import build_model, quantize_fp8
from nemoconv.model.fp8 import FP8_DTYPE
from nemoconv.storage.config import parse_config


def spec_and_tensors(kind="dense", **overrides):
    spec = parse_config(tiny_config(kind, **overrides))
    return spec, random_tensors(spec, seed=3)


@pytest.mark.parametrize("kind", ["dense", "moe", "latent"])
def test_model_parameters_are_exactly_the_specs_tensors(kind):
    spec, tensors = spec_and_tensors(kind)
    model = build_model(spec, tensors.items())
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert params == {name: tuple(shape) for name, shape in spec.hf_shapes().items()}
    for name, p in model.named_parameters():
        assert torch.equal(p, tensors[name]), name


def test_accepts_model_prefix_and_singular_embedding_and_skips_mtp():
    spec, tensors = spec_and_tensors("dense")
    reference = build_model(spec, tensors.items())
    renamed = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in tensors.items()}
    renamed["model.embedding.weight"] = renamed.pop("model.embeddings.weight")
    renamed["mtp.layers.0.mixer.q_proj.weight"] = torch.zeros(3, 3)     # MTP heads are not run
    model = build_model(spec, renamed.items())
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(model(ids), reference(ids))


def test_missing_tensor_is_named():
    spec, tensors = spec_and_tensors("moe")
    del tensors["backbone.layers.1.mixer.experts.3.down_proj.weight"]
    with pytest.raises(NemoconvError, match=r"missing tensor\(s\): backbone\.layers\.1\.mixer\.experts\.3\.down_proj"):
        build_model(spec, tensors.items())


def test_unexpected_and_misshapen_tensors_are_named():
    spec, tensors = spec_and_tensors("dense")
    tensors["backbone.layers.0.mixer.bogus.weight"] = torch.zeros(2)
    with pytest.raises(NemoconvError, match=r"unexpected tensor\(s\): backbone\.layers\.0\.mixer\.bogus\.weight"):
        build_model(spec, tensors.items())
    spec, tensors = spec_and_tensors("dense")
    tensors["backbone.norm_f.weight"] = torch.zeros(65)
    with pytest.raises(NemoconvError, match=r"backbone\.norm_f\.weight has shape \(65,\), expected \(64,\)"):
        build_model(spec, tensors.items())


def test_tied_embeddings_share_one_matrix():
    spec, tensors = spec_and_tensors("dense", tie_word_embeddings=True)
    assert "lm_head.weight" not in tensors
    model = build_model(spec, tensors.items())
    assert model.lm_head.weight is model.backbone.embeddings.weight


def test_bfloat16_keeps_ssm_parameters_and_router_bias_in_float32():
    spec, tensors = spec_and_tensors("moe")
    model = build_model(spec, tensors.items(), dtype="bfloat16")
    mixer = model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == torch.bfloat16 and mixer.norm.weight.dtype == torch.bfloat16
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.dt_bias.dtype} == {torch.float32}
    assert model.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    logits = model(torch.randint(0, 256, (1, 5)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def quantize_in_place(tensors: dict, modules: list[str], input_amax: dict | None = None) -> None:
    """ModelOpt's recipe: weight_scale = amax|W| / 448, input_scale = calibrated amax|x| / 448."""
    for m in modules:
        w = tensors[f"{m}.weight"]
        scale = w.abs().max() / 448
        tensors[f"{m}.weight"] = quantize_fp8(w, scale)
        tensors[f"{m}.weight_scale"] = scale.float().reshape(())
        tensors[f"{m}.input_scale"] = torch.tensor((input_amax or {}).get(m, 4.0) / 448)


def calibrate(model, modules: list[str], ids: torch.Tensor) -> dict:
    amax: dict = {}
    hooks = [model.get_submodule(m).register_forward_hook(
        lambda mod, args, out, m=m: amax.__setitem__(m, max(amax.get(m, 0.0), args[0].abs().max().item())))
        for m in modules]
    model(ids)
    for h in hooks:
        h.remove()
    return amax


def test_fp8_linears_load_as_fp8_and_approximate_the_original():
    spec, tensors = spec_and_tensors("dense")
    original = build_model(spec, dict(tensors).items())
    targets = ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
               "backbone.layers.1.mixer.up_proj", "backbone.layers.1.mixer.down_proj"]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    quantize_in_place(tensors, targets, calibrate(original, targets, ids))
    tensors["backbone.layers.3.mixer.k_proj.k_scale"] = torch.tensor(1.0)   # an FP8 KV cache: keys through e4m3
    model = build_model(spec, tensors.items())
    in_proj = model.get_submodule(targets[0])
    assert in_proj.weight.dtype == FP8_DTYPE and in_proj.quantized
    assert in_proj.weight_scale.dtype == torch.float32 and in_proj.weight_scale.dim() == 0
    a, b = model(ids), original(ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99
    # cached decoding works through the FP8 layers too, and agrees with the FP8 full forward
    cache = model.new_cache(2, 12)
    model.prefill(ids[:, :11], cache)
    step = model.decode_step(ids[:, 11], cache)
    assert ((step - a[:, 11]).abs().max() / a[:, 11].abs().max()).item() <= 1e-5
    # and in bfloat16 the FP8 weights stay FP8
    bf16 = build_model(spec, tensors.items(), dtype=torch.bfloat16)
    assert bf16.get_submodule(targets[0]).weight.dtype == FP8_DTYPE
    assert torch.isfinite(bf16(ids)).all()


def test_fp8_weight_without_its_scales_is_rejected():
    spec, tensors = spec_and_tensors("dense")
    quantize_in_place(tensors, ["backbone.layers.0.mixer.in_proj"])
    del tensors["backbone.layers.0.mixer.in_proj.input_scale"]
    with pytest.raises(NemoconvError, match=r"missing tensor\(s\): backbone\.layers\.0\.mixer\.in_proj\.input_scale"):
        build_model(spec, tensors.items())
    spec, tensors = spec_and_tensors("dense")
    tensors["backbone.layers.0.mixer.in_proj.weight_scale"] = torch.tensor(1.0)   # scale on a bf16 weight
    with pytest.raises(NemoconvError, match="its weight is not float8_e4m3fn"):
        build_model(spec, tensors.items())


def test_fp8_is_refused_outside_linear_weights():
    spec, tensors = spec_and_tensors("dense")
    tensors["backbone.norm_f.weight"] = tensors["backbone.norm_f.weight"].to(FP8_DTYPE)
    with pytest.raises(NemoconvError, match="only linear weights may be FP8"):
        build_model(spec, tensors.items())


def test_load_model_reads_a_checkpoint_directory(tiny_dir):
    from helpers import load_all

    from nemoconv.model import load_model
    from nemoconv.storage.config import load_config

    directory = tiny_dir("moe")
    model = load_model(directory)
    _, spec = load_config(directory)
    reference = build_model(spec, load_all(directory).items())
    ids = torch.randint(0, 256, (1, 11))
    assert torch.equal(model(ids), reference(ids))


@pytest.mark.parametrize("scheme", ["nemo", "max"])
def test_load_model_gives_the_same_model_from_every_scheme(tiny_dir, tmp_path, scheme):
    from helpers import load_all

    import nemoconv
    from nemoconv.model import load_model
    from nemoconv.storage.config import load_config

    source = tiny_dir("moe")
    nemoconv.convert(source, tmp_path / scheme, to=scheme)
    tensors = load_all(source)
    if scheme == "max":  # MAX stores the router weight in bf16 (a lossy cast the conversion reports)
        for name in tensors:
            if name.endswith("mixer.gate.weight"):
                tensors[name] = tensors[name].to(torch.bfloat16).float()
    reference = build_model(load_config(source)[1], tensors.items())
    model = load_model(tmp_path / scheme)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), reference(ids))
