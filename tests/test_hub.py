"""Hub: repo ids resolved from a pre-populated offline cache; uploads checked by the commit operations sent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

import nemoconv


def populate_cache(hf_home: Path, repo_id: str, checkpoint: Path, commit: str = "a" * 40) -> None:
    """The cache layout huggingface_hub itself writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in checkpoint.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run_offline(args, hf_home: Path, cwd: Path):
    repo_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "nemoconv.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_repo_id_is_read_from_the_offline_cache_and_converted(tiny_dir, tmp_path):
    populate_cache(tmp_path / "hf", "nvidia/tiny-nemotron-h", tiny_dir("moe"))
    res = run_offline(["convert", "nvidia/tiny-nemotron-h@main", tmp_path / "out", "--to", "nemo", "--quiet"],
                      tmp_path / "hf", tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "out" / "nemoconv-manifest.json").read_text())
    assert manifest["source"] == "nvidia/tiny-nemotron-h@main" and manifest["scheme_to"] == "nemo"
    res = run_offline(["inspect", "nvidia/not-cached", "--json"], tmp_path / "hf", tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "nvidia/not-cached" in res.stderr and "Traceback" not in res.stderr


def test_local_path_wins_over_repo_id(tiny_dir, tmp_path, monkeypatch):
    local = tmp_path / "nvidia" / "tiny"
    shutil.copytree(tiny_dir("dense"), local)
    monkeypatch.chdir(tmp_path)

    def no_hub(*a, **k):
        raise AssertionError("the Hub must not be asked when a local directory exists")

    monkeypatch.setattr("nemoconv.checkpoint.hub.download_checkpoint", no_hub)
    assert nemoconv.open_checkpoint("nvidia/tiny").path == Path("nvidia/tiny")


class FakeApi:
    def __init__(self, fail_with=None):
        self.calls = []
        self.fail_with = fail_with

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail_with:
            raise self.fail_with

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations], kw))
        return type("Info", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


@pytest.fixture
def converted(tiny_dir, tmp_path):
    nemoconv.convert(tiny_dir("dense"), tmp_path / "ckpt", to="max")
    return tmp_path / "ckpt"


@pytest.fixture
def verified(converted, tiny_dir):
    """The converted checkpoint with a real verify record (a PASS against its source)."""
    assert nemoconv.verify(tiny_dir("dense"), converted, num_prompts=1, seq_len=8, max_new_tokens=2).passed
    return converted


def test_upload_refuses_without_a_passing_verify_report(verified, capsys):
    record = verified / "nemoconv-verify.json"
    data = json.loads(record.read_text())
    record.unlink()
    code, _, err = run_cli(["upload", verified, "--repo-id", "me/tiny"], capsys)
    assert code == 2 and "no verify record" in err and len(err.strip().splitlines()) == 1
    record.write_text(json.dumps({**data, "passed": False}))
    code, _, err = run_cli(["upload", verified, "--repo-id", "me/tiny"], capsys)
    assert code == 2 and "says FAIL" in err


def test_upload_dry_run_lists_files_and_message(verified, capsys):
    code, out, err = run_cli(["upload", verified, "--repo-id", "me/tiny", "--dry-run"], capsys)
    assert code == 0, err
    assert "would upload" in out and "model.safetensors" in out and "with profile exact: PASS" in out


def test_upload_sends_one_commit_with_every_file(verified, monkeypatch, capsys):
    converted = verified
    api = FakeApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    code, out, err = run_cli(["upload", converted, "--repo-id", "me/tiny", "--private", "--revision", "fp8"], capsys)
    assert code == 0, err
    assert api.calls[0] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True})
    assert api.calls[1] == ("create_branch", "me/tiny", {"branch": "fp8", "exist_ok": True})
    name, repo, ops, kw = api.calls[2]
    assert (name, repo) == ("create_commit", "me/tiny") and kw["revision"] == "fp8"
    assert sorted(p for p, _ in ops) == sorted(p.name for p in converted.iterdir())
    assert all(Path(src) == converted / p for p, src in ops)
    assert kw["commit_message"].startswith("Upload Nemotron-H checkpoint (max scheme)")


def test_upload_force_skips_the_report_check(converted, monkeypatch, capsys):
    api = FakeApi()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    code, _, err = run_cli(["upload", converted, "--repo-id", "me/tiny", "--force"], capsys)
    assert code == 0, err and "unverified" in api.calls[-1][3]["commit_message"]


@pytest.mark.parametrize("status,needle", [(401, "not authorized"), (404, "not found"), (429, "rate limited")])
def test_hub_errors_are_one_line(verified, monkeypatch, capsys, status, needle):
    converted = verified
    error = RuntimeError("boom")
    error.response = type("R", (), {"status_code": status})()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: FakeApi(fail_with=error))
    code, _, err = run_cli(["upload", converted, "--repo-id", "me/tiny"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_convert_writes_a_model_card_that_keeps_the_source_card(tiny_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir("dense"), src)
    (src / "README.md").write_text("---\nlicense: other\ntags:\n- nvidia\n---\n# Original card\nHello.\n")
    nemoconv.convert(src, tmp_path / "out", to="nemo")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "base_model" not in card  # a local source is no Hub base model
    assert "library_name: nemoconv" in card and "- nvidia" in card and "- nemotron_h" in card
    assert "license: other" in card and "# Original card" in card and "nemo** naming scheme" in card


def test_verify_records_its_verdict_beside_the_candidate_and_in_its_card(tiny_dir, tmp_path, capsys):
    nemoconv.convert(tiny_dir("dense"), tmp_path / "max", to="max")
    code, out, err = run_cli(["verify", tiny_dir("dense"), tmp_path / "max", "--num-prompts", "1", "--seq-len", "8",
                              "--max-new-tokens", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "max" / "nemoconv-verify.json").read_text())
    assert report["passed"] is True and report["profile"] == "exact"
    card = (tmp_path / "max" / "README.md").read_text()
    assert "**verify: PASS** (profile `exact`" in card and "Not verified yet" not in card
    code, out, err = run_cli(["upload", tmp_path / "max", "--repo-id", "me/tiny", "--dry-run"], capsys)
    assert code == 0 and "with profile exact: PASS" in out
