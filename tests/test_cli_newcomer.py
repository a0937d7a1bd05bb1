"""Issue 20, the CLI as a newcomer meets it, through subprocesses where the behaviour is the terminal's: how
to start it, help, local paths vs Hub ids, one-line errors, unwrapped piped output, demo --overwrite, inspect's
checks, lossiness judged by values, the upload method."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import rewrite, run_cli

import nemoconv
from nemoconv.checkpoint.hub import hub_error
from nemoconv.errors import NemoconvError

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, output piped (not a terminal), no COLUMNS set."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("COLUMNS", None)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "nemoconv", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_python_dash_m_nemoconv_runs_the_cli():
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"nemoconv {nemoconv.__version__}"


@pytest.mark.parametrize("args", [["-h"], ["verify", "-h"], ["convert", "-h"]])
def test_dash_h_shows_help(args):
    res = run(*args)
    assert res.returncode == 0 and "Usage" in res.stdout and res.stderr == ""


def test_shell_completion_is_offered():
    res = run("--help")
    assert "--install-completion" in res.stdout


def test_verify_help_explains_the_table_and_the_profiles():
    text = " ".join(run("verify", "--help").stdout.split())
    for needle in ("≠@k", "cache", "top-1", "fp8 (cos ≥ 0.99"):
        assert needle in text, needle


@pytest.mark.parametrize("typo", ["out/typo", "./typo/x", "a/b/c", "../nowhere/x"])
def test_a_mistyped_local_path_is_reported_missing_not_looked_up_on_the_hub(tmp_path, typo):
    (tmp_path / "out").mkdir()
    res = run("inspect", typo, cwd=tmp_path, env_extra={"HF_HUB_OFFLINE": "0"})
    assert res.returncode == 2 and "no such checkpoint directory" in res.stderr, res.stderr
    assert "HF_HUB_OFFLINE" not in res.stderr and len(res.stderr.splitlines()) == 1


def test_hub_failures_say_what_really_happened(monkeypatch):
    from huggingface_hub import errors

    class Response:
        status_code = 401
        headers: dict = {}

    def make(cls):
        exc = cls.__new__(cls)
        Exception.__init__(exc, "boom")
        exc.response = Response()
        return exc

    assert "no such repo, or a private one" in str(hub_error(make(errors.RepositoryNotFoundError), "x"))
    assert "gated" in str(hub_error(make(errors.GatedRepoError), "x"))
    assert "no such revision" in str(hub_error(make(errors.RevisionNotFoundError), "x"))
    assert "hf auth login" in str(hub_error(make(errors.GatedRepoError), "x"))
    local = errors.LocalEntryNotFoundError("not cached")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert "could not be reached" in str(hub_error(local, "x"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in str(hub_error(local, "x"))
    for text in (str(hub_error(make(cls), "x")) for cls in (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        assert "huggingface-cli" not in text


def test_a_verify_fail_is_printed_once(tiny_dir, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(tiny_dir("dense"), cand)
    rewrite(cand, lambda t: t["backbone.norm_f.weight"].mul_(1.5))
    res = run("verify", tiny_dir("dense"), cand, "--num-prompts", "1", "--seq-len", "8", "--max-new-tokens", "2",
              "--device", "cpu")
    assert res.returncode == 1
    assert "FAIL" not in res.stdout and "overall" in res.stdout
    assert res.stderr.count("FAIL") == 1 and len(res.stderr.splitlines()) == 1, res.stderr


def test_piped_convert_writes_nothing_to_stderr_and_does_not_wrap(tiny_dir, tmp_path):
    out = tmp_path / ("a-rather-long-output-directory-name-" * 3 + "end")
    res = run("convert", tiny_dir("dense"), out, "--to", "max")
    assert res.returncode == 0 and res.stderr == "", repr(res.stderr)
    wrote = [line for line in res.stdout.splitlines() if line.startswith("wrote:")]
    assert len(wrote) == 1 and wrote[0].endswith(str(out)), res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) > 80  # not cut at 80 columns


def test_demo_overwrite_reuses_its_directory_and_keeps_other_files(tmp_path, capsys):
    root = tmp_path / "demo"
    assert run_cli(["--quiet", "demo", root], capsys)[0] == 0
    (root / "mine.txt").write_text("keep me")
    code, _, err = run_cli(["--quiet", "demo", root], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(["--quiet", "demo", root, "--overwrite"], capsys)
    assert code == 0, err
    assert (root / "mine.txt").read_text() == "keep me"
    assert json.loads((root / "verify-fp8.json").read_text())["passed"] is True


def test_inspect_reports_a_missing_tensor_and_exits_2(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir("dense"), broken)
    rewrite(broken, lambda t: t.pop("backbone.layers.0.mixer.D"))
    res = run("inspect", broken)
    assert res.returncode == 2 and "backbone.layers.0.mixer.D" in res.stderr and len(res.stderr.splitlines()) == 1
    assert "FAILED" in res.stdout
    res = run("inspect", broken, "--json")
    info = json.loads(res.stdout)
    assert res.returncode == 2 and info["check"]["ok"] is False and "mixer.D" in info["check"]["error"]


def test_inspect_of_a_sound_checkpoint_says_so(tiny_dir):
    res = run("inspect", tiny_dir("moe"), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["check"] == {"ok": True, "error": None}


def test_a_cast_that_gives_back_the_source_values_is_not_lossy(tiny_dir, tmp_path):
    # bf16 source, --dtype float32, then MAX stores the router gate in bf16 again: exact for these values
    bf16 = nemoconv.convert(tiny_dir("moe", torch.bfloat16), tmp_path / "a", to="max", dtype="float32")
    assert not [s for s in bf16["lossy_steps"] if "gate" in s["tensor"]], bf16["lossy_steps"]
    # an fp32 source's router gate really is rounded: still reported
    fp32 = nemoconv.convert(tiny_dir("moe", torch.float32), tmp_path / "b", to="max")
    assert [s for s in fp32["lossy_steps"] if "gate" in s["tensor"] and s["step"] == "cast"]


class FolderApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", repo_id))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Info", (), {"commit_url": "https://hub.invalid/c/1"})()


def test_a_large_upload_goes_through_the_resumable_folder_upload_of_exactly_its_files(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    from nemoconv.commands import upload

    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir("dense"), ck)
    (ck / "notes.txt").write_text("not part of the checkpoint")
    monkeypatch.setattr(upload, "LARGE_UPLOAD_BYTES", 0)
    api = FolderApi()
    plan = upload.upload(ck, "me/tiny", force=True, api=api, quiet=True)
    assert plan["method"] == "resumable folder upload" and [c[0] for c in api.calls] == ["create_repo",
                                                                                        "upload_folder"]
    kw = api.calls[1][1]
    assert sorted(kw["allow_patterns"]) == sorted(f["path"] for f in plan["files"])
    assert "notes.txt" not in kw["allow_patterns"] and kw["commit_message"] == plan["commit_message"]


def test_model_card_links_no_missing_package_page(tiny_dir, tmp_path):
    nemoconv.convert(tiny_dir("dense"), tmp_path / "out", to="nemo")
    assert "pypi.org" not in (tmp_path / "out" / "README.md").read_text()


def test_api_errors_stay_nemoconv_errors(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(NemoconvError, match="no such checkpoint directory"):
        nemoconv.open_checkpoint(str(tmp_path / "out" / "typo"))
