"""SIGKILL at random points: every rerun continues the interrupted conversion, and the output it finally
publishes is byte-identical to an uninterrupted run. OUT is never there before the run that completes.

Each run is a real process killed with SIGKILL (no cleanup runs): at a random number of journaled shards
(0-2 more than the last run left) plus a random delay, or at a random delay alone, so kills land before
the partial exists, inside a shard, between shards, and while the side files are written or published.
The next process is started (and has imported nemoconv) while the current one runs, so the test costs
little more than the conversions. NEMOCONV_KILLS sets how many kills (default 15)."""

from __future__ import annotations

import glob
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import tree_digest

ROOT = Path(__file__).resolve().parents[1]
# waits for a line on stdin (the process is started ahead of time), then runs the CLI as a user would
DRIVER = ("import sys\nfrom nemoconv.cli.app import main\nsys.stdin.readline()\n"
          "code = main(sys.argv[1:])\nsys.stdout.flush(); sys.stderr.flush()\nimport os; os._exit(code)\n")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _journaled(out: Path) -> int:
    lines = [len(Path(j).read_bytes().split(b"\n")) - 2
             for j in glob.glob(str(out.parent / f".{out.name}.nemoconv-partial-*" / "nemoconv-resume.jsonl"))]
    return max(lines, default=0)


def _kill_at_random(proc: subprocess.Popen, out: Path, rng: random.Random) -> bool:
    """Let the run go, SIGKILL it at a random point; False when it finished first."""
    start = _journaled(out)
    target = start + rng.randint(0, 2) if rng.random() < 0.8 else None
    delay = rng.uniform(0, 0.02) if target is not None else rng.uniform(0, 0.3)
    proc.stdin.write("\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while target is not None and _journaled(out) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True


def test_random_sigkills_then_resume_end_byte_identical(tiny_dir, tmp_path):
    src = tiny_dir("moe", torch.bfloat16)
    args = ["convert", str(src), None, "--to", "max", "--max-shard-size", "8KB", "-q"]
    clean = tmp_path / "clean"
    done = subprocess.run([sys.executable, "-m", "nemoconv.cli", *[str(clean) if a is None else a for a in args]],
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    argv = [str(out) if a is None else a for a in args]
    rng = random.Random(int(os.environ.get("NEMOCONV_KILL_SEED", "19")))
    kills, resumed, finished = int(os.environ.get("NEMOCONV_KILLS", "15")), 0, False
    proc = _spawn(argv)
    killed = 0
    for _ in range(kills):
        following = _spawn(argv)  # imports while this one runs
        if not _kill_at_random(proc, out, rng):
            finished = True
            _, err = proc.communicate()
            assert proc.returncode == 0, err
            following.kill()
            following.wait()
            break
        assert not out.exists()  # never visible as OUT before the run that completes
        killed += 1
        resumed += "resuming:" in proc.stderr.read()
        proc = following
    if not finished:
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        resumed += "resuming:" in err
    print(f"{killed} SIGKILLs, {resumed} runs resumed, finished before the last kill: {finished}")
    assert tree_digest(out) == tree_digest(clean)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    assert finished or resumed, "the last run did not resume anything: the kills never left a completed shard"
