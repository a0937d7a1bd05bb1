"""The built-in model's CUDA runtime seen from the CPU: kernel dispatch follows the settings, the runner
takes the reference path, the autotune table is data, and the warm-up's FP8 linears are quantize's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from nemoconv import settings
from nemoconv.data.demo_checkpoint import random_tensors, tiny_config
from nemoconv.errors import NemoconvError
from nemoconv.model import build_model
from nemoconv.model.cuda import kernels, warmup
from nemoconv.quant.targets import PRESETS, network_modules
from nemoconv.storage.config import parse_config


def tiny_model(kind: str):
    spec = parse_config(tiny_config(kind))
    return build_model(spec, random_tensors(spec, seed=3).items())


def test_reference_setting_forces_the_reference_attention_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", lambda *a, **k: "sdpa")
    monkeypatch.setattr(kernels.reference, "attention", lambda *a, **k: "reference")
    q = SimpleNamespace(is_cuda=True, shape=(1, 4, 3, 8))        # a CUDA tensor as attention() sees it
    k = SimpleNamespace(is_cuda=True, shape=(1, 4, 3, 8))
    assert kernels.attention(q, k, k, None, True) == "sdpa"
    with settings.override(kernels="reference"):
        assert kernels.attention(q, k, k, None, True) == "reference"


def test_the_recorded_sm90_autotune_table_is_a_data_file_that_loads():
    table = kernels.load_autotune_table(kernels.SM90_AUTOTUNE_FILE, "sm90 table", wrapped=True)
    assert set(table) == {"_chunk_cumsum_fwd_kernel", "_chunk_state_fwd_kernel", "_state_passing_fwd_kernel",
                          "_bmm_chunk_fwd_kernel", "_chunk_scan_fwd_kernel"}
    assert all(isinstance(key, list) and isinstance(config, str) for rows in table.values() for key, config in rows)


def test_a_malformed_autotune_table_is_one_clear_error(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"_chunk_scan_fwd_kernel": [[[128], "BLOCK_SIZE_M: 64", "extra"]]}))
    with pytest.raises(NemoconvError, match="must be \\[key, config\\]"):
        kernels.load_autotune_table(path, "NEMOCONV_AUTOTUNE_TABLE", wrapped=False)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_the_runner_takes_the_reference_path_on_the_cpu(kind):
    model = tiny_model(kind)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    assert not model.runner.fused_ok() and not model.runner.static_ok()
    assert model.runner.prefill_signature(ids, fused=True) is None
    model.generate(ids, max_new_tokens=3)
    assert model.runner.generation_caches == {} and model.runner.pool is None


def test_a_cache_starts_without_prefill_graphs():
    assert tiny_model("dense").new_cache(1, 8).prefill_graphs is None


@pytest.mark.parametrize("kind", ["dense", "moe", "latent"])
def test_warmup_makes_the_linears_of_quantizes_default_preset_fp8(kind):
    spec = parse_config(tiny_config(kind))
    want = {m.name for m in network_modules(spec, set()) if m.kind in PRESETS["default"]}
    assert warmup.default_fp8_linears(spec) == want


def test_warmup_does_not_start_on_the_cpu_or_when_switched_off():
    spec = parse_config(tiny_config("dense"))
    assert warmup.start(spec, "cpu", torch.float32, batch=1, prefill=4, steps=1, forward=4) is None
    with settings.override(warmup=False):
        assert warmup.start(spec, "cuda", torch.float32, batch=1, prefill=4, steps=1, forward=4) is None


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_model_is_freed_as_soon_as_its_last_reference_goes(kind):
    """No reference cycle through the runner or the caches: verify deletes the reference model before it loads
    the candidate, and its memory must be free then, not whenever the cyclic garbage collector runs."""
    import gc
    import weakref

    model = tiny_model(kind)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids)
    model.generate(ids, max_new_tokens=3)
    gc.disable()
    try:
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_the_graph_signature_follows_every_way_a_tensor_or_module_is_swapped():
    """The runner lists the model's modules once (host time per pass), yet a graph must never replay over
    changed weights: the signature has to change for a parameter set anew, a parameter's storage swapped in
    place, a buffer set through the module's table, and a submodule replaced; and `hooked` sees a hook added
    after the list was made."""
    model = tiny_model("dense")
    runner = model.runner
    mixer = model.backbone.layers[0].mixer
    seen = [runner.decode_signature(fused=True)]
    assert seen[0] is not None and runner.decode_signature(fused=True) == seen[0]      # stable when nothing changed

    def changed() -> bool:
        now = runner.decode_signature(fused=True)
        fresh = now not in seen
        seen.append(now)
        return fresh

    mixer.in_proj.weight = torch.nn.Parameter(mixer.in_proj.weight.detach().clone(), requires_grad=False)
    assert changed()
    mixer.out_proj.weight.data = mixer.out_proj.weight.detach().clone()
    assert changed()
    mixer.register_buffer("scratch", torch.zeros(4))           # this model has no buffers of its own
    assert changed()
    mixer._buffers["scratch"] = torch.zeros(4)
    assert changed()
    old = mixer.norm
    mixer.norm = type(old)(old.weight.numel(), old.group_size, old.eps)
    assert mixer.norm in runner.modules() and old not in runner.modules()
    assert changed()
    with settings.override(skinny=not settings.current().skinny):   # a kernel switch: other launches, another graph
        assert changed()
    assert not runner.hooked()
    handle = mixer.norm.register_forward_hook(lambda *a: None)
    assert runner.hooked()
    handle.remove()
    assert not runner.hooked()


@pytest.mark.parametrize("pos", [1, 5, 11])
def test_decode_attention_given_the_new_key_stores_it_then_attends_on_the_cpu(pos):
    """kernels.decode_attention's reference path with new_kv (this token's key and value): the copy into the cache
    at pos, then the attention over the valid keys up to pos, as the fused CUDA kernel does in one launch."""
    g = torch.Generator().manual_seed(pos)
    b, hk, rep, d, length = 2, 2, 3, 16, 12
    q = torch.randn(b, hk * rep, d, generator=g)
    keys, values = torch.randn(b, hk, length, d, generator=g), torch.randn(b, hk, length, d, generator=g)
    k_new, v_new = torch.randn(b, hk, d, generator=g), torch.randn(b, hk, d, generator=g)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, 0] = False                                           # a left-padded row
    where = torch.tensor([pos])
    want_k, want_v = keys.clone(), values.clone()
    want_k[:, :, pos], want_v[:, :, pos] = k_new, v_new
    got = kernels.decode_attention(q, keys, values, valid, where, new_kv=(k_new, v_new))
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    mask = valid[:, None, None, :pos + 1]
    want = kernels.attention(q[:, :, None], want_k[:, :, :pos + 1], want_v[:, :, :pos + 1], mask, False)[:, :, 0]
    assert torch.equal(got, want)
    other = kernels.decode_attention(q, keys, values, valid, torch.tensor([pos - 1]))
    assert not torch.equal(other[0], got[0])                        # the new key takes part
