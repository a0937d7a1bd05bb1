"""Issue 13, "reading and writing only what it owns": hostile indexes, links, side files and OUT paths,
through the CLI in a subprocess. Each test asserts the exit code, the one-line message, and that no byte
outside OUT changed (every file under the test's directory is hashed before and after)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, load_all, tree_digest

import nemoconv
from nemoconv.commands.upload import plan_upload
from nemoconv.errors import NemoconvError
from nemoconv.stream import output

REPO = Path(__file__).resolve().parents[1]
SECRET = b"TOPSECRET-0123456789"  # the first bytes of a file outside every checkpoint
QUANT_FAST = ["--device", "cpu", "--calib-samples", "2", "--calib-seq-len", "8"]


def cli(*args, cwd=None, env=None):
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "nemoconv.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=300)
    return res.returncode, res.stdout, res.stderr


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under root (links as their target text, files by content hash), OUT excluded."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                seen[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[rel] = "dir"
    return seen


@pytest.fixture
def src(tiny_dir, tmp_path):
    """A private copy of a tiny bf16 checkpoint, with a secret file beside it."""
    d = tmp_path / "src"
    shutil.copytree(tiny_dir("dense", torch.bfloat16), d)
    (tmp_path / "secret.safetensors").write_bytes(SECRET + b"\0" * 64)
    return d


def write_index(directory: Path, weight_map, **extra) -> None:
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map, **extra}))


def tensor_names(directory: Path) -> list[str]:
    return list(load_all(directory))


# ---- the index names only plain *.safetensors files inside the checkpoint --------------------------------


@pytest.mark.parametrize("shard", ["../../etc/passwd", "../secret.safetensors", "ABSOLUTE", "", "..",
                                   "sub\\model.safetensors", "model.bin", "a\nb.safetensors",
                                   "\ud800.safetensors", "a" * 300 + ".safetensors"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused_unread(src, tmp_path, shard):
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "secret.safetensors")
    names = tensor_names(src)
    write_index(src, {**{n: "model.safetensors" for n in names[1:]}, names[0]: shard})
    before = snapshot(tmp_path)
    code, out, err = cli("convert", src, tmp_path / "out", "--to", "nemo")
    line = error_line(err)
    assert code == 2
    assert "model.safetensors.index.json" in line
    assert any(why in line for why in ("plain file name", "not a file name", "not a valid file name",
                                       "longer than 255 bytes", "not a *.safetensors")), line
    assert SECRET.decode()[:8] not in err + out  # nor as the integer a safetensors header length would show
    assert str(int.from_bytes(SECRET[:8], "little")) not in err + out
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("weight_map,message", [
    ({"x": 5}, "must be a string"), ({"x": None}, "must be a string"), ({"x": ["model.safetensors"]}, "must be a string"),
    (["model.safetensors"], "weight_map must be a JSON object, not a list"),
    ("model.safetensors", "weight_map must be a JSON object, not a string")])
def test_index_with_a_malformed_weight_map_is_one_line(src, tmp_path, weight_map, message):
    write_index(src, weight_map)
    before = snapshot(tmp_path)
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "nemo")
    assert code == 2 and message in error_line(err)
    assert snapshot(tmp_path) == before


def test_index_with_a_list_as_metadata_is_one_line(src, tmp_path):
    write_index(src, {n: "model.safetensors" for n in tensor_names(src)}, metadata=[1, 2])
    code, _, err = cli("inspect", src)
    assert code == 2 and "metadata must be a JSON object, not a list" in error_line(err)


# ---- links: inside the checkpoint or its Hub cache blobs only ---------------------------------------------


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "README.md"])
def test_file_linked_from_outside_the_checkpoint_is_refused(src, tmp_path, victim):
    outside = tmp_path / "elsewhere" / victim
    outside.parent.mkdir()
    if victim == "README.md":  # the card is read to keep it inside ours
        outside.write_bytes(SECRET)
    else:
        shutil.move(src / victim, outside)
    (src / victim).symlink_to(outside)
    before = snapshot(tmp_path)
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "nemo")
    line = error_line(err)
    assert code == 2 and victim in line and "symbolic link" in line and "TOPSECRET" not in err
    assert snapshot(tmp_path) == before


def test_link_inside_the_checkpoint_is_read(src, tmp_path):
    (src / "real").mkdir()
    shutil.move(src / "model.safetensors", src / "real" / "model.safetensors")
    (src / "model.safetensors").symlink_to(Path("real") / "model.safetensors")
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "nemo", "--quiet")
    assert code == 0, err


def hf_cache_snapshot(root: Path, checkpoint: Path, repo_id: str = "org/tiny", commit: str = "c" * 40) -> Path:
    """The layout huggingface_hub writes: snapshots/REV/<file> -> ../../blobs/<sha256>."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot_dir = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for f in sorted(checkpoint.iterdir()):
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot_dir / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot_dir


def test_hf_cache_snapshot_with_blob_links_converts(src, tmp_path):
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    nemoconv.convert(src, tmp_path / "direct", to="nemo")
    snap = hf_cache_snapshot(tmp_path / "hf", src)
    before = snapshot(tmp_path)
    code, _, err = cli("convert", snap, tmp_path / "out", "--to", "nemo", "--quiet")
    assert code == 0, err
    carried = tmp_path / "out" / "tokenizer_config.json"
    assert not carried.is_symlink() and carried.read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert_same_tensors(load_all(tmp_path / "out"), load_all(tmp_path / "direct"))
    assert snapshot(tmp_path, skip=tmp_path / "out") == before


def test_hf_cache_repo_id_with_blob_links_converts(src, tmp_path):
    hf_cache_snapshot(tmp_path / "hf", src, "nvidia/tiny")
    code, _, err = cli("convert", "nvidia/tiny", tmp_path / "out", "--to", "max", "--quiet", cwd=tmp_path,
                       env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


def test_hf_cache_link_to_another_repos_blob_is_refused(src, tmp_path):
    snap = hf_cache_snapshot(tmp_path / "hf", src, "org/tiny")
    other = tmp_path / "hf" / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shard = snap / "model.safetensors"
    (other / "stolen").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(Path("..") / ".." / ".." / "models--org--other" / "blobs" / "stolen")
    code, _, err = cli("inspect", snap)
    assert code == 2 and "model.safetensors" in error_line(err) and "symbolic link" in err


# ---- side files: only what a checkpoint needs, never through a link out, never a pickle -------------------


def test_link_to_a_token_outside_is_neither_carried_nor_uploaded(src, tmp_path):
    token = tmp_path / "home" / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_FAKETOKENFAKETOKEN")
    (src / "notes.txt").symlink_to(token)
    (src / "tokenizer.json").symlink_to(token)  # a needed name does not make a link out acceptable
    before = snapshot(tmp_path)
    code, out, err = cli("convert", src, tmp_path / "out", "--to", "nemo")
    assert code == 0, err
    assert not (tmp_path / "out" / "notes.txt").exists() and not (tmp_path / "out" / "tokenizer.json").exists()
    manifest = json.loads((tmp_path / "out" / "nemoconv-manifest.json").read_text())
    assert manifest["files_not_carried"] == {"notes.txt": "not a file a checkpoint needs",
                                             "tokenizer.json": "a symbolic link leaving the checkpoint"}
    assert "notes.txt" in out and "tokenizer.json (a symbolic link leaving the checkpoint)" in out
    assert "FAKETOKEN" not in out + err
    assert snapshot(tmp_path, skip=tmp_path / "out") == before
    # the same link placed in a directory to upload is not sent
    (tmp_path / "out" / "notes.txt").symlink_to(token)
    (tmp_path / "out" / "tokenizer.json").symlink_to(token)
    code, out, err = cli("upload", tmp_path / "out", "--repo-id", "org/name", "--dry-run", "--force")
    assert code == 0, err
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == {"config.json", "model.safetensors", "nemoconv-manifest.json", "README.md"}
    assert "FAKETOKEN" not in out + err


def test_upload_lists_only_the_checkpoints_files(src, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", src, out, "--to", "hf", "--quiet")[0] == 0
    (out / "tokenizer.json").write_text("{}")
    (out / "notes.txt").write_text("scratch")
    (out / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    (out / "merges.txt").write_bytes(pickle.dumps(["a b"], protocol=4))
    plan = plan_upload(out, "org/name", None, force=True)
    assert [f["path"] for f in plan["files"]] == ["README.md", "config.json", "model.safetensors",
                                                   "nemoconv-manifest.json", "tokenizer.json"]


def torch_saved() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def test_pickles_under_side_file_names_are_not_carried(src, tmp_path):
    (src / "tokenizer.json").write_bytes(pickle.dumps({"vocab": 1}, protocol=4))
    (src / "extra.txt").write_bytes(pickle.dumps([1, 2], protocol=2))
    (src / "special_tokens_map.json").write_bytes(torch_saved())
    (src / "tokenizer.model").write_bytes(pickle.dumps("sp", protocol=5))
    (src / "generation_config.json").write_text('{"eos_token_id": 2}')
    before = snapshot(tmp_path)
    code, out, err = cli("convert", src, tmp_path / "out", "--to", "nemo")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "nemoconv-manifest.json").read_text())
    assert manifest["files_carried"] == ["generation_config.json"]
    assert manifest["files_not_carried"] == {
        "extra.txt": "not a file a checkpoint needs", "tokenizer.json": "pickled data (never copied)",
        "special_tokens_map.json": "a zip archive, as torch.save writes (never copied)",
        "tokenizer.model": "pickled data (never copied)"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "nemoconv-manifest.json"]
    assert "tokenizer.json (pickled data" in out
    assert snapshot(tmp_path, skip=tmp_path / "out") == before


def test_needed_side_files_and_remote_code_are_carried_as_regular_files(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                       "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM",
                       "AutoTokenizer": ["other/repo--tok.Slow", None]}
    (src / "config.json").write_text(json.dumps(cfg))
    files = {"configuration_nemotron_h.py": "class NemotronHConfig: ...\n", "modeling_nemotron_h.py": "x = 1\n",
             "helper.py": "import os\n", "chat_template.jinja": "{{ messages }}", "merges.txt": "#v\na b\n",
             "LICENSE": "NVIDIA Open Model License\n", "tokenizer_config.json": "{\"eos\": 1,}"}
    for name, text in files.items():
        (src / name).write_text(text)
    os.chmod(src / "modeling_nemotron_h.py", 0o4755)
    code, out, err = cli("convert", src, tmp_path / "out", "--to", "nemo")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "nemoconv-manifest.json").read_text())
    assert manifest["files_carried"] == ["LICENSE", "chat_template.jinja", "configuration_nemotron_h.py",
                                         "merges.txt", "modeling_nemotron_h.py"]
    assert manifest["files_not_carried"]["helper.py"] == "not a file a checkpoint needs"
    assert manifest["files_not_carried"]["tokenizer_config.json"].startswith("not valid JSON")
    carried = tmp_path / "out" / "modeling_nemotron_h.py"
    assert carried.read_text() == "x = 1\n" and not carried.stat().st_mode & 0o4000


# ---- OUT never is, contains or (with --overwrite) lies inside a source ------------------------------------


def run_command(command, src, out, *extra, cwd=None):
    args = ["--to", "nemo"] if command == "convert" else QUANT_FAST
    return cli(command, src, out, *args, *extra, cwd=cwd)


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_out_resolving_to_the_source_is_refused(src, tmp_path, command):
    before = snapshot(tmp_path)
    code, _, err = run_command(command, "src", "x/../src", "--overwrite", cwd=tmp_path)
    assert code == 2 and "is the source" in error_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_out_containing_the_source_is_refused(src, tmp_path, command):
    parent = tmp_path / "dir"
    parent.mkdir()
    shutil.move(src, parent / "src")
    (parent / "sibling.txt").write_text("keep me")
    before = snapshot(tmp_path)
    code, _, err = run_command(command, parent / "src", parent, "--overwrite")
    assert code == 2 and "contains the source" in error_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_out_inside_the_source_with_overwrite_is_refused(src, tmp_path, command):
    (src / "sub").mkdir()
    (src / "sub" / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    code, _, err = run_command(command, src, src / "sub", "--overwrite")
    assert code == 2 and "lies inside the source" in error_line(err)
    assert snapshot(tmp_path) == before


def test_out_linked_to_the_source_is_refused(src, tmp_path):
    (tmp_path / "link").symlink_to(src)
    before = snapshot(tmp_path)
    code, _, err = cli("convert", src, tmp_path / "link", "--to", "nemo", "--overwrite")
    assert code == 2 and "is the source" in error_line(err)
    assert snapshot(tmp_path) == before


def test_dry_run_makes_the_same_output_checks(src, tmp_path):
    before = snapshot(tmp_path)
    code, _, err = cli("convert", "src", "x/../src", "--to", "nemo", "--overwrite", "--dry-run", cwd=tmp_path)
    assert code == 2 and "is the source" in error_line(err)
    code, _, err = cli("convert", src, tmp_path, "--to", "nemo", "--overwrite", "--dry-run")
    assert code == 2 and "contains the source" in error_line(err)
    assert snapshot(tmp_path) == before


def test_quantize_out_containing_the_calibration_file_is_refused(src, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("hello world\n" * 4)
    before = snapshot(tmp_path)
    code, _, err = cli("quantize", src, data, *QUANT_FAST, "--calib-file", data / "calib.txt", "--overwrite")
    assert code == 2 and "contains the source" in error_line(err) and "calib.txt" in err
    assert snapshot(tmp_path) == before


# ---- publishing: no-replace, races, and the overwrite fallback ---------------------------------------------


@pytest.fixture(params=["renameat2", "lock fallback"])
def publisher(request, monkeypatch):
    if request.param == "lock fallback":
        monkeypatch.setattr(output, "_renameat2", lambda src, dst, flags: False)
    return request.param


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_directory_created_at_out_during_the_run_is_kept(tmp_path, publisher):
    out = tmp_path / "out"
    with pytest.raises(NemoconvError, match="appeared during the run"):
        with output.atomic_output(out, overwrite=False) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "theirs"
    assert leftovers(tmp_path) == []


def test_empty_directory_at_out_is_taken(tmp_path, publisher):
    out = tmp_path / "out"
    out.mkdir()
    with output.atomic_output(out, overwrite=False) as tmp:
        (tmp / "ours.txt").write_text("ours")
    assert (out / "ours.txt").read_text() == "ours" and leftovers(tmp_path) == []


def test_overwrite_replaces_the_output_atomically(tmp_path, publisher):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with output.atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []


def test_two_racing_conversions_into_one_out_one_wins(tiny_dir, tmp_path):
    src = tiny_dir("moe", torch.bfloat16)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = [subprocess.Popen([sys.executable, "-m", "nemoconv.cli", "convert", str(src), str(out), "--to", to,
                              "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for to in ("nemo", "max")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = ("nemo", "max")[[code for code, _ in results].index(0)]
    loser_err = next(err for code, err in results if code == 2)
    line = error_line(loser_err)
    assert "appeared during the run" in line or "not empty" in line, line
    assert_same_tensors(load_all(out), load_all(nemoconv.convert(src, tmp_path / "ref", to=winner) and
                                                tmp_path / "ref"))
    assert tree_digest(out).keys() == tree_digest(tmp_path / "ref").keys()
    assert leftovers(tmp_path) == []


def _failing_rename(monkeypatch, fail_calls: set[int]):
    """os.rename that fails on the given calls (1-based), as a full disk or a dying NFS server would."""
    real, calls = os.rename, [0]

    def rename(a, b):
        calls[0] += 1
        if calls[0] in fail_calls:
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(output.os, "rename", rename)


def test_overwrite_fallback_puts_the_old_output_back_when_publishing_fails(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nemoconv.convert(src, out, to="nemo")
    before = tree_digest(out)
    monkeypatch.setattr(output, "_renameat2", lambda a, b, flags: False)  # no RENAME_EXCHANGE here
    _failing_rename(monkeypatch, {2})  # OUT → backup works, new → OUT fails
    with pytest.raises(NemoconvError, match="writing .*Input/output error"):
        nemoconv.convert(src, out, to="max", overwrite=True)
    assert tree_digest(out) == before and leftovers(tmp_path) == []


def test_overwrite_fallback_names_the_backup_when_it_cannot_put_it_back(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nemoconv.convert(src, out, to="nemo")
    before = tree_digest(out)
    monkeypatch.setattr(output, "_renameat2", lambda a, b, flags: False)
    _failing_rename(monkeypatch, {2, 3})
    with pytest.raises(NemoconvError) as exc:
        nemoconv.convert(src, out, to="max", overwrite=True)
    backup = tmp_path / f".out.nemoconv-old-{os.getpid()}"
    assert str(backup) in str(exc.value) and "intact" in str(exc.value)
    assert not out.exists() and tree_digest(backup) == before
    assert leftovers(tmp_path) == [backup.name]


def _dead_pid() -> int:
    pid = 4_194_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_output_left_by_a_killed_overwrite_is_restored_by_the_next_run(src, tmp_path):
    out = tmp_path / "out"
    nemoconv.convert(src, out, to="nemo")
    before = tree_digest(out)
    backup = tmp_path / f".out.nemoconv-old-{_dead_pid()}"
    out.rename(backup)  # the state a kill between the fallback's two renames leaves
    code, _, err = cli("convert", src, out, "--to", "max")
    assert code == 2 and "restored the previous output" in error_line(err) and backup.name in err
    assert tree_digest(out) == before and not backup.exists()


def test_a_backup_beside_an_existing_output_is_never_deleted(src, tmp_path):
    out = tmp_path / "out"
    nemoconv.convert(src, out, to="nemo")
    backup = tmp_path / f".out.nemoconv-old-{_dead_pid()}"
    shutil.copytree(out, backup)
    before = tree_digest(backup)
    stale = tmp_path / f".out.nemoconv-tmp-{_dead_pid()}-dead"
    stale.mkdir()
    code, _, err = cli("convert", src, out, "--to", "max", "--overwrite", "--quiet")
    assert code == 0, err
    assert tree_digest(backup) == before and not stale.exists()
    assert json.loads((out / "nemoconv-manifest.json").read_text())["scheme_to"] == "max"
