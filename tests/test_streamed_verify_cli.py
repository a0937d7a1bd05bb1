"""`nemoconv verify --stream-layers / --max-gpu-memory / --max-host-memory` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nemoconv
from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.verification.memory import piece_sizes

ROOT = Path(__file__).resolve().parents[1]
BIG_LAYERS = {"hybrid_override_pattern": "ME-E*E-E", "intermediate_size": 1024, "moe_intermediate_size": 256,
              "n_routed_experts": 16, "n_group": 1, "topk_group": 1}


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nemoconv.cli", "--quiet", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    ref = tiny_dir("moe", **BIG_LAYERS)
    cand = tmp_path_factory.mktemp("cand") / "nemo"
    nemoconv.convert(ref, cand, to="nemo")
    return ref, cand


def test_streamed_verify_under_a_small_cap_passes_exact_with_the_whole_models_numbers(pair, tmp_path):
    ref, cand = pair
    ends, largest, _ = piece_sizes(open_checkpoint(ref), __import__("torch").float32)
    cap = ends + 2 * largest + (1 << 20)
    whole, streamed = tmp_path / "whole.json", tmp_path / "streamed.json"
    args = ("verify", ref, cand, "--device", "cpu", "--num-prompts", "2", "--seq-len", "16", "--max-new-tokens", "4")
    assert _cli(*args, "--report", whole, "--stream-layers", "off").returncode == 0
    r = _cli(*args, "--report", streamed, "--max-gpu-memory", cap)
    assert r.returncode == 0, r.stderr
    a, b = json.loads(whole.read_text()), json.loads(streamed.read_text())
    info = b["settings"]["stream_layers"]
    assert info["streamed"] and info["reason"].startswith("streaming layers:") and info["max_gpu_memory"] == cap
    assert info["memory"]["reference"]["device"]["peak_bytes"] <= cap
    assert b["profile"] == "exact" and b["overall"]["max_abs_diff"] == 0
    assert [p["reference_tokens"] for p in a["prompts"]] == [p["reference_tokens"] for p in b["prompts"]]


@pytest.mark.parametrize("size", ["0", "-5GB", "12XB"])
def test_a_garbage_cap_is_exit_2_with_one_line(pair, size):
    ref, cand = pair
    r = _cli("verify", ref, cand, "--device", "cpu", f"--max-gpu-memory={size}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --max-gpu-memory: invalid size {size!r} (use e.g. 6GB, "
                                             f"512MiB, 1.5GiB; more than 0)"]


def test_a_cap_below_one_layer_is_exit_2_with_one_line(pair):
    ref, cand = pair
    r = _cli("verify", ref, cand, "--device", "cpu", "--max-gpu-memory", "64KiB", "--num-prompts", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot hold one layer with its activations" in lines[0]
