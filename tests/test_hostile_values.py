"""Hostile values: malformed config.json fields, safetensors headers, numeric options and weights FP8
cannot scale. Each is exit 2 with one `error:` line (never a traceback, never a huge allocation) and a
NemoconvError from the Python API, with no byte outside OUT changed; an underflowing linear is excluded
from FP8 with its partner and a warning, never written with a zero scale."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import excluded_modules, load_all, rewrite, tree_digest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NEMOCONV_CALIBRATOR"] = "builtin"
    return subprocess.run([sys.executable, "-m", "nemoconv.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_exit_2(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def neighbours(tmp_path: Path) -> dict:
    return {p.name: tree_digest(p) if p.is_dir() else p.read_bytes() for p in sorted(tmp_path.iterdir())}


# ---- config.json ------------------------------------------------------------------------------------

FIVE_THOUSAND_DIGITS = "9" * 5000
DEEP = "[" * 100000 + "]" * 100000

# (case id, {field: value} or a function of the config text, words the one line must hold)
CONFIG_CASES = [
    ("epsilon-string", {"layer_norm_epsilon": "abc"}, ["layer_norm_epsilon"]),
    ("hidden-zero-vocab-1e12", {"hidden_size": 0, "vocab_size": 1e12}, ["hidden_size"]),
    ("vocab-1e12-float", {"vocab_size": 1e12}, ["vocab_size"]),
    ("vocab-10e30", {"vocab_size": 10**30}, ["vocab_size"]),
    ("negative-size", {"intermediate_size": -96}, ["intermediate_size"]),
    ("list-for-number", {"hidden_size": [64]}, ["hidden_size", "a list"]),
    ("bool-for-int", {"num_attention_heads": True}, ["num_attention_heads", "a boolean"]),
    ("string-for-bool", {"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),
    ("5000-digits", lambda t: t.replace('"vocab_size": 256', f'"vocab_size": {FIVE_THOUSAND_DIGITS}'),
     ["config.json"]),
    ("nested-100000-deep", lambda t: t.replace('"vocab_size": 256', f'"vocab_size": {DEEP}'), ["nested"]),
    ("nan", lambda t: t.replace('"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": NaN'), ["config.json"]),
    ("1e400", lambda t: t.replace('"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": 1e400'), ["config.json"]),
    ("duplicate-key", lambda t: t.replace('"vocab_size": 256', '"vocab_size": 256, "vocab_size": 512'),
     ["appears twice"]),
    ("garbage-pattern", {"hybrid_override_pattern": "M-Q*"}, ["hybrid_override_pattern"]),
    ("number-pattern", {"hybrid_override_pattern": 42}, ["hybrid_override_pattern"]),
    ("endless-pattern", {"hybrid_override_pattern": "M-" * 50000}, ["hybrid_override_pattern", "layers"]),
    ("layer-count-mismatch", {"num_hidden_layers": 9}, ["num_hidden_layers"]),
    ("time-step-limit-short", {"time_step_limit": [0.0]}, ["time_step_limit"]),
    # the limit clamps every step size of the model: a reversed, negative or non-numeric one is refused
    ("time-step-limit-reversed", {"time_step_limit": [0.5, 0.1]}, ["time_step_limit", "low <= high"]),
    ("time-step-limit-negative", {"time_step_limit": [-1.0, 1.0]}, ["time_step_limit"]),
    ("time-step-limit-strings", {"time_step_limit": ["0", "inf"]}, ["time_step_limit[0]"]),
    ("activation-not-a-string", {"mlp_hidden_act": ["relu2"]}, ["mlp_hidden_act"]),
    ("config-not-an-object", lambda t: "[1, 2, 3]", ["config.json"]),
    # in range, but more than the stored bytes back: refused when opened, before anything is allocated
    ("vocab-beyond-embedding", {"vocab_size": 1 << 24}, ["vocab_size", "embedding"]),
    ("sizes-beyond-tensors", {"intermediate_size": 1 << 20}, ["parameters", "stores"]),
]


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    text = path.read_text()
    if callable(edit):
        new = edit(text)
        assert new != text
    else:
        cfg = json.loads(text)
        cfg.update(edit)
        new = json.dumps(cfg, indent=2)
    path.write_text(new)


@pytest.mark.parametrize("case, edit, needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config_value_is_one_line_exit_2(tiny_dir, tmp_path, case, edit, needles):
    src = copy(tiny_dir("dense"), tmp_path / "src")
    _edit_config(src, edit)
    before = neighbours(tmp_path)
    assert_exit_2(cli("convert", src, tmp_path / "out", "--to", "nemo"), *needles)
    assert neighbours(tmp_path) == before  # no output, no temp dir, source unchanged


@pytest.mark.parametrize("case, edit, needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config_value_is_a_nemoconv_error_in_the_api(tiny_dir, tmp_path, case, edit, needles):
    import nemoconv

    src = copy(tiny_dir("dense"), tmp_path / "src")
    _edit_config(src, edit)
    with pytest.raises(nemoconv.NemoconvError) as info:
        nemoconv.open_checkpoint(src)
    for needle in needles:
        assert needle in str(info.value)


def test_oversized_vocab_fails_verify_at_open_before_any_allocation(tiny_dir, tmp_path):
    src = copy(tiny_dir("dense"), tmp_path / "src")
    _edit_config(src, {"vocab_size": 1 << 24})
    before = neighbours(tmp_path)
    assert_exit_2(cli("verify", src, src, "--device", "cpu", "--num-prompts", "4096"), "vocab_size", "embedding")
    assert neighbours(tmp_path) == before


def test_transformers_infinity_in_config_is_still_read(tiny_dir, tmp_path):
    """transformers writes time_step_limit as [0.0, Infinity]; that stays readable (NaN and 1e400 do not)."""
    import nemoconv

    src = copy(tiny_dir("dense"), tmp_path / "src")
    assert "Infinity" in (src / "config.json").read_text()
    assert nemoconv.open_checkpoint(src).spec.time_step_limit == (0.0, float("inf"))


def test_parameter_count_equals_the_sum_of_expected_shapes():
    from nemoconv.data.demo_checkpoint import tiny_config
    from nemoconv.storage.config import parse_config

    for kind in ("dense", "moe", "latent"):
        for tied in (False, True):
            spec = parse_config(tiny_config(kind, tie_word_embeddings=tied, mlp_bias=True))
            assert spec.parameter_count() == sum(math.prod(s) for s in spec.hf_shapes().values())


# ---- safetensors headers ------------------------------------------------------------------------------


def _header_items(path: Path) -> tuple[list, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return list(json.loads(data[8:8 + n]).items()), data[8 + n:]


def _write_header(path: Path, text: str, body: bytes) -> None:
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _items_text(items: list) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v if isinstance(v, str) else json.dumps(v)}" for k, v in items) + "}"


def _first_tensor(items: list) -> int:
    return next(i for i, (k, _) in enumerate(items) if k != "__metadata__")


def _edit_entry(field: str, value):
    def edit(items):
        i = _first_tensor(items)
        items[i] = (items[i][0], {**items[i][1], field: value})
        return items
    return edit


def _set_metadata(value):
    def edit(items):
        return [(k, value if k == "__metadata__" else v) for k, v in items]
    return edit


def _duplicate_first(items):
    i = _first_tensor(items)
    return items[:i + 1] + [items[i]] + items[i + 1:]


def _raw_shape(text: str):
    def edit(items):
        i = _first_tensor(items)
        entry = dict(items[i][1])
        entry["shape"] = "@SHAPE@"
        items[i] = (items[i][0], json.dumps(entry).replace('"@SHAPE@"', text))
        return items
    return edit


HEADER_CASES = [
    ("duplicate-tensor-name", _duplicate_first, ["appears twice"]),
    ("metadata-list", _set_metadata(["pt"]), ["__metadata__"]),
    ("metadata-non-string-value", _set_metadata({"format": 1}), ["__metadata__"]),
    ("shape-floats", _edit_entry("shape", [2.5, 3]), ["shape"]),
    ("shape-1e400", _raw_shape("[1e400, 2]"), ["not valid JSON"]),
    ("shape-negative", _edit_entry("shape", [-1, 64]), ["shape"]),
    ("shape-overflowing-product", _edit_entry("shape", [2**62, 2**62, 2**62]), ["shape"]),
    ("shape-zero-times-huge", _edit_entry("shape", [0, 10**30]), ["shape"]),
    ("offsets-strings", _edit_entry("data_offsets", ["0", "64"]), ["data_offsets"]),
    ("offsets-one-number", _edit_entry("data_offsets", 64), ["data_offsets"]),
    ("dtype-not-a-string", _edit_entry("dtype", 5), ["dtype"]),
    ("entry-not-an-object", lambda items: [(k, [1]) if i == _first_tensor(items) else (k, v)
                                           for i, (k, v) in enumerate(items)], ["not an object"]),
]


@pytest.mark.parametrize("case, edit, needles", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_malformed_safetensors_header_is_one_line_exit_2(tiny_dir, tmp_path, case, edit, needles):
    import nemoconv

    src = copy(tiny_dir("dense"), tmp_path / "src")
    shard = src / "model.safetensors"
    items, body = _header_items(shard)
    _write_header(shard, _items_text(edit(items)), body)
    before = neighbours(tmp_path)
    assert_exit_2(cli("convert", src, tmp_path / "out", "--to", "max"), "model.safetensors", *needles)
    assert neighbours(tmp_path) == before
    with pytest.raises(nemoconv.NemoconvError):
        nemoconv.open_checkpoint(src)


def test_a_file_that_is_not_safetensors_is_named_without_its_bytes(tiny_dir, tmp_path):
    src = copy(tiny_dir("dense"), tmp_path / "src")
    secret = b"hf_SECRETtoken-that-must-not-leak\n" * 4
    (src / "model.safetensors").write_bytes(secret)
    line = assert_exit_2(cli("inspect", src), "not a safetensors file")
    leaked = struct.unpack("<Q", secret[:8])[0]
    assert str(leaked) not in line and "SECRET" not in line


# ---- numeric options ------------------------------------------------------------------------------------


OPTION_CASES = [
    ("num-prompts-1e9", ["verify", "@SRC", "@SRC", "--num-prompts", "1000000000"], "--num-prompts"),
    ("num-prompts-5000-digits", ["verify", "@SRC", "@SRC", "--num-prompts", FIVE_THOUSAND_DIGITS], "--num-prompts"),
    ("seq-len", ["verify", "@SRC", "@SRC", "--seq-len", "131073"], "--seq-len"),
    ("max-new-tokens", ["verify", "@SRC", "@SRC", "--max-new-tokens", "4097"], "--max-new-tokens"),
    ("calib-samples", ["quantize", "@SRC", "@OUT", "--calib-samples", "65537"], "--calib-samples"),
    ("calib-seq-len", ["quantize", "@SRC", "@OUT", "--calib-seq-len", "131073"], "--calib-seq-len"),
    ("calib-tokens", ["quantize", "@SRC", "@OUT", "--calib-samples", "65536", "--calib-seq-len", "131072"],
     "--calib-samples"),
    ("shard-size-1e400GB", ["convert", "@SRC", "@OUT", "--to", "hf", "--max-shard-size", "1e400GB"], "invalid size"),
    ("shard-size-inf", ["convert", "@SRC", "@OUT", "--to", "hf", "--max-shard-size", "inf"], "invalid size"),
    ("shard-size-nan", ["convert", "@SRC", "@OUT", "--to", "hf", "--max-shard-size", "nan"], "invalid size"),
    ("shard-size-negative", ["convert", "@SRC", "@OUT", "--to", "hf", "--max-shard-size", "-5GB"], "invalid size"),
    ("shard-size-absurd", ["convert", "@SRC", "@OUT", "--to", "hf", "--max-shard-size", "99999999TB"],
     "invalid size"),
]


@pytest.mark.parametrize("case, args, needle", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_out_of_range_option_is_refused_up_front(tiny_dir, tmp_path, case, args, needle):
    src = copy(tiny_dir("dense"), tmp_path / "src")
    before = neighbours(tmp_path)
    args = [str(src) if a == "@SRC" else str(tmp_path / "out") if a == "@OUT" else a for a in args]
    result = cli(*args, timeout=60)
    assert_exit_2(result, needle)
    assert neighbours(tmp_path) == before


@pytest.mark.parametrize("value", ["1e400GB", "inf", "nan", "-5GB", "0", "99999999TB", FIVE_THOUSAND_DIGITS, 2**80,
                                   True, 1.5])
def test_parse_size_refuses_non_sizes(value):
    from nemoconv.errors import NemoconvError
    from nemoconv.stream.output import parse_size

    with pytest.raises(NemoconvError, match="invalid size"):
        parse_size(value)


def test_quantize_api_bounds_calibration_sizes(tiny_dir, tmp_path):
    import nemoconv

    for kwargs in ({"calib_samples": 10**9}, {"calib_seq_len": 10**9}, {"calib_samples": True}):
        with pytest.raises(nemoconv.NemoconvError, match="--calib"):
            nemoconv.quantize(tiny_dir("dense"), tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---- weights FP8 cannot scale -----------------------------------------------------------------------------

TINY = "backbone.layers.1.mixer.up_proj"
PARTNER = "backbone.layers.1.mixer.down_proj"


def test_underflowing_weight_is_excluded_with_its_partner_and_a_warning(tiny_dir, tmp_path):
    src = copy(tiny_dir("dense"), tmp_path / "src")
    rewrite(src, lambda t: t[f"{TINY}.weight"].fill_(1e-44))
    before = tree_digest(src)
    out = tmp_path / "out"
    result = cli("quantize", src, out, "--device", "cpu", "--calib-samples", "4", "--calib-seq-len", "16")
    assert result.returncode == 0, result.stderr
    assert "no valid FP8 scale" in result.stdout and TINY in result.stdout
    assert tree_digest(src) == before
    tensors = load_all(out)
    for module in (TINY, PARTNER):  # kept in the source dtype, without scales
        assert tensors[f"{module}.weight"].dtype == torch.float32
        assert f"{module}.weight_scale" not in tensors and f"{module}.input_scale" not in tensors
    scales = {k: float(v) for k, v in tensors.items() if k.endswith("_scale")}
    assert scales and all(math.isfinite(s) and s >= torch.finfo(torch.float32).tiny for s in scales.values())
    fp8 = [v for v in tensors.values() if v.dtype == torch.float8_e4m3fn]
    assert fp8 and all(bool(torch.isfinite(v.float()).all()) for v in fp8)
    manifest = json.loads((out / "nemoconv-manifest.json").read_text())["quantization"]
    excluded = {e["module"]: e for e in manifest["excluded"]}
    assert excluded[TINY]["reason"] == "unscalable" and TINY not in manifest["targets"]
    assert PARTNER in excluded and PARTNER not in manifest["targets"]
    assert any("cannot scale" in note for note in manifest["notes"])
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert {TINY, PARTNER} <= excluded_modules(hf_quant["quantization"]["exclude_modules"], {TINY, PARTNER})


def test_underflowing_weight_with_nothing_else_to_quantize_is_exit_2_naming_it(tiny_dir, tmp_path):
    src = copy(tiny_dir("dense", hybrid_override_pattern="M-"), tmp_path / "src")
    rewrite(src, lambda t: t[f"{TINY}.weight"].fill_(1e-44))
    before = neighbours(tmp_path)
    result = cli("quantize", src, tmp_path / "out", "--preset", "conservative", "--device", "cpu",
                 "--calib-samples", "4", "--calib-seq-len", "16")
    assert_exit_2(result, TINY, "too small")
    assert neighbours(tmp_path) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_exit_2_naming_it(tiny_dir, tmp_path, bad):
    src = copy(tiny_dir("dense"), tmp_path / "src")

    def poison(t):
        t[f"{TINY}.weight"][3, 5] = bad

    rewrite(src, poison)
    before = neighbours(tmp_path)
    result = cli("quantize", src, tmp_path / "out", "--device", "cpu", "--calib-samples", "4", "--calib-seq-len", "16")
    assert_exit_2(result, f"{TINY}.weight", "NaN/Inf")
    assert neighbours(tmp_path) == before


@pytest.mark.parametrize("line", ['{"input_ids": [1, ' + FIVE_THOUSAND_DIGITS + "]}", '{"input_ids": ' + DEEP + "}"],
                         ids=["5000-digit-id", "nested-100000-deep"])
def test_malformed_calibration_file_line_is_one_line_exit_2(tiny_dir, tmp_path, line):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"input_ids": [1, 2, 3]}\n' + line + "\n")
    before = neighbours(tmp_path)
    result = cli("quantize", tiny_dir("dense"), tmp_path / "out", "--device", "cpu", "--calib-file", calib)
    assert_exit_2(result, "calib.jsonl:2")
    assert neighbours(tmp_path) == before
