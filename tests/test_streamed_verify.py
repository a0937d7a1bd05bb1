"""verify of checkpoints larger than the device: layers streamed one at a time (nemoconv.verification.streamed),
the per-layer builder (nemoconv.model.layers), memory caps and the whole-model/streaming choice."""

from __future__ import annotations

import copy

import pytest
import torch

import nemoconv
from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.commands.verify import run_model
from nemoconv.errors import NemoconvError
from nemoconv.model import layers
from nemoconv.model.loading import load_model
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.verification.memory import choose_streaming, parse_memory_size, piece_sizes, whole_model_bytes
from nemoconv.verification.metrics import first_divergence
from nemoconv.verification.prompts import builtin_prompts, prompts_from_list
from nemoconv.verification.streamed import run_model_streamed

CPU = torch.device("cpu")
# Layers much larger than the activations of a short run, so that a cap can hold ~2 layers but not the model.
BIG_LAYERS = {"hybrid_override_pattern": "ME-E*E-E", "intermediate_size": 1024, "moe_intermediate_size": 256,
              "n_routed_experts": 16, "n_group": 1, "topk_group": 1}


def _prompts(ck_dir, n=3, seq_len=24):
    return builtin_prompts(n, seq_len, None, open_checkpoint(ck_dir).spec.vocab_size)


def _runs(ck_dir, new_tokens, n=3, seq_len=24, **streamed):
    prompts = _prompts(ck_dir, n, seq_len)
    whole = run_model(ck_dir, CPU, torch.float32, copy.deepcopy(prompts), seq_len, new_tokens, False)
    layered = run_model_streamed(ck_dir, CPU, torch.float32, copy.deepcopy(prompts), seq_len, new_tokens, False,
                                 **streamed)
    return whole, layered


def _same_run(a, b) -> bool:
    return (len(a.prompt_logits) == len(b.prompt_logits)
            and all(torch.equal(x, y) for x, y in zip(a.prompt_logits, b.prompt_logits))
            and a.generated == b.generated and a.cache == b.cache and a.nonfinite == b.nonfinite)


@pytest.mark.parametrize("kind", ["moe", "dense", "latent"])
def test_streamed_run_is_bit_identical_to_the_whole_model_on_cpu(tiny_dir, kind):
    whole, layered = _runs(tiny_dir(kind), new_tokens=5)
    assert _same_run(whole, layered)
    assert layered.memory["weight_passes"] == 1 + 5   # pass 1, 4 decode passes, the full forward


@pytest.mark.parametrize("new_tokens", [0, 1])
def test_streamed_run_without_continuation_takes_one_pass_and_stays_identical(tiny_dir, new_tokens):
    whole, layered = _runs(tiny_dir("moe"), new_tokens=new_tokens)
    assert _same_run(whole, layered)
    assert layered.memory["weight_passes"] == 1


@pytest.mark.parametrize("scheme", ["nemo", "max"])
def test_layers_built_one_at_a_time_compute_the_whole_models_logits_in_every_scheme(tiny_dir, tmp_path, scheme):
    out = tmp_path / scheme
    nemoconv.convert(tiny_dir("moe"), out, to=scheme)
    ck = open_checkpoint(out)
    ids = torch.randint(0, ck.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    index = layers.piece_names(ck)
    with TensorReader() as reader:
        ends = layers.build_ends(ck.spec, layers.read_piece(ck, index[layers.ENDS], reader), CPU, torch.float32)
        hidden = layers.embed(ends, ids)
        for i in range(ck.spec.num_layers):
            block = layers.build_layer(ck.spec, i, layers.read_piece(ck, index[i], reader), CPU, torch.float32)
            hidden = layers.layer_forward(block, hidden)
    assert torch.equal(layers.head_logits(ends, hidden), load_model(out)(ids))


def test_a_layer_missing_a_tensor_is_named_with_its_own_index(tiny_dir):
    ck = open_checkpoint(tiny_dir("moe"))
    with TensorReader() as reader:
        tensors = layers.read_piece(ck, layers.piece_names(ck)[3], reader)
    with pytest.raises(NemoconvError, match=r"backbone\.layers\.3\.") as err:
        layers.build_layer(ck.spec, 3, tensors[1:], CPU, torch.float32)
    assert "layers.0." not in str(err.value)


def test_teacher_forced_candidate_finds_the_same_first_divergence_in_one_pass(tiny_dir, tmp_path):
    ref_dir = tiny_dir("dense")
    cand_dir = tmp_path / "bf16"
    nemoconv.convert(ref_dir, cand_dir, to="hf", dtype="bfloat16")   # rounded weights: a later divergence
    prompts = _prompts(ref_dir, n=4)
    ref = run_model(ref_dir, CPU, torch.float32, copy.deepcopy(prompts), 24, 12, False)
    cand = run_model(cand_dir, CPU, torch.float32, copy.deepcopy(prompts), 24, 12, False)
    followed = run_model_streamed(cand_dir, CPU, torch.float32, copy.deepcopy(prompts), 24, 12, False,
                                  follow=ref.generated)
    free = [first_divergence(r, c) for r, c in zip(ref.generated, cand.generated)]
    assert [first_divergence(r, c) for r, c in zip(ref.generated, followed.generated)] == free
    assert followed.memory["weight_passes"] == 1
    assert all(torch.equal(x, y) for x, y in zip(cand.prompt_logits, followed.prompt_logits))


def test_short_prompts_are_extended_with_the_same_tokens_as_the_whole_model(tiny_dir):
    ck_dir = tiny_dir("moe")
    prompts = prompts_from_list([[5, 6, 7, 8], list(range(10, 30))], None, 256)
    a, b = copy.deepcopy(prompts), copy.deepcopy(prompts)
    for p in a + b:
        p.ids = p.ids[:24]
    whole = run_model(ck_dir, CPU, torch.float32, a, 24, 4, True)
    layered = run_model_streamed(ck_dir, CPU, torch.float32, b, 24, 4, True)
    assert [p.ids for p in a] == [p.ids for p in b] and all(len(p.ids) == 24 for p in b)
    assert _same_run(whole, layered)


def test_a_cap_of_about_two_layers_is_kept_and_the_logits_do_not_change(tiny_dir):
    ck_dir = tiny_dir("moe", **BIG_LAYERS)
    ck = open_checkpoint(ck_dir)
    ends, largest, all_layers = piece_sizes(ck, torch.float32)
    cap = ends + 2 * largest + 512 * 1024          # ends, a built layer, the next one read ahead, activations
    assert cap < ends + all_layers                 # the whole model does not fit under it
    whole, layered = _runs(ck_dir, new_tokens=4, n=2, seq_len=16, max_gpu_memory=cap)
    assert _same_run(whole, layered)
    peak = layered.memory["device"]["peak_bytes"]
    assert peak <= cap and peak >= ends + 2 * largest * 0.5
    assert layered.memory["device"]["peak_by_kind"]["layer"] <= largest


def test_a_cap_below_one_layer_is_one_clear_error(tiny_dir):
    ck_dir = tiny_dir("moe", **BIG_LAYERS)
    with pytest.raises(NemoconvError, match=r"^--max-gpu-memory\S* 1\.00 MiB cannot hold one layer with its "
                                            r"activations: at least .* is needed \(") as err:
        _runs(ck_dir, new_tokens=2, n=2, seq_len=16, max_gpu_memory=1 << 20)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["0", "-1GB", "-5", "12XB", "GB", "", "1e400", "nan"])
def test_a_garbage_memory_size_names_the_flag(text):
    with pytest.raises(NemoconvError, match=r"^--max-gpu-memory: invalid size"):
        parse_memory_size(text, "--max-gpu-memory")


@pytest.mark.parametrize("text, expected", [("6GB", 6 * 10**9), ("512MiB", 512 << 20), ("1.5GiB", 3 << 29),
                                            ("4096", 4096), (None, None)])
def test_memory_sizes_parse_as_bytes(text, expected):
    assert parse_memory_size(text, "--max-host-memory") == expected


def test_auto_streams_only_when_the_whole_model_exceeds_the_cap(tiny_dir):
    ck_dir = tiny_dir("moe")
    weights, extra = whole_model_bytes(ck_dir, torch.float32)
    streams, why = choose_streaming(ck_dir, "cpu", "auto", weights // 2)
    assert streams and why.startswith("streaming layers: the whole model needs about") and "--max-gpu-memory" in why
    streams, why = choose_streaming(ck_dir, "cpu", "auto", weights + extra + 1)
    assert not streams and why.startswith("whole model:")


def test_stream_layers_on_and_off_are_obeyed_and_off_refuses_a_cap_it_cannot_keep(tiny_dir):
    ck_dir = tiny_dir("moe")
    assert choose_streaming(ck_dir, "cpu", "on", None)[0] is True
    assert choose_streaming(ck_dir, "cpu", "off", None)[0] is False
    with pytest.raises(NemoconvError, match="--stream-layers off: .* only layer streaming keeps to a cap"):
        choose_streaming(ck_dir, "cpu", "off", 1000)
    with pytest.raises(NemoconvError, match="--stream-layers must be auto, on or off"):
        choose_streaming(ck_dir, "cpu", "sometimes", None)


def test_prefix_cache_check_is_refused_when_streaming(tiny_dir):
    ck_dir = tiny_dir("moe")
    with pytest.raises(NemoconvError, match="--prefix-cache needs the whole model"):
        run_model_streamed(ck_dir, CPU, torch.float32, _prompts(ck_dir), 24, 2, False, prefix_cache=True)


def _plan(ck_dir, dev_cap, host_cap=None):
    from nemoconv.verification.memory import Plan

    ck = open_checkpoint(ck_dir)
    return Plan.make(ck, layers.piece_names(ck), torch.float32, torch.device("cuda"), rows=[2, 2], hidden_tokens=40,
                     positions=20, cache_length=24, keep_caches=True, dev_cap=dev_cap, host_cap=host_cap)


def test_on_a_gpu_states_that_do_not_fit_are_spilled_to_host_memory_and_the_host_cap_is_checked(tiny_dir):
    ck_dir = tiny_dir("moe", **BIG_LAYERS)
    roomy = _plan(ck_dir, dev_cap=None)
    assert not roomy.spill
    ends, largest, _ = piece_sizes(open_checkpoint(ck_dir), torch.float32)
    fixed = ends + largest + roomy.activations
    tight = _plan(ck_dir, dev_cap=fixed + 60_000)   # one batch's states fit, all of them do not
    assert tight.spill and tight.host_need > 0
    with pytest.raises(NemoconvError, match=r"^--max-host-memory .* needs at least .* spilled hidden states"):
        _plan(ck_dir, dev_cap=fixed + 60_000, host_cap=1000)
    with pytest.raises(NemoconvError, match=r"^--max-gpu-memory \S+ \S+ cannot hold one layer"):
        _plan(ck_dir, dev_cap=fixed)
