"""The pieces of `verify`: metrics, prompts, profile selection, fingerprints, the report and its rendering."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

import nemoconv
from nemoconv.cli import render_verify
from nemoconv.errors import NemoconvError
from nemoconv.verification import fingerprint, profiles, runner
from nemoconv.verification.metrics import LogitStats, cache_consistency, first_divergence
from nemoconv.verification.prompts import BUILTIN_TEXTS, builtin_prompts, read_prompt_file

FAST = dict(num_prompts=2, seq_len=16, max_new_tokens=4)


# ---- metrics -----------------------------------------------------------------------------------------


def test_identical_logits_give_perfect_scores():
    x = torch.randn(5, 32)
    s = LogitStats().add(x, x.clone()).summary()
    assert s["max_abs_diff"] == 0 and s["mean_abs_diff"] == 0 and s["kl_mean"] == 0
    assert s["cosine_mean"] == pytest.approx(1.0, abs=1e-15) and s["top1_agreement"] == 1.0
    assert s["positions"] == 5


def test_kl_matches_a_hand_computed_two_class_case():
    ref = torch.tensor([[0.0, 0.0]], dtype=torch.float64)            # p = (1/2, 1/2)
    cand = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # q = (3/4, 1/4)
    s = LogitStats().add(ref, cand).summary()
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert s["kl_mean"] == pytest.approx(expected, rel=1e-12)
    assert s["top1_agreement"] == 1.0  # a tie in ref resolves to index 0, as does cand's argmax


def test_constant_shift_changes_abs_diff_but_not_kl():
    x = torch.randn(3, 16, dtype=torch.float64)
    s = LogitStats().add(x, x + 2.0).summary()
    assert s["max_abs_diff"] == pytest.approx(2.0) and s["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["top1_agreement"] == 1.0 and s["cosine_mean"] < 1.0


def test_nan_in_candidate_propagates_to_max_abs_diff():
    x = torch.randn(2, 8)
    y = x.clone()
    y[1, 3] = float("nan")
    s = LogitStats().add(x, y).summary()
    assert math.isnan(s["max_abs_diff"]) and s["nonfinite_candidate_logits"] == 1


def test_stats_merge_equals_one_pass():
    a, b = torch.randn(7, 20), torch.randn(7, 20)
    whole = LogitStats().add(a, b).summary()
    merged = LogitStats().add(a[:3], b[:3]).merge(LogitStats().add(a[3:], b[3:])).summary()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value, rel=1e-12), key


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([], []) is None


def test_cache_consistency_is_relative_to_the_largest_logit():
    full = torch.tensor([[10.0, -20.0, 5.0]], dtype=torch.float64)
    c = cache_consistency(full + torch.tensor([[0.0, 0.2, 0.0]], dtype=torch.float64), full)
    assert c["max_abs_diff"] == pytest.approx(0.2, rel=1e-6) and c["relative"] == pytest.approx(0.01, rel=1e-6)


# ---- prompts -----------------------------------------------------------------------------------------


def word_tokenizer(path: Path, vocab_size: int = 200) -> Path:
    """A small word-level tokenizer.json (ids < vocab_size) built with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for text in BUILTIN_TEXTS for w in text.replace("\n", " ").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words[: vocab_size - 1])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_builtin_prompts_are_deterministic_and_within_vocab():
    a = builtin_prompts(3, 20, None, 256)
    b = builtin_prompts(3, 20, None, 256)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert len({tuple(p.ids) for p in a}) == 3
    assert all(len(p.ids) == 20 and all(0 <= t < 256 for t in p.ids) for p in a)
    assert builtin_prompts(1, 8, None, 7)[0].ids and max(builtin_prompts(1, 50, None, 7)[0].ids) < 7


def test_builtin_prompts_use_text_when_a_tokenizer_exists(tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(word_tokenizer(tmp_path / "tokenizer.json")))
    prompts = builtin_prompts(len(BUILTIN_TEXTS) + 1, 16, tok, 256)
    assert all(p.text == BUILTIN_TEXTS[i] for i, p in enumerate(prompts[:-1]))
    assert prompts[-1].text is None and len(prompts[-1].ids) == 16  # beyond the texts: seeded ids


def test_prompt_file_text_lines_and_jsonl(tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(word_tokenizer(tmp_path / "tokenizer.json")))
    text = tmp_path / "p.txt"
    text.write_text("The history of the printing press\n\n  Mamba layers replace attention\n")
    prompts = read_prompt_file(text, tok, 256)
    assert [p.source for p in prompts] == [f"{text}:1", f"{text}:3"] and prompts[0].text.startswith("The")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"input_ids": [5, 6, 7]}\n{"text": "The history"}\n')
    prompts = read_prompt_file(jl, tok, 256)
    assert prompts[0].ids == [5, 6, 7] and prompts[1].text == "The history"


@pytest.mark.parametrize("content,needle", [
    ("", "prompts file is empty"),
    ('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n', "p.jsonl:2: not valid JSON"),
    ('{"input_ids": [1, 999]}\n', "token id 999 is outside the model's vocabulary (0..255)"),
    ('{"input_ids": []}\n', "input_ids must be a non-empty list of integers"),
    ('{"input_ids": [1, "a"]}\n', "input_ids must be a non-empty list of integers"),
    ('{"prompt": "x"}\n', 'must be an object with "text" or "input_ids"'),
    ('[1, 2, 3]\n', 'must be an object with "text" or "input_ids"'),
    ('{"text": "hello"}\n', "neither checkpoint has a tokenizer.json"),
])
def test_bad_prompt_files_raise_one_clear_line(tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(NemoconvError) as exc:
        read_prompt_file(path, None, 256)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_text_prompts_without_tokenizer_and_missing_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello world\n")
    with pytest.raises(NemoconvError, match=r"p.txt:1: text prompt, but neither checkpoint has a tokenizer.json"):
        read_prompt_file(path, None, 256)
    with pytest.raises(NemoconvError, match="prompts file not found"):
        read_prompt_file(tmp_path / "missing.txt", None, 256)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(NemoconvError, match="not UTF-8"):
        read_prompt_file(path, None, 256)


def test_verify_with_a_text_prompt_file_and_tokenizer(tiny_dir, tmp_path, capsys):
    from helpers import read_json, run_cli

    src = tmp_path / "ref"
    shutil.copytree(tiny_dir("dense"), src)
    word_tokenizer(src / "tokenizer.json")
    nemoconv.convert(src, tmp_path / "cand", to="max")
    assert (tmp_path / "cand" / "tokenizer.json").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The history of the printing press begins in the fifteenth century, when Johannes\n"
                       "Mamba layers\n")
    code, out, err = run_cli(["verify", src, tmp_path / "cand", "--prompts", prompts, "--seq-len", "12",
                              "--max-new-tokens", "3", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, (out, err)
    data = read_json(tmp_path / "r.json")
    assert [p["source"] for p in data["prompts"]] == [f"{prompts}:1", f"{prompts}:2"]
    assert all(p["tokens"] == 12 for p in data["prompts"])
    # the two-word prompt was extended to --seq-len by the reference's greedy continuation
    assert "extended_from" not in data["prompts"][0] and data["prompts"][1]["extended_from"] == 2
    assert any("extended" in n for n in data["notes"])
    assert data["settings"]["tokenizer"].endswith("tokenizer.json")


def test_bad_prompt_file_through_cli_exits_2(tiny_dir, tmp_path, capsys):
    from helpers import run_cli

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"input_ids": [1, 2, 300]}\n')
    code, out, err = run_cli(["verify", tiny_dir("dense"), tiny_dir("dense"), "--prompts", bad], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "p.jsonl:1: token id 300 is outside" in err


def test_tokenizer_beyond_the_model_vocabulary_is_rejected(tiny_dir, tmp_path):
    src = tmp_path / "ref"
    shutil.copytree(tiny_dir("dense"), src)
    word_tokenizer(src / "tokenizer.json", vocab_size=400)  # the model has 256 tokens
    with pytest.raises(NemoconvError, match="does not belong to this checkpoint"):
        nemoconv.verify(src, src, **FAST)


def test_prompts_given_as_a_python_list(tiny_dir):
    src = tiny_dir("dense")
    report = nemoconv.verify(src, src, prompts=[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]],
                             seq_len=16, max_new_tokens=2)
    assert report.passed and report.prompts[0]["tokens"] == 16 and report.prompts[0]["source"] == "prompts[0]"
    with pytest.raises(NemoconvError, match="a prompt must be a string or a non-empty list of token ids"):
        nemoconv.verify(src, src, prompts=[[]], seq_len=16)


# ---- configs and profiles ----------------------------------------------------------------------------


def test_quantization_fields_and_pattern_spelling_are_not_network_differences(tiny_dir):
    from nemoconv.data.demo_checkpoint import tiny_config
    from nemoconv.storage.config import LAYER_KIND_NAMES, parse_config

    cfg = tiny_config("dense")
    other = dict(cfg, quantization_config={"quant_method": "modelopt", "quant_algo": "FP8"})
    other["layers_block_type"] = [LAYER_KIND_NAMES[c] for c in other.pop("hybrid_override_pattern")]
    assert profiles.network_differences(parse_config(cfg), parse_config(other)) == []
    wider = dict(cfg, hidden_size=128)
    diffs = profiles.network_differences(parse_config(cfg), parse_config(wider))
    assert diffs == ["different hidden_size: 64 vs 128"]


def test_profile_is_exact_for_conversions_whose_casts_only_widen(tiny_dir, tmp_path):
    # issue 13: decided by the tensors in hf names, not by following manifests
    src = tiny_dir("moe", torch.bfloat16)
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    nemoconv.convert(tmp_path / "nemo", tmp_path / "max", to="max")
    ck = nemoconv.open_checkpoint
    profile, why = profiles.choose_profile(ck(src), ck(tmp_path / "max"))
    assert profile == "exact" and "widened" in why and "backbone.layers.0.mixer.A_log bfloat16 → float32" in why
    profile, why = profiles.choose_profile(ck(src), ck(src))
    assert (profile, why) == ("exact", "lossless: the same 89 tensors with identical dtypes")


def test_profile_is_bf16_when_a_scheme_narrows_a_tensor(tiny_dir, tmp_path):
    src = tiny_dir("moe", torch.float32)
    nemoconv.convert(src, tmp_path / "max", to="max")  # MAX keeps the router gate in bf16
    profile, why = profiles.choose_profile(nemoconv.open_checkpoint(src), nemoconv.open_checkpoint(tmp_path / "max"))
    assert profile == "bf16" and "3 tensor(s) narrowed" in why
    assert "backbone.layers.1.mixer.gate.weight float32 → bfloat16" in why


def test_profile_ignores_the_manifest_of_a_moved_or_foreign_reference(tiny_dir, tmp_path):
    src = tmp_path / "original"
    shutil.copytree(tiny_dir("dense"), src)
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    moved = tmp_path / "moved"
    src.rename(moved)
    ck = nemoconv.open_checkpoint
    assert profiles.choose_profile(ck(moved), ck(tmp_path / "nemo"))[0] == "exact"
    # a bf16 reference against the fp32 nemo candidate: every float widened → exact (the logits then decide)
    other = tiny_dir("dense", torch.bfloat16)
    profile, why = profiles.choose_profile(ck(other), ck(tmp_path / "nemo"))
    assert profile == "exact" and "widened" in why
    # the reverse narrows
    profile, why = profiles.choose_profile(ck(tmp_path / "nemo"), ck(other))
    assert profile == "bf16" and "narrowed" in why


def test_profile_fp8_when_only_one_side_is_quantized(tiny_dir, tmp_path):
    src = tiny_dir("dense")
    cand = tmp_path / "q"
    shutil.copytree(src, cand)
    tensors = load_file(str(cand / "model.safetensors"))
    w = tensors["backbone.layers.1.mixer.up_proj.weight"]
    tensors["backbone.layers.1.mixer.up_proj.weight"] = (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn)
    tensors["backbone.layers.1.mixer.up_proj.weight_scale"] = (w.abs().max() / 448).reshape(())
    tensors["backbone.layers.1.mixer.up_proj.input_scale"] = torch.tensor(0.05)
    save_file(tensors, str(cand / "model.safetensors"))
    ck = nemoconv.open_checkpoint
    profile, why = profiles.choose_profile(ck(src), ck(cand))
    assert profile == "fp8" and "candidate is quantized" in why and "1 tensor(s) FP8 on one side only" in why
    assert "backbone.layers.1.mixer.up_proj.weight float32 → float8_e4m3fn" in why


def test_thresholds_overrides_and_their_errors():
    t = profiles.resolve_thresholds("fp8", {"min_cosine": 0.5, "min_top1": None, "max_kl": None, "max_abs": None})
    assert t["min_cosine"] == 0.5 and t["min_top1"] == 0.90 and t["max_kl"] == 0.05
    assert t["overridden"] == ["min_cosine"]
    with pytest.raises(NemoconvError, match="unknown threshold 'cosine'"):
        profiles.resolve_thresholds("bf16", {"cosine": 0.9})
    with pytest.raises(NemoconvError, match="min_top1 = 2.0 is out of range"):
        profiles.resolve_thresholds("bf16", {"min_top1": 2})
    with pytest.raises(NemoconvError, match="unknown profile"):
        profiles.resolve_thresholds("int4", None)


def test_exact_on_cuda_allows_two_ulps_at_the_largest_logit():
    assert profiles.exact_cuda_tolerance(20.0, torch.bfloat16) == 2 * 2.0 ** (4 - 7)
    assert profiles.exact_cuda_tolerance(0.75, torch.float32) == 2 * 2.0 ** (-1 - 23)


def test_cache_tolerance_by_dtype_and_fp8():
    assert profiles.cache_tolerance(torch.float32, False) == 1e-3
    assert profiles.cache_tolerance(torch.float32, True) == 5e-2
    assert profiles.cache_tolerance(torch.bfloat16, False) == 5e-2


# ---- the gate's own checks ---------------------------------------------------------------------------


class _DecodeShifted:
    """A loaded model whose cached decode steps add a constant to every logit: softmax and argmax are
    unchanged, so only cache consistency can see it."""

    def __init__(self, model, shift: float):
        self._model, self._shift = model, shift

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def decode_step(self, tokens, cache):
        return self._model.decode_step(tokens, cache) + self._shift


def test_inconsistent_cache_fails_the_gate(tiny_dir, tmp_path, monkeypatch):
    src = tiny_dir("dense")
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    real = runner._load_model
    cand_path = (tmp_path / "nemo").resolve()

    def load(path, device, dtype):
        model = real(path, device, dtype)
        return _DecodeShifted(model, 0.5) if Path(path).resolve() == cand_path else model

    monkeypatch.setattr(runner, "_load_model", load)
    report = nemoconv.verify(src, tmp_path / "nemo", **FAST)
    assert not report.passed
    assert [c["metric"] for c in report.failed_checks()] == ["cache_relative_diff"]
    assert report.failure_line().startswith("cache_relative_diff ") and "> max_cache_relative 0.001" in \
        report.failure_line()
    assert report.cache["reference"]["relative_max"] < 1e-3  # the reference ran unshifted


def test_nan_candidate_fails_and_the_report_stays_valid_json(tiny_dir, tmp_path):
    src = tiny_dir("dense")
    cand = tmp_path / "nan"
    shutil.copytree(src, cand)
    tensors = load_file(str(cand / "model.safetensors"))
    tensors["backbone.norm_f.weight"][0] = float("nan")
    save_file(tensors, str(cand / "model.safetensors"))
    report = nemoconv.verify(src, cand, report_path=tmp_path / "r.json", **FAST)
    assert not report.passed and report.failure_line().startswith("candidate produced")
    data = json.loads((tmp_path / "r.json").read_text())  # strict JSON: no NaN literals
    assert data["overall"]["max_abs_diff"] == "nan" and data["passed"] is False


def test_nan_reference_is_bad_input(tiny_dir, tmp_path):
    ref = tmp_path / "nan"
    shutil.copytree(tiny_dir("dense"), ref)
    tensors = load_file(str(ref / "model.safetensors"))
    tensors["lm_head.weight"][3, 0] = float("inf")
    save_file(tensors, str(ref / "model.safetensors"))
    with pytest.raises(NemoconvError, match="reference produces .* non-finite logits"):
        nemoconv.verify(ref, tiny_dir("dense"), **FAST)


def test_zero_new_tokens_still_checks_the_cache(tiny_dir):
    src = tiny_dir("latent")
    report = nemoconv.verify(src, src, num_prompts=1, seq_len=10, max_new_tokens=0)
    assert report.passed and report.prompts[0]["candidate_tokens"] == []
    assert report.cache["candidate"]["positions"] == 5  # prefill's last position + 4 teacher-forced steps


# ---- fingerprints and the report file ---------------------------------------------------------------


def test_fingerprint_full_and_sampled(tiny_dir, tmp_path):
    src = tmp_path / "a"
    shutil.copytree(tiny_dir("dense"), src)
    ck = nemoconv.open_checkpoint(src)
    full = fingerprint.fingerprint(ck)
    assert set(full) >= {"sha256_full", "bytes", "files"} and "sha256_sampled" not in full
    sampled = fingerprint.fingerprint(ck, full_limit=0)
    assert "sha256_full" not in sampled and "1 MiB every 64 MiB" in sampled["sample"]
    assert sampled["sha256_sampled"] != full["sha256_full"]
    assert fingerprint.fingerprint(ck)["sha256_full"] == full["sha256_full"]
    tensors = load_file(str(src / "model.safetensors"))
    tensors["backbone.norm_f.weight"][5] += 1.0  # same names, dtypes, shapes; one value differs
    save_file(tensors, str(src / "model.safetensors"))
    assert fingerprint.fingerprint(nemoconv.open_checkpoint(src))["sha256_full"] != full["sha256_full"]


def test_report_is_replaced_atomically(tiny_dir, tmp_path):
    src = tiny_dir("dense")
    path = tmp_path / "out" / "report.json"
    path.parent.mkdir()
    path.write_text("old")
    report = nemoconv.verify(src, src, report_path=path, **FAST)
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert os.listdir(path.parent) == ["report.json"]  # no temporary file left behind
    assert data["thresholds"]["max_cache_relative"] == 1e-3 and data["settings"]["teacher_forced_steps"] == 4


def test_render_report_shows_rows_and_the_verdict(tiny_dir, tmp_path, capsys):
    src = tiny_dir("dense")
    nemoconv.convert(src, tmp_path / "max", to="max", dtype="bfloat16")
    ok = nemoconv.verify(src, tmp_path / "max", **FAST)                    # auto: bf16, passes
    bad = nemoconv.verify(src, tmp_path / "max", profile="exact", **FAST)  # bf16 rounding is not exact
    console = Console(record=True, width=100)
    render_verify.render_report(ok, console)
    text = console.export_text()
    assert "#0" in text and "#1" in text and "overall" in text and "PASS (bf16)" in text
    console = Console(record=True, width=100)
    render_verify.render_report(bad, console)
    text = console.export_text()
    assert "FAIL: max_abs_diff" in text and "> max_abs 0.0 (profile exact)" in text
    capsys.readouterr()
    render_verify.render_report(bad, None)
    assert capsys.readouterr() == ("", "")


def test_mtp_difference_is_a_note_not_a_different_network(tiny_dir, tmp_path):
    cand = tmp_path / "mtp"
    shutil.copytree(tiny_dir("dense"), cand)
    cfg = json.loads((cand / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # MTP heads declared (optional tensors, never run)
    (cand / "config.json").write_text(json.dumps(cfg))
    report = nemoconv.verify(tiny_dir("dense"), cand, **FAST)
    assert report.passed and any("MTP heads differ" in n for n in report.notes)


def test_cache_failure_of_both_models_blames_the_model_not_the_checkpoint(tiny_dir, monkeypatch):
    real = runner._load_model
    monkeypatch.setattr(runner, "_load_model", lambda *a: _DecodeShifted(real(*a), 0.5))
    report = nemoconv.verify(tiny_dir("dense"), tiny_dir("dense"), **FAST)
    assert not report.passed and "the reference exceeds it too" in report.failure_line()
