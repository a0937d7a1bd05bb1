"""Interrupts: SIGINT (Ctrl-C) and SIGTERM during convert, quantize and verify exit 130 / 143 with one
line, leave no output and no temporary directory, change no source byte, and never read as success.

Real signals to real subprocesses, sent once each run is demonstrably under way (its temporary output
directory exists, or it holds the checkpoint's shard open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tree_digest

ROOT = Path(__file__).resolve().parents[1]
LINE = "interrupted: nothing written"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NEMOCONV_CALIBRATOR"] = "builtin"  # ModelOpt's import alone takes seconds
    return env


def _start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nemoconv.cli", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _temp_dirs(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.nemoconv-")]


def _holds_open(pid: int, directory: Path) -> bool:
    """Whether the process has a file of `directory` open (it is reading the checkpoint)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(directory)):
                return True
        except OSError:
            continue
    return False


def _assert_interrupted(proc: subprocess.Popen, code: int) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, out, err)
    assert err.strip().splitlines()[-1:] == [LINE], err
    assert "Traceback" not in err, err
    return out


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A dense checkpoint of ~200 MB: converting it with a cast takes seconds, time to interrupt it."""
    from nemoconv.data.demo_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("big") / "src", "dense", vocab_size=16384,
                                 hidden_size=1024, intermediate_size=2048, mamba_num_heads=32, mamba_head_dim=32)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_convert_exits_with_the_signal_code_and_writes_nothing(big_source, tmp_path, sig, code):
    before = tree_digest(big_source)
    out = tmp_path / "out"
    proc = _start("convert", big_source, out, "--to", "max", "--dtype", "bfloat16", "-q")
    _wait_for(lambda: _temp_dirs(out), proc, "its temporary output directory appeared")
    time.sleep(0.2)
    proc.send_signal(sig)
    _assert_interrupted(proc, code)
    assert not out.exists()
    assert _temp_dirs(out) == []
    assert tree_digest(big_source) == before


def test_interrupted_overwrite_leaves_the_existing_output_untouched(big_source, tiny_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "nemoconv.cli", "convert", tiny_dir("dense"), out, "--to", "nemo",
                           "-q"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before = tree_digest(out)
    proc = _start("convert", big_source, out, "--to", "max", "--dtype", "bfloat16", "-q", "--overwrite")
    _wait_for(lambda: _temp_dirs(out), proc, "its temporary output directory appeared")
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, 130)
    assert tree_digest(out) == before
    assert _temp_dirs(out) == []


def test_interrupted_quantize_exits_143_and_writes_nothing(tiny_dir, tmp_path):
    src = tiny_dir("dense")
    before = tree_digest(src)
    out = tmp_path / "out"
    # enough calibration for several seconds on a CPU
    proc = _start("quantize", src, out, "--device", "cpu", "--calib-samples", "512", "--calib-seq-len", "512", "-q")
    _wait_for(lambda: _holds_open(proc.pid, src), proc, "it opened the checkpoint's shard")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _assert_interrupted(proc, 143)
    assert not out.exists() and _temp_dirs(out) == []
    assert tree_digest(src) == before


def _verify_pair(tiny_dir, tmp_path) -> tuple[Path, Path]:
    import shutil

    ref = tiny_dir("dense")
    cand = tmp_path / "cand"
    shutil.copytree(ref, cand)
    return ref, cand


def test_interrupted_verify_exits_130_and_writes_no_record_or_report(tiny_dir, tmp_path):
    ref, cand = _verify_pair(tiny_dir, tmp_path)
    before = tree_digest(cand)
    report = tmp_path / "report.json"
    proc = _start("verify", ref, cand, "--device", "cpu", "--num-prompts", "64", "--seq-len", "256",
                  "--report", report, "-q")
    _wait_for(lambda: _holds_open(proc.pid, ref) or _holds_open(proc.pid, cand), proc, "it read a checkpoint")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, 130)
    assert not report.exists()
    assert tree_digest(cand) == before  # no nemoconv-verify.json, model card untouched


def test_ctrl_c_on_verify_stops_a_shell_and_chain(tiny_dir, tmp_path):
    """`nemoconv verify … && upload` must not upload after an interrupted gate: Ctrl-C goes to the whole
    foreground process group, as a terminal sends it."""
    ref, cand = _verify_pair(tiny_dir, tmp_path)
    cmd = (f"{sys.executable} -m nemoconv.cli verify {ref} {cand} --device cpu --num-prompts 64 --seq-len 256 -q"
           f" && echo uploaded")
    proc = subprocess.Popen(["bash", "-c", cmd], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _wait_for(lambda: any(_holds_open(int(p), ref) or _holds_open(int(p), cand) for p in _children(proc.pid)),
              proc, "verify read a checkpoint")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "uploaded" not in out, (out, err)
    assert proc.returncode != 0
    assert LINE in err and "Traceback" not in err, err


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def _catches_sigterm(pid: int) -> bool:
    """nemoconv's handlers are installed (Python itself catches SIGINT, never SIGTERM)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_ctrl_c_early_in_verify_still_exits_130(tiny_dir, tmp_path, delay):
    """A signal that lands while torch or the kernels are still importing can surface as another error (an
    interrupted import fails the next one); it is still an interrupt: 130, one line."""
    ref, cand = _verify_pair(tiny_dir, tmp_path)
    before = tree_digest(cand)
    proc = _start("verify", ref, cand, "--device", "cpu", "--num-prompts", "64", "--seq-len", "256", "-q")
    _wait_for(lambda: _catches_sigterm(proc.pid), proc, "the CLI installed its handlers", timeout=60)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, 130)
    assert tree_digest(cand) == before
