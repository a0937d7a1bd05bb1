"""Small utilities for tests: read whole checkpoints, rewrite tensors, run the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with the reference safetensors library."""
    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        # compare bytes: bit-exact, and NaN-safe
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def rewrite(directory: Path, edit) -> None:
    """Rewrite a single-file or sharded checkpoint: `edit(dict)` mutates the tensors in place."""
    directory = Path(directory)
    tensors = load_all(directory)
    edit(tensors)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    index = directory / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    manifest = directory / "nemoconv-manifest.json"
    if manifest.exists():
        manifest.unlink()  # the edited checkpoint is no longer what the manifest describes


def tree_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from nemoconv.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def excluded_modules(entries: list[str], modules) -> set[str]:
    """The modules an exclusion list names: exact entries and fnmatch patterns (TensorRT-LLM's rule; the
    patterns quantize writes resolve the same under vLLM's, tests/test_exclusion_matching.py)."""
    import fnmatch

    return {m for m in modules if any(m == e or fnmatch.fnmatchcase(m, e) for e in entries)}
