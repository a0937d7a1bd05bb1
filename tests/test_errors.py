"""Bad input: one clear line on stderr, exit 2, no output written, an existing output untouched."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from helpers import load_all, rewrite, run_cli, tree_digest


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_bad_input(capsys, args, *needles):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_nothing_written(parent, name="out"):
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]
    assert leftovers == [], leftovers


def test_missing_source(tmp_path, capsys):
    assert_bad_input(capsys, ["convert", tmp_path / "nope", tmp_path / "out", "--to", "nemo"], "no such checkpoint")
    assert_nothing_written(tmp_path)


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_bad_input(capsys, ["inspect", tmp_path / "empty"], "no config.json")


def test_truncated_shard(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("moe"), tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "max"], "truncated", "model.safetensors")
    assert_nothing_written(tmp_path)


def test_corrupt_header(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("moe"), tmp_path / "src")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"@@@@@@@@@@"
    f.write_bytes(bytes(data))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "max"], "corrupt")


def test_header_length_beyond_file(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("dense"), tmp_path / "src")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**9) + data[8:])
    assert_bad_input(capsys, ["inspect", src], "corrupt or truncated")


def test_shard_missing_from_disk(hf_dir, tmp_path, capsys):
    src = copy_ckpt(hf_dir("moe", torch.bfloat16, max_shard_size="20KB"), tmp_path / "src")
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "nemo"], victim.name, "missing on disk")
    assert_nothing_written(tmp_path)


def test_shard_not_listed_in_index(hf_dir, tmp_path, capsys):
    src = copy_ckpt(hf_dir("moe", torch.bfloat16, max_shard_size="20KB"), tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "nemo"], victim, "missing from")


def test_index_points_at_wrong_shard(hf_dir, tmp_path, capsys):
    src = copy_ckpt(hf_dir("moe", torch.bfloat16, max_shard_size="20KB"), tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    values = list(index["weight_map"].values())
    crowded = next(s for s in shards if values.count(s) > 1)  # its shard stays listed
    name = next(k for k, v in index["weight_map"].items() if v == crowded)
    index["weight_map"][name] = next(s for s in shards if s != crowded)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_bad_input(capsys, ["inspect", src], name, "does not hold it")


def test_unknown_tensor(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("dense"), tmp_path / "src")
    rewrite(src, lambda t: t.update({"backbone.layers.0.mixer.mystery.weight": torch.zeros(2, 2)}))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "nemo"], "unknown tensor",
                     "backbone.layers.0.mixer.mystery.weight")
    assert_nothing_written(tmp_path)


def test_missing_tensor(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("moe"), tmp_path / "src")
    rewrite(src, lambda t: t.pop("backbone.layers.1.mixer.experts.3.up_proj.weight"))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "nemo"], "missing tensor",
                     "experts.3.up_proj")


def test_shape_contradicting_config(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("dense"), tmp_path / "src")
    rewrite(src, lambda t: t.update({"backbone.layers.1.mixer.up_proj.weight": torch.zeros(95, 64)}))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "max"], "[95, 64]", "[96, 64]")
    assert_nothing_written(tmp_path)


def test_merged_experts_contradicting_config(tiny_dir, tmp_path, capsys):
    src = tiny_dir("moe")
    run_cli(["convert", src, tmp_path / "nemo", "--to", "nemo"], capsys)
    rewrite(tmp_path / "nemo", lambda t: t.update(
        {"model.layers.1.mixer.experts.down_projs": t["model.layers.1.mixer.experts.down_projs"][:7].clone()}))
    assert_bad_input(capsys, ["convert", tmp_path / "nemo", tmp_path / "out", "--to", "hf"], "8 experts")


@pytest.mark.parametrize("pattern", ["M-X*", "", "M-m*"])
def test_invalid_layer_pattern(tiny_dir, tmp_path, capsys, pattern):
    src = copy_ckpt(tiny_dir("dense"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hybrid_override_pattern"] = pattern
    (src / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "nemo"], "pattern")


def test_invalid_layers_block_type(hf_dir, tmp_path, capsys):
    src = copy_ckpt(hf_dir("dense", torch.float32), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["layers_block_type"][1] = "rnn"
    (src / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(capsys, ["inspect", src], "layers_block_type[1]", "'rnn'")


def test_pattern_length_contradicts_tensors(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("dense"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hybrid_override_pattern"] = cfg["hybrid_override_pattern"] + "-"
    cfg["num_hidden_layers"] += 1
    (src / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(capsys, ["convert", src, tmp_path / "out", "--to", "nemo"], "missing tensor")


def test_occupied_output_is_refused_and_untouched(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_bad_input(capsys, ["convert", tiny_dir("dense"), out, "--to", "nemo"], "not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"


def test_failed_overwrite_leaves_existing_output_untouched(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", tiny_dir("dense"), out, "--to", "nemo"], capsys)
    assert code == 0, err
    before = tree_digest(out)
    bad = copy_ckpt(tiny_dir("dense"), tmp_path / "bad")
    rewrite(bad, lambda t: t.pop("backbone.norm_f.weight"))
    assert_bad_input(capsys, ["convert", bad, out, "--to", "nemo", "--overwrite"], "norm_f")
    assert tree_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_successful_overwrite_replaces_output(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_cli(["convert", tiny_dir("dense"), out, "--to", "nemo"], capsys)
    code, _, err = run_cli(["convert", tiny_dir("dense"), out, "--to", "max", "--overwrite"], capsys)
    assert code == 0, err
    assert "embed_tokens.weight" in load_all(out) and "model.embed_tokens.weight" not in load_all(out)


def test_interrupted_write_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    import nemoconv
    from nemoconv.stream import output

    def explode(self, name, tensor, entry=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.ShardedWriter, "write", explode)
    with pytest.raises(nemoconv.NemoconvError, match="disk full"):
        nemoconv.convert(tiny_dir("dense"), tmp_path / "out", to="nemo")
    assert list(tmp_path.iterdir()) == []


def test_unknown_naming_scheme(tiny_dir, tmp_path, capsys):
    src = copy_ckpt(tiny_dir("dense"), tmp_path / "src")
    rewrite(src, lambda t: [t.update({k.replace("backbone.", "transformer."): t.pop(k)}) for k in list(t)])
    assert_bad_input(capsys, ["inspect", src], "no known naming scheme")


def test_bad_max_shard_size(tiny_dir, tmp_path, capsys):
    assert_bad_input(capsys, ["convert", tiny_dir("dense"), tmp_path / "o", "--to", "hf", "--max-shard-size", "lots"],
                     "invalid size")


def test_usage_error_is_one_line(capsys):
    code, _, err = run_cli(["convert", "a"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_debug_shows_the_exception(tmp_path):
    from nemoconv.cli import main
    from nemoconv.errors import NemoconvError

    with pytest.raises(NemoconvError):
        main(["--debug", "inspect", str(tmp_path / "nope")])
