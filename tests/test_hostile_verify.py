"""Issue 13, through the CLI in a subprocess: verify decides its own thresholds, and upload trusts only a verify
record that belongs to the files.

Each test asserts the exit code, the one-line message, and that no byte outside what the command may write
changed (verify writes only CANDIDATE/nemoconv-verify.json and its model card; upload --dry-run writes nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nemoconv

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-prompts", "1", "--seq-len", "12", "--max-new-tokens", "3", "--device", "cpu"]
RECORD = "nemoconv-verify.json"
VERIFY_WRITES = {RECORD, "README.md"}


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="2000", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "nemoconv.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def digest(*directories: Path, skip=frozenset()) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in directories
            for p in sorted(Path(d).rglob("*")) if p.is_file() and p.name not in skip}


def one_line(stderr: str) -> str:
    lines = stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def verify(ref: Path, cand: Path, *extra) -> subprocess.CompletedProcess:
    """Run verify and check that only the candidate's record and card may have changed."""
    before = digest(ref, cand, skip=VERIFY_WRITES)
    res = cli("verify", ref, cand, *FAST, *extra)
    assert digest(ref, cand, skip=VERIFY_WRITES) == before
    return res


GATE_FAILS, REFUSED = 1, 2  # exit codes: the candidate missed the gate; bad input or a refused upload
_FIRST_WORD = {GATE_FAILS: "FAIL: ", REFUSED: "error: "}


def assert_exits(res: subprocess.CompletedProcess, code: int, *needles) -> str:
    """Exit `code` with one line on stderr, starting as that exit's line does and holding every needle."""
    assert res.returncode == code, (res.stdout, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith(_FIRST_WORD[code]), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def upload(directory: Path, *extra) -> subprocess.CompletedProcess:
    before = digest(directory)
    res = cli("upload", directory, "--repo-id", "me/tiny", "--dry-run", *extra)
    assert digest(directory) == before
    return res


def edit_tensors(directory: Path, edit) -> None:
    """Rewrite a checkpoint's tensors in place, same files and metadata (a manifest, if any, stays)."""
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            metadata = h.metadata()
        tensors = load_file(str(f))
        edit(tensors)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(f), metadata=metadata)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def dense(tiny_dir):
    """A tiny dense fp32 checkpoint without a manifest (as any other tool would write it)."""
    return tiny_dir("dense", torch.float32)


# ---- verify decides its own thresholds ---------------------------------------------------------------


def test_zeroed_conv1d_bias_without_manifest_fails(dense, tmp_path):
    cand = copy_of(dense, tmp_path / "cand")

    def zero(t):
        t["backbone.layers.0.mixer.conv1d.bias"].zero_()

    edit_tensors(cand, zero)
    assert_exits(verify(dense, cand), GATE_FAILS, "max_abs_diff", "(profile exact)")


def test_fp32_norm_scaled_by_1_001_without_manifest_fails(dense, tmp_path):
    cand = copy_of(dense, tmp_path / "cand")

    def scale(t):
        t["backbone.layers.1.norm.weight"].mul_(1.001)

    edit_tensors(cand, scale)
    assert_exits(verify(dense, cand), GATE_FAILS, "max_abs_diff", "(profile exact)")


def test_forged_manifest_claiming_fp8_gets_exact_from_the_tensors(dense, tmp_path):
    cand = copy_of(dense, tmp_path / "cand")
    (cand / "nemoconv-manifest.json").write_text(json.dumps({
        "source": str(dense), "lossless": False, "tensors": [],
        "lossy_steps": [{"tensor": "backbone.layers.1.mixer.up_proj.weight", "step": "quantize",
                         "detail": "FP8 E4M3 quantization"}]}))

    def scale(t):
        t["backbone.layers.1.norm.weight"].mul_(1.001)

    edit_tensors(cand, scale)
    assert_exits(verify(dense, cand), GATE_FAILS, "(profile exact)")
    record = json.loads((cand / RECORD).read_text())
    assert record["profile"] == "exact"
    assert record["profile_reason"] == "lossless: the same 44 tensors with identical dtypes"


def test_tensor_sets_that_differ_are_bad_input_for_profile_auto(dense, tmp_path):
    # a tied-embedding config: the candidate stores no lm_head, the reference stores one
    cand = copy_of(dense, tmp_path / "cand")
    config = json.loads((cand / "config.json").read_text())
    (cand / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    edit_tensors(cand, lambda t: t.pop("lm_head.weight"))
    ref = copy_of(cand, tmp_path / "ref")
    edit_tensors(ref, lambda t: t.__setitem__("lm_head.weight", t["backbone.embeddings.weight"].clone()))
    assert_exits(verify(ref, cand), REFUSED, "profile auto: reference and candidate hold different tensors",
                   "1 only in the reference (lm_head.weight)", "pass --profile")


# ---- tokenizer and generation ids ----------------------------------------------------------------------


def word_level_tokenizer(words: list[str]) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [
        {"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(["<unk>", *words])}, "unk_token": "<unk>"}}


@pytest.fixture
def with_tokenizer(dense, tmp_path):
    ref = copy_of(dense, tmp_path / "ref")
    words = ["the", "of", "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "on", "was"]
    (ref / "tokenizer.json").write_text(json.dumps(word_level_tokenizer(words)))
    (ref / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return ref


def test_permuted_tokenizer_ids_fail_even_profile_exact(with_tokenizer, tmp_path):
    cand = copy_of(with_tokenizer, tmp_path / "cand")
    tok = json.loads((cand / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (cand / "tokenizer.json").write_text(json.dumps(tok))
    line = assert_exits(verify(with_tokenizer, cand, "--profile", "exact"), GATE_FAILS,
                        "tokenizer or generation ids differ")
    assert "tokenizer.json vocab: 2 ids differ, first 'the' 1→3" in line and "--allow-tokenizer-diff" in line


def test_different_eos_token_id_fails(with_tokenizer, tmp_path):
    cand = copy_of(with_tokenizer, tmp_path / "cand")
    (cand / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 3}))
    assert_exits(verify(with_tokenizer, cand), GATE_FAILS, "generation_config.json eos_token_id 2 vs 3")


def test_generation_config_on_one_side_only_fails(with_tokenizer, tmp_path):
    cand = copy_of(with_tokenizer, tmp_path / "cand")
    (cand / "generation_config.json").unlink()
    assert_exits(verify(with_tokenizer, cand), GATE_FAILS, "generation_config.json: in the reference only")


def test_allow_tokenizer_diff_passes_and_is_recorded_as_an_override(with_tokenizer, tmp_path):
    cand = tmp_path / "cand"
    nemoconv.convert(with_tokenizer, cand, to="max")  # other weight bytes: not a self-verification
    (cand / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 3}))
    res = verify(with_tokenizer, cand, "--allow-tokenizer-diff")
    assert res.returncode == 0, res.stderr
    assert "override: --allow-tokenizer-diff (1 difference(s) accepted)" in res.stdout
    record = json.loads((cand / RECORD).read_text())
    assert record["passed"] is True
    assert record["record"]["overrides"] == ["--allow-tokenizer-diff (1 difference(s) accepted)"]
    assert record["tokenizer"] == {"differences": ["generation_config.json eos_token_id 2 vs 3"], "allowed": True}
    assert_exits(upload(cand), REFUSED, "its PASS needed overrides (--allow-tokenizer-diff", "pass --force")


# ---- restore casts must be exact -----------------------------------------------------------------------


@pytest.fixture
def nemo_pair(tiny_dir, tmp_path):
    """A nemo conversion of a bf16 source (A_log/D/dt_bias widened to fp32) and a copy whose fp32 A_log was
    edited after training; both keep the manifest that says the widening is to be undone."""
    src = tiny_dir("dense", torch.bfloat16)
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    edited = copy_of(tmp_path / "nemo", tmp_path / "nemo-edited")

    def bump(t):
        t["model.layers.0.mixer._fp32_params.A_log"].add_(1e-4)

    edit_tensors(edited, bump)
    return tmp_path / "nemo", edited


def test_convert_of_an_edited_nemo_keeps_the_fp32_values(nemo_pair, tmp_path):
    _, edited = nemo_pair
    res = cli("convert", edited, tmp_path / "hf", "--to", "hf", "--quiet")
    assert res.returncode == 0, res.stderr
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    stored = load_file(str(edited / "model.safetensors"))["model.layers.0.mixer._fp32_params.A_log"]
    assert out["backbone.layers.0.mixer.A_log"].dtype == torch.float32
    assert torch.equal(out["backbone.layers.0.mixer.A_log"], stored)
    assert out["backbone.layers.2.mixer.A_log"].dtype == torch.bfloat16  # an unedited one is restored exactly


def test_verify_exact_of_original_against_edited_nemo_fails(nemo_pair):
    original, edited = nemo_pair
    assert_exits(verify(original, edited, "--profile", "exact"), GATE_FAILS, "max_abs_diff", "(profile exact)")


# ---- size bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,needle", [("--num-prompts", 5000, "4096"),
                                               ("--seq-len", 200000, "131072"),
                                               ("--max-new-tokens", 5000, "4096")])
def test_sizes_are_bounded_before_anything_is_loaded(tmp_path, flag, value, needle):
    # the checkpoints do not even exist: the bound is checked first
    res = cli("verify", tmp_path / "no-ref", tmp_path / "no-cand", flag, value)
    assert_exits(res, REFUSED, flag, needle)


def test_api_bounds_raise_before_opening(tmp_path):
    with pytest.raises(nemoconv.NemoconvError, match="--num-prompts must be an integer from 1 to 4096"):
        nemoconv.verify(tmp_path / "missing", tmp_path / "missing", num_prompts=4097)


# ---- upload trusts only a record that belongs to the files ---------------------------------------------


API_FAST = {"num_prompts": 1, "seq_len": 12, "max_new_tokens": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def passed_once(tiny_dir, tmp_path_factory):
    """A lossless max conversion of the dense checkpoint with the PASS record verify wrote (made once: the
    record is the setting here, upload is under test)."""
    out = tmp_path_factory.mktemp("passed") / "max"
    nemoconv.convert(tiny_dir("dense", torch.float32), out, to="max")
    assert nemoconv.verify(tiny_dir("dense", torch.float32), out, **API_FAST).passed
    return out


@pytest.fixture
def passed(passed_once, tmp_path):
    """A private copy of `passed_once` (a record binds bytes, not the directory's path)."""
    return copy_of(passed_once, tmp_path / "max")


def rewrite_record(directory: Path, **changes) -> None:
    record = json.loads((directory / RECORD).read_text())
    record.update(changes)
    (directory / RECORD).write_text(json.dumps(record))


def test_upload_states_what_was_verified_against_what(passed, dense):
    res = upload(passed)
    assert res.returncode == 0, res.stderr
    record = json.loads((passed / RECORD).read_text())["record"]
    ref_digest = record["reference"]["digest"][:12]
    assert (f"verified against {Path(dense).resolve()} (sha256 {ref_digest}…) with profile exact: PASS "
            f"(cos 1, top-1 1, KL 0, max|Δ| 0)") in res.stdout
    assert "--force" not in res.stdout


def test_upload_refuses_a_missing_record(passed):
    (passed / RECORD).unlink()
    assert_exits(upload(passed), REFUSED, "no verify record")


@pytest.mark.parametrize("value", ["false", "true", 1, None])
def test_upload_refuses_passed_that_is_not_the_boolean_true(passed, value):
    rewrite_record(passed, passed=value)
    assert_exits(upload(passed), REFUSED, "malformed", "not a JSON boolean")


def test_upload_refuses_a_failed_record(passed):
    rewrite_record(passed, passed=False)
    assert_exits(upload(passed), REFUSED, "says FAIL")


@pytest.mark.parametrize("text,needle", [("{\"passed\": true, \"passed\": true}", "appears twice"),
                                         ("{\"passed\": true}", "record must be a JSON object"),
                                         ("[1, 2]", "must be a JSON object"),
                                         ("{\"passed\": true, \"record\": {\"format\": 1, \"reference\": []}}",
                                          "record.reference must be a JSON object")])
def test_upload_refuses_a_malformed_record(passed, text, needle):
    (passed / RECORD).write_text(text)
    assert_exits(upload(passed), REFUSED, "malformed", needle)


def test_upload_refuses_weights_changed_after_the_pass(passed):
    def scale(t):
        t["blocks.1.norm.weight"].mul_(1.001)

    edit_tensors(passed, scale)
    assert_exits(upload(passed), REFUSED, "model.safetensors is not the file that was verified")


def test_upload_refuses_a_side_file_changed_after_the_pass(passed):
    config = (passed / "config.json").read_text()
    (passed / "config.json").write_text(config.replace('"eos_token_id": 2', '"eos_token_id": 3'))
    assert_exits(upload(passed), REFUSED, "config.json is not the file that was verified")


def test_upload_refuses_a_record_copied_from_another_checkpoint(passed, dense, tmp_path):
    nemoconv.convert(dense, tmp_path / "nemo", to="nemo")
    shutil.copy(passed / RECORD, tmp_path / "nemo" / RECORD)
    assert_exits(upload(tmp_path / "nemo"), REFUSED, "model.safetensors is not the file that was verified")


def test_upload_refuses_a_different_set_of_weight_files(passed, tmp_path):
    nemoconv.convert(passed, tmp_path / "sharded", to="max", max_shard_size="100KB")
    shutil.copy(passed / RECORD, tmp_path / "sharded" / RECORD)
    assert_exits(upload(tmp_path / "sharded"), REFUSED, "its weight files differ from the verify record",
                   "recorded but gone: model.safetensors")


def test_upload_refuses_a_self_verification(dense, tmp_path):
    cand = copy_of(dense, tmp_path / "copy")
    res = verify(cand, cand)
    assert res.returncode == 0, res.stderr
    assert_exits(upload(cand), REFUSED, "verified against itself (the same directory")
    other = copy_of(dense, tmp_path / "copy2")
    assert nemoconv.verify(dense, other, **API_FAST).passed
    assert_exits(upload(other), REFUSED, "verified against itself (the same weights")


def test_upload_refuses_overridden_thresholds_unless_forced(dense, tmp_path):
    cand = copy_of(dense, tmp_path / "cand")

    def scale(t):
        t["backbone.layers.1.norm.weight"].mul_(1.001)

    edit_tensors(cand, scale)
    res = verify(dense, cand, "--profile", "bf16")
    assert res.returncode == 0, res.stderr
    assert_exits(upload(cand), REFUSED, "its PASS needed overrides (--profile bf16, looser than auto's exact)")
    assert nemoconv.verify(dense, cand, overrides={"max_abs": 1.0}, **API_FAST).passed
    assert_exits(upload(cand), REFUSED, "its PASS needed overrides (max_abs = 1.0 (profile exact: 0.0))")
    res = upload(cand, "--force")
    assert res.returncode == 0, res.stderr
    assert "with profile exact: PASS" in res.stdout
    assert "uploaded with --force despite: its PASS needed overrides (max_abs = 1.0" in res.stdout
