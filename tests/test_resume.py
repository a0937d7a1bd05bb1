"""Resumable convert and quantize (stream.resume): an interrupted run leaves its completed shards in a hidden
partial directory; the same command continues from them and ends byte-identical to an uninterrupted run; a
changed input or option, or --no-resume, starts over with one line on stderr saying why."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import run_cli, tree_digest

import nemoconv
from nemoconv.errors import Interrupted
from nemoconv.stream import resume as resume_mod

SHARDS = "20KB"  # the tiny MoE checkpoint in ~24 shards


def _siblings(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.nemoconv-"))


@pytest.fixture
def interrupt_after(monkeypatch):
    """Interrupt the next run (as SIGINT does: Interrupted in the writing thread's way) once `n` shards are journaled;
    returns a counter of the shards each run journaled."""
    counts = []

    def arm(n: int, exc=None):
        real = resume_mod.Partial.shard_done
        counts.append(0)

        def shard_done(self, path, state):
            real(self, path, state)
            counts[-1] += 1
            if counts[-1] == n:
                monkeypatch.setattr(resume_mod.Partial, "shard_done", real)
                raise exc or Interrupted(signal.SIGINT)

        monkeypatch.setattr(resume_mod.Partial, "shard_done", shard_done)
        return counts
    return arm


def _convert(src, out, **kw):
    return nemoconv.convert(src, out, to="max", max_shard_size=kw.pop("max_shard_size", SHARDS), **kw)


@pytest.fixture
def moe(tiny_dir):
    return tiny_dir("moe", torch.bfloat16)


@pytest.fixture
def clean(moe, tmp_path):
    out = tmp_path / "clean"
    _convert(moe, out)
    assert len(list(out.glob("*.safetensors"))) > 5
    return tree_digest(out)


def test_interrupted_convert_keeps_its_completed_shards_beside_out(moe, tmp_path, interrupt_after, capsys):
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    assert not out.exists()
    [partial] = _siblings(out)
    assert partial.startswith(".out.nemoconv-partial-")
    journal = (tmp_path / partial / "nemoconv-resume.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 3  # the header and three shards
    assert "3 of" in capsys.readouterr().err


def test_rerun_resumes_and_ends_byte_identical(moe, tmp_path, clean, interrupt_after, capsys):
    out = tmp_path / "out"
    interrupt_after(4)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    capsys.readouterr()
    _convert(moe, out)
    err = capsys.readouterr().err
    assert "resuming: 4 of" in err, err
    assert tree_digest(out) == clean
    assert _siblings(out) == []


def test_resumed_run_writes_only_the_shards_after_the_completed_ones(moe, tmp_path, interrupt_after, monkeypatch):
    out = tmp_path / "out"
    interrupt_after(5)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    written = []
    real = resume_mod.Partial.shard_done
    monkeypatch.setattr(resume_mod.Partial, "shard_done", lambda self, path, state: (written.append(path.name),
                                                                                      real(self, path, state)))
    manifest = _convert(moe, out)
    assert written == manifest["shards"][5:]


def test_changed_input_starts_over_saying_why(moe, tmp_path, interrupt_after, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(moe, src)
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(src, out)
    capsys.readouterr()
    config = src / "config.json"
    config.write_text(config.read_text() + " ")  # same model, but not the same file
    _convert(src, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "starting over" in err[0] and "config.json changed" in err[0], err
    fresh = tmp_path / "fresh"
    _convert(src, fresh)
    assert tree_digest(out) == tree_digest(fresh)
    assert _siblings(out) == []


def test_changed_option_starts_over_saying_why(moe, tmp_path, interrupt_after, capsys):
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    capsys.readouterr()
    _convert(moe, out, max_shard_size="30KB")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: starting over (--max-shard-size changed: 20000 → 30000); removed the partial output of an "
                   "interrupted run"], err
    fresh = tmp_path / "fresh"
    _convert(moe, fresh, max_shard_size="30KB")
    assert tree_digest(out) == tree_digest(fresh)
    assert _siblings(out) == []


def test_no_resume_starts_over(moe, tmp_path, clean, interrupt_after, capsys):
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    capsys.readouterr()
    code, _, err = run_cli(["convert", moe, out, "--to", "max", "--max-shard-size", SHARDS, "--no-resume", "-q"],
                           capsys)
    assert code == 0, err
    assert "starting over (--no-resume)" in err and "resuming" not in err, err
    assert tree_digest(out) == clean


def test_damaged_shard_of_a_partial_starts_over(moe, tmp_path, clean, interrupt_after, capsys):
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    capsys.readouterr()
    [partial] = _siblings(out)
    shard = sorted((tmp_path / partial).glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    _convert(moe, out)
    err = capsys.readouterr().err
    assert f"its shard {shard.name} is not the one it journaled" in err, err
    assert tree_digest(out) == clean


def test_partial_of_another_command_is_never_mixed_in(moe, tmp_path, interrupt_after, capsys):
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        nemoconv.convert(moe, out, to="nemo", max_shard_size=SHARDS)
    capsys.readouterr()
    _convert(moe, out)
    assert "--to changed: 'nemo' → 'max'" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    _convert(moe, fresh)
    assert tree_digest(out) == tree_digest(fresh)


def test_failure_before_any_shard_completes_leaves_nothing(moe, tmp_path, interrupt_after):
    out = tmp_path / "out"
    interrupt_after(1, exc=ValueError("boom"))  # not an interrupt nor I/O: the partial goes
    with pytest.raises(ValueError):
        _convert(moe, out)
    assert not out.exists() and _siblings(out) == []


def test_interrupted_quantize_resumes_byte_identical(tiny_dir, tmp_path, interrupt_after, capsys):
    src = tiny_dir("dense")
    kw = dict(device="cpu", calib_samples=4, calib_seq_len=16, max_shard_size="50KB", kv_cache="fp8")
    clean = tmp_path / "clean"
    nemoconv.quantize(src, clean, **kw)
    out = tmp_path / "out"
    interrupt_after(2)
    with pytest.raises(Interrupted):
        nemoconv.quantize(src, out, **kw)
    capsys.readouterr()
    nemoconv.quantize(src, out, **kw)
    assert "resuming: 2 of" in capsys.readouterr().err
    assert tree_digest(out) == tree_digest(clean)  # the scales of the skipped shards came from the journal
    assert _siblings(out) == []


def test_a_partial_in_use_by_a_live_run_is_left_alone(moe, tmp_path, interrupt_after, clean):
    import fcntl

    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    [partial] = _siblings(out)
    fd = os.open(tmp_path / partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a live run of the same command holds it
    try:
        _convert(moe, out)
    finally:
        os.close(fd)
    assert tree_digest(out) == clean
    assert _siblings(out) == [partial]  # written privately; the other run's partial untouched


def _journal_of(out):
    [partial] = _siblings(out)
    return out.parent / partial / resume_mod.JOURNAL_NAME


def test_a_journal_naming_a_file_outside_the_plan_starts_over(moe, tmp_path, clean, interrupt_after, capsys):
    """A lie in the journal (a shard path outside the partial) is never followed: the run starts over."""
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    capsys.readouterr()
    journal = _journal_of(out)
    header, first, *rest = journal.read_bytes().split(b"\n")
    forged = first.replace(b'"shard": "model-', b'"shard": "../../model-')
    assert forged != first
    journal.write_bytes(b"\n".join([header, forged, *rest]))
    _convert(moe, out)
    err = capsys.readouterr().err
    assert "note: starting over (its journal names shard '../../model-" in err, err
    assert tree_digest(out) == clean


@pytest.mark.parametrize("garbage", [b"\x00\xff not json", b'{"nemoconv_resume": "1"}', b"[1, 2, 3]", b""])
def test_a_garbage_journal_is_not_resumed_and_the_run_ends_byte_identical(moe, tmp_path, clean, interrupt_after,
                                                                          capsys, garbage):
    out = tmp_path / "out"
    interrupt_after(3)
    with pytest.raises(Interrupted):
        _convert(moe, out)
    capsys.readouterr()
    _journal_of(out).write_bytes(garbage)
    _convert(moe, out)
    assert "resuming:" not in capsys.readouterr().err
    assert tree_digest(out) == clean
    assert _siblings(out) == []


def test_each_shard_is_journaled_once_the_next_is_complete_and_the_last_never(moe, tmp_path, monkeypatch):
    """A shard's fsync and journal line wait for the next shard (its bytes have reached the disk by then);
    the last shard is followed only by the publish, so an uninterrupted run never waits on an fsync of it."""
    out = tmp_path / "out"
    journaled, synced = [], []
    real_done, real_fp = resume_mod.Partial.shard_done, resume_mod._synced_fingerprint

    def shard_done(self, path, state):
        real_done(self, path, state)
        journaled.append(len(self.done))

    monkeypatch.setattr(resume_mod.Partial, "shard_done", shard_done)
    monkeypatch.setattr(resume_mod, "_synced_fingerprint", lambda path: (synced.append(path.name), real_fp(path))[1])
    manifest = _convert(moe, out)
    shards = manifest["shards"]
    assert journaled == list(range(len(shards)))   # after the n-th shard: n - 1 journaled
    assert synced == shards[:-1]
