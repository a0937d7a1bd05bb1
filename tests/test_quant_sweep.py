"""The layer-by-layer sweep's own machinery (nemoconv/quant/sweep.py): batched streams, shared comparisons."""

from __future__ import annotations

import math

import pytest
import torch

from nemoconv.quant.analyze import max_streams
from nemoconv.verification.metrics import LogitStats


def _candidates(r: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    bad = r.clone()
    bad[3, 7], bad[5, 2] = float("nan"), float("inf")
    return [r + 0.01 * torch.randn(r.shape, generator=g), r.clone(), torch.randn(r.shape, generator=g),
            torch.zeros_like(r), bad]


def test_shared_reference_comparison_gives_logitstats_numbers():
    """_slice_stats (reference side computed once, KL from logsumexp) reports what LogitStats.add does,
    including identical, unrelated, all-zero and NaN/Inf candidates."""
    from nemoconv.quant.sweep import _RefSide, _slice_stats

    r = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 5
    cands = _candidates(r)
    shared = _slice_stats(_RefSide(r.double()), torch.stack(cands))
    for c, got in zip(cands, shared):
        want, got = LogitStats().add(r, c).summary(), got.summary()
        assert want.keys() == got.keys()
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_one_pass_over_many_variants_equals_each_variant_alone(tiny_dir):
    """Streams batched together and replaced in place give each variant the numbers it gets alone."""
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.quant.calibrate import calibration_tokens, run_calibration
    from nemoconv.quant.sweep import Variant, compare_variants

    ck = open_checkpoint(tiny_dir("dense", trained_like=True))
    names = [f"backbone.layers.{i}.mixer.{p}" for i, ps in ((0, ("in_proj", "out_proj")), (1, ("up_proj", "down_proj")),
                                                            (4, ("up_proj",)))
             for p in ps]
    variants = [Variant(n, frozenset([n])) for n in names] + [Variant("two", frozenset(names[1:3]))]
    ids = calibration_tokens(ck, None, 4, 16).ids
    calib = run_calibration(ck, names, ids, torch.device("cpu"), torch.float32, "builtin")
    together = compare_variants(ck, ids[:3], variants, calib.amax, torch.device("cpu"), torch.float32, max_streams=64)
    for v in variants:
        alone = compare_variants(ck, ids[:3], [v], calib.amax, torch.device("cpu"), torch.float32)[v.name].summary()
        got = together[v.name].summary()
        assert got["kl_mean"] > 0
        assert got["kl_mean"] == pytest.approx(alone["kl_mean"], rel=1e-6)
        assert got["top1_agreement"] == alone["top1_agreement"]


@pytest.mark.parametrize("calib,probe", [(2048, 128), (65536, 4096), (100, 100), (100, 64)])
def test_streams_fit_in_what_calibration_holds(calib, probe):
    streams = max_streams(calib, probe)
    assert streams >= 1
    assert (1 + streams) * probe <= max(2 * calib, 2 * probe)


@pytest.mark.parametrize("layer,linear", [(0, "out_proj"), (1, "down_proj")])
def test_output_linear_variant_reuses_the_reference_pass_exactly(tiny_dir, layer, linear):
    """A variant whose only FP8 linear is the mixer's output linear gets, from the reference's own pass,
    the output the whole block computes with that linear swapped in (Mamba out_proj, MLP down_proj)."""
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.quant.calibrate import _build_block, _layer_context, _source_index
    from nemoconv.quant.layer_reads import read_hf
    from nemoconv.quant.sweep import Variant, _advance, _fp8_weights, _swapped
    from nemoconv.storage.safetensors_io import TensorReader

    ck = open_checkpoint(tiny_dir("dense", trained_like=True))
    name = f"backbone.layers.{layer}.mixer.{linear}"
    with TensorReader() as reader, torch.no_grad():
        tensors = read_hf(ck, _source_index(ck)[layer], reader)
        weights = _fp8_weights(tensors, {name}, {name: 3.0}, torch.device("cpu"), None)
        block = _build_block(ck.spec, layer, tensors, torch.device("cpu"), torch.float32)
        x = torch.randn(3, 16, ck.spec.hidden_size, generator=torch.Generator().manual_seed(0))
        ref, streams = [x], {}
        _advance(block, _layer_context(), layer, [Variant("v", frozenset([name]))], weights, ref, streams, 8)
        with _swapped(block, layer, weights):
            want = block(x, _layer_context())
        assert torch.equal(streams["v"][0], want)
        assert torch.equal(ref[0], block(x, _layer_context()))
        assert not torch.equal(want, ref[0])
