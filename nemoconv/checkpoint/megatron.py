"""The `megatron` scheme's container: Megatron-core `torch_dist` distributed checkpoints, with torch alone.

Layouts found (SRC may be any of them):
- a torch_dist directory: `metadata.json` (`sharded_backend: torch_dist`), `.metadata`, `*.distcp`, `common.pt`;
- NeMo 2: the same under `weights/`, beside `context/`;
- Megatron-LM / Megatron-Bridge: `iter_0000100/` directories and `latest_checkpointed_iteration.txt`
  (`--iteration N`; default the latest).

Tensors are listed and read by `dcp.py` (restricted unpicklers, byte offsets); the names are mapped by
`mappings/megatron.toml`; the HF config comes from `config.py` here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.untrusted import load_json, want_dict

_ITER_DIR = re.compile(r"^iter_(\d{7})$")
LATEST_NAME = "latest_checkpointed_iteration.txt"
# Keys of a training checkpoint that are not model weights: optimizer state, RNG and scheduler state.
_NOT_WEIGHTS = ("optimizer.", "rng_state", "rerun_state_machine", "opt_param_scheduler", "_extra_state")


def _is_torch_dist(d: Path) -> bool:
    meta = d / "metadata.json"
    if not meta.is_file():
        return False
    data = want_dict(load_json(meta, "metadata.json"), f"{meta}")
    backend = data.get("sharded_backend")
    if backend != "torch_dist":
        raise NemoconvError(f"{meta}: sharded_backend is {backend!r}; only torch_dist checkpoints are read")
    return True


def _iteration_dir(path: Path, iteration: int | None) -> Path | None:
    iters = {int(m.group(1)): p for p in path.iterdir() if (m := _ITER_DIR.match(p.name)) and p.is_dir()}
    if not iters and not (path / LATEST_NAME).is_file():
        return None
    if iteration is None:
        latest = path / LATEST_NAME
        if latest.is_file():
            text = latest.read_text(errors="replace").strip()
            if not text.isdigit():
                raise NemoconvError(f"{latest}: expected an iteration number, found {text[:40]!r}")
            iteration = int(text)
        elif iters:
            iteration = max(iters)
    if iteration not in iters:
        have = ", ".join(str(n) for n in sorted(iters)) or "none"
        raise NemoconvError(f"{path}: no iter_{iteration:07d}/ (iterations present: {have})")
    return iters[iteration]


def find_torch_dist(path: Path, iteration: int | None = None) -> Path | None:
    """The torch_dist directory SRC stands for, or None when SRC is not a Megatron checkpoint."""
    if iteration is not None and iteration < 0:
        raise NemoconvError(f"--iteration must be >= 0, got {iteration}")
    it_dir = _iteration_dir(path, iteration)
    if it_dir is not None:
        path = it_dir
    elif iteration is not None:
        raise NemoconvError(f"{path}: --iteration applies to Megatron checkpoints with iter_*/ directories")
    for candidate in (path, path / "weights"):
        if candidate.is_dir() and _is_torch_dist(candidate):
            return candidate
    if it_dir is not None:
        raise NemoconvError(f"{it_dir}: no metadata.json (not a torch_dist checkpoint)")
    return None


def is_not_weights(key: str) -> bool:
    return key.startswith(_NOT_WEIGHTS) or "._extra_state" in key


@dataclass
class MegatronParts:
    """What a torch_dist directory holds, for checkpoint/local.py to make a Checkpoint of (scheme `megatron`)."""

    config: dict
    spec: object  # ModelSpec
    entries: dict
    files: list[Path]
    not_read: list[str]  # stored keys that are not weights (optimizer state, _extra_state, …)


def read_megatron(source: Path, dist_dir: Path, scheme: str, config_file=None) -> MegatronParts:
    """The HF config and the tensors (in the `megatron` scheme) of a torch_dist directory."""
    from nemoconv.storage.config import parse_config
    from nemoconv.storage.megatron.config import find_hf_config
    from nemoconv.storage.megatron.dcp import read_dcp

    if scheme not in ("auto", "megatron"):
        raise NemoconvError(f"{source}: is a Megatron torch_dist checkpoint; it can only be read as --from megatron")
    config = find_hf_config(source, dist_dir, config_file)
    spec = parse_config(config)
    entries, files, skipped = read_dcp(dist_dir, is_not_weights)
    if not entries:
        raise NemoconvError(f"{dist_dir}: the checkpoint holds no tensors")
    return MegatronParts(config, spec, entries, files, skipped)
