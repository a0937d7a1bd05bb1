"""The mapping files' schema (nemoconv/schemes): every key, type and table is checked, and a broken file is
refused with its path and the line of the offending key; the rules load into frozen objects."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nemoconv.errors import NemoconvError
from nemoconv.schemes import get_scheme, load_schemes, mappings_dir, quantize_outputs, read_scheme, scheme_names
from nemoconv.schemes.renamer import rename_modules
from nemoconv.schemes.toml_lines import key_lines

NEMO = (mappings_dir() / "nemo.toml").read_text()


def _line_of(text: str, needle: str) -> int:
    return text.splitlines().index(needle) + 1


def _refusal(tmp_path: Path, text: str, name: str = "nemo") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(NemoconvError) as exc:
        read_scheme(path)
    return str(exc.value)


# ---- the shipped files ---------------------------------------------------------------------------------


def test_shipped_mappings_load_into_frozen_rules():
    schemes = load_schemes()
    nemo = schemes["nemo"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        nemo.fp8_experts = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        nemo.merges[0].transpose = False
    assert isinstance(nemo.renames, tuple) and isinstance(nemo.merges[0].hf.fields, tuple)
    with pytest.raises(TypeError):
        schemes["mine"] = nemo  # the registry is read-only too


def test_choices_and_quantize_outputs_come_from_the_files():
    stems = sorted(p.stem for p in mappings_dir().glob("*.toml"))
    assert scheme_names()[0] == "hf" and sorted(scheme_names()) == stems
    assert quantize_outputs() == ("hf", "max")  # the files that say quantize_output = true


def test_canonical_name_follows_the_hf_aliases():
    from nemoconv.model.loading import canonical_name

    assert canonical_name("model.embedding.weight") == "backbone.embeddings.weight"
    assert canonical_name("model.layers.3.mixer.D") == "backbone.layers.3.mixer.D"
    assert canonical_name("lm_head.weight") == "lm_head.weight"


def test_a_read_only_rename_reads_but_never_writes():
    megatron = get_scheme("megatron")
    assert megatron.to_hf("decoder.layers.0.input_layernorm.weight") == "backbone.layers.0.norm.weight"
    # without the config the layer-kind rules do not apply, and the read-only spelling is never written
    assert megatron.to_scheme("backbone.layers.0.norm.weight") is None


def test_module_lists_are_renamed_by_the_tensor_rules():
    hf, mx = get_scheme("hf"), get_scheme("max")
    fused = {"blocks.3.mixer.qkv_proj.weight"}
    modules = ["backbone.layers.3.mixer.q_proj", "backbone.layers.3.mixer.k_proj", "backbone.layers.3.mixer.o_proj",
               "lm_head"]
    assert rename_modules(modules, hf, mx, fused) == ["blocks.3.mixer.qkv_proj", "blocks.3.mixer.o_proj", "lm_head"]
    # and back: a fused module stands for its members; a name no rule knows (a pattern) is kept as written
    assert rename_modules(["blocks.3.mixer.qkv_proj", "blocks.*"], mx, hf, set()) == [
        "backbone.layers.3.mixer.q_proj", "backbone.layers.3.mixer.k_proj", "backbone.layers.3.mixer.v_proj",
        "blocks.*"]


# ---- garbage and lies: each refused at its file and line ------------------------------------------------


def test_a_misspelled_key_is_refused_at_its_line(tmp_path):
    text = NEMO.replace("transpose = true", "tranpose = true", 1)
    message = _refusal(tmp_path, text)
    assert message == (f"{tmp_path / 'nemo.toml'}:{_line_of(text, 'tranpose = true')}: merge_experts[0].tranpose: "
                       f"unknown key 'tranpose' (allowed: hf, to, transpose, count)")


def test_a_misspelled_table_is_refused_at_its_header(tmp_path):
    text = NEMO.replace("[[cast]]", "[[casts]]")
    assert _refusal(tmp_path, text).startswith(f"{tmp_path / 'nemo.toml'}:{_line_of(text, '[[casts]]')}: casts: "
                                               f"unknown key 'casts' (allowed: scheme, description,")


@pytest.mark.parametrize("good, bad, expected", [
    ("transpose = true", 'transpose = "yes"', "merge_experts[0].transpose: expected true or false, got a string"),
    ("fp8_experts = false", "fp8_experts = 0", "fp8_experts: expected true or false, got an integer"),
    ('dtype = "float32"', 'dtype = "fp32"', "cast[0].dtype: 'fp32' is not one of float32, bfloat16, float16"),
    ('hf = "backbone.norm_f.weight"', "hf = 3", "rename[1].hf: expected a string, got an integer"),
    ('[[cast]]', '[[cast]]\naxis = 1', "cast[0].axis: unknown key 'axis'"),
])
def test_a_value_of_the_wrong_type_is_refused_at_its_line(tmp_path, good, bad, expected):
    text = NEMO.replace(good, bad, 1)
    line = _line_of(text, bad.splitlines()[-1])
    assert _refusal(tmp_path, text).startswith(f"{tmp_path / 'nemo.toml'}:{line}: {expected}")


def test_a_missing_key_is_refused_at_its_table(tmp_path):
    text = NEMO.replace('to = "model.norm.weight"\n', "")
    header = _line_of(NEMO, 'hf = "backbone.norm_f.weight"') - 1  # the [[rename]] that lost its `to`
    assert _refusal(tmp_path, text) == f"{tmp_path / 'nemo.toml'}:{header}: rename[1]: missing required key 'to'"


def test_a_file_without_its_scheme_name_is_refused_at_line_1(tmp_path):
    text = NEMO.replace('scheme = "nemo"\n', "")
    assert _refusal(tmp_path, text) == f"{tmp_path / 'nemo.toml'}:1: missing required key 'scheme'"


def test_a_file_claiming_another_schemes_name_is_refused(tmp_path):
    (tmp_path / "hf.toml").write_text((mappings_dir() / "hf.toml").read_text())
    (tmp_path / "nemo.toml").write_text(NEMO)
    (tmp_path / "nemo2.toml").write_text(NEMO)  # a duplicate: two files, one scheme name
    with pytest.raises(NemoconvError) as exc:
        load_schemes(tmp_path)
    line = _line_of(NEMO, 'scheme = "nemo"')
    assert str(exc.value) == (f"{tmp_path / 'nemo2.toml'}:{line}: scheme = 'nemo', "
                              f"but a scheme's file is named after it (nemo.toml)")


def test_an_invalid_detect_regex_is_refused(tmp_path):
    text = NEMO.replace("'\\._fp32_params\\.'", "'(_fp32_params'")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("detect"))
    assert _refusal(tmp_path, text).startswith(f"{tmp_path / 'nemo.toml'}:{line}: detect[1]: invalid regular "
                                               f"expression '(_fp32_params': missing ), unterminated subpattern")


@pytest.mark.parametrize("bad, expected", [
    ('to = "model.layers.{i.{rest}"', "unmatched brace"),
    ('to = "model.layers.{i}.{p:A|(D}"', "invalid alternatives"),
    ('to = "model.layers.{i}.{rset}"', "{rset} is not a field hf captures (it has: {i}, {rest})"),
    ('to = "model.layers.{i}.{i}"', "field {i} appears twice"),
])
def test_an_invalid_template_is_refused(tmp_path, bad, expected):
    text = NEMO.replace('to = "model.layers.{i}.{rest}"', bad)
    message = _refusal(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'nemo.toml'}:{_line_of(text, bad)}: rename[3].to: ") and expected in message


def test_a_size_that_is_no_config_value_is_refused(tmp_path):
    text = (mappings_dir() / "max.toml").read_text().replace('"num_key_value_heads*head_dim"]', '"num_kv*head_dim"]')
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("sizes"))
    assert _refusal(tmp_path, text, "max").startswith(
        f"{tmp_path / 'max.toml'}:{line}: fuse[0].sizes[2]: 'num_kv' in 'num_kv*head_dim' is neither an integer "
        f"nor a config value")


def test_a_file_that_is_not_toml_is_refused_at_the_line_of_the_mistake(tmp_path):
    text = NEMO.replace('dtype = "float32"', 'dtype = float32')
    assert _refusal(tmp_path, text) == (f"{tmp_path / 'nemo.toml'}:{_line_of(text, 'dtype = float32')}: not valid "
                                        f"TOML: Invalid value")


def test_a_binary_file_is_refused(tmp_path):
    path = tmp_path / "nemo.toml"
    path.write_bytes(b'scheme = "nemo"\n\xff\xfe\x00')
    with pytest.raises(NemoconvError, match=rf"^{path}:2: not UTF-8 text"):
        read_scheme(path)


def test_key_lines_skips_lookalikes_inside_values():
    text = ('a = """\n[[rename]]\nto = 1\n"""\n'   # a header and a key inside a multi-line string
            'b = [\n  ["[x]", "y = 2"],  # ]\n]\n'   # an array that looks like a header, a comment with a bracket
            '[[rename]]\nhf = "x"\n[[rename]]\nto = "y"\n')
    lines = key_lines(text)
    assert lines[("a",)] == 1 and lines[("b",)] == 5
    assert lines[("rename", 0)] == 8 and lines[("rename", 0, "hf")] == 9
    assert lines[("rename", 1, "to")] == 11 and ("rename", 2) not in lines and ("x",) not in lines
