"""A checkpoint on disk: config, shard headers cross-checked against the index, scheme detection.

Opening is lazy and cheap: only `config.json`, the index and the safetensors headers are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.schemes import Scheme, get_scheme, scheme_names
from nemoconv.schemes.loader import detect_schemes
from nemoconv.schemes.scales import is_scale
from nemoconv.storage.config import ModelSpec, check_stored_sizes, load_config
from nemoconv.storage.paths import check_plain_name, owned_file
from nemoconv.storage.safetensors_io import FP8_NAMES, TensorEntry, read_header
from nemoconv.untrusted import load_json, want_dict, want_list, want_str

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "nemoconv-manifest.json"
QUANT_CONFIG_NAME = "hf_quant_config.json"


_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)\.(.*)$")


def natural_key(name: str):
    """Sort `layers.10` after `layers.9`, and a layer's experts by projection first (all up_proj, then all
    down_proj), so a merge buffers one projection's experts at a time."""
    m = _EXPERT.match(name)
    if m:
        name = f"{m.group(1)}{m.group(3)}.{m.group(2)}"
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


@dataclass
class Checkpoint:
    path: Path
    config: dict
    spec: ModelSpec
    entries: dict[str, TensorEntry]  # by source name, as stored
    shard_files: list[Path]
    scheme: str
    manifest: dict | None = None
    shard_metadata: dict[str, dict] = field(default_factory=dict)
    not_read: list[str] = field(default_factory=list)  # stored keys that are not weights (Megatron: optimizer…)

    def tensor_names(self) -> list[str]:
        return sorted(self.entries, key=natural_key)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def scheme_rules(self) -> Scheme:
        return get_scheme(self.scheme)

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries.values():
            key = e.dtype_name
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def quantization(self) -> dict | None:
        """How the checkpoint is quantized: from config/hf_quant_config and the tensors themselves."""
        fp8 = [n for n, e in self.entries.items() if e.dtype_name in FP8_NAMES]
        qcfg = self.config.get("quantization_config")
        qcfg = want_dict(qcfg, "config.json quantization_config") if qcfg is not None else {}
        hf_quant = {}
        if (self.path / QUANT_CONFIG_NAME).is_file():
            side = owned_file(self.path, QUANT_CONFIG_NAME)
            hf_quant = want_dict(load_json(side), str(side))
        if not fp8 and not qcfg and not hf_quant:
            return None
        quant = want_dict(hf_quant.get("quantization") or {}, f"{QUANT_CONFIG_NAME} quantization")
        algo = qcfg.get("quant_algo") or quant.get("quant_algo")
        excluded = quant.get("exclude_modules") or qcfg.get("ignore") or []
        return {
            "method": qcfg.get("quant_method", "modelopt" if hf_quant else None),
            "algo": algo,
            "fp8_weights": len(fp8),
            "scales": sum(1 for n in self.entries if is_scale(n)),
            "excluded_modules": len(want_list(excluded, "the quantization exclusion list")),
        }


def _looks_like_repo_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", text))


def _looks_local(text: str) -> bool:
    """A path the user meant as a local one: `./`, `..`, `~`, an absolute path, more than one `/` before any
    `@revision`, or a first component that exists here (`out/typo` when `out/` exists)."""
    name = text.split("@", 1)[0]
    if text.startswith(("/", ".", "~")) or "./" in text or ".." in text or name.count("/") != 1:
        return True
    return Path(name.split("/", 1)[0]).exists()


def resolve_source(source: str | Path) -> Path:
    """A local directory always wins; otherwise a Hub repo id is fetched (huggingface_hub). A missing path
    that looks local is reported as missing, never taken for a repo id."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NemoconvError(f"{source}: is a file; a checkpoint is a directory with config.json and *.safetensors")
        return path
    if isinstance(source, str) and _looks_like_repo_id(source) and not _looks_local(source):
        from nemoconv.checkpoint.hub import download_checkpoint

        return download_checkpoint(source)
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    hint = f" ({parent} exists, {path.absolute().relative_to(parent)} does not)" if parent and parent != Path("/") \
        else ""
    raise NemoconvError(f"{source}: no such checkpoint directory{hint}")


def read_index(path: Path) -> dict[str, str]:
    """The index's weight_map (tensor → shard), every shard a plain `*.safetensors` name inside `path`.

    Checked before any file it names is opened: a name like `../../etc/passwd` is never stat'ed or read."""
    index_path = owned_file(path, INDEX_NAME)
    index = want_dict(load_json(index_path), str(index_path))
    if "metadata" in index:
        want_dict(index["metadata"], f"{index_path}: metadata")
    if "weight_map" not in index:
        raise NemoconvError(f"{index_path}: not a valid safetensors index (needs a weight_map object)")
    weight_map = want_dict(index["weight_map"], f"{index_path}: weight_map")
    for name, shard in weight_map.items():
        want_str(shard, f"{index_path}: weight_map[{name[:80]!r}]")
    for shard in sorted(set(weight_map.values())):
        check_plain_name(shard, f"{index_path}: shard")
        if not shard.endswith(".safetensors"):
            raise NemoconvError(f"{index_path}: shard {shard[:80]!r} is not a *.safetensors file "
                                f"(only safetensors shards are read)")
    return weight_map


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    on_disk = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not (path / INDEX_NAME).is_file():
        if not on_disk:
            raise NemoconvError(f"{path}: no *.safetensors files (only safetensors checkpoints are read, never pickles)")
        return [owned_file(path, p.name) for p in on_disk], None
    weight_map = read_index(path)
    listed = sorted(set(weight_map.values()))
    for shard in listed:
        if not (path / shard).is_file():
            raise NemoconvError(f"{path}: shard {shard} is listed in {INDEX_NAME} but missing on disk")
    stray = [p.name for p in on_disk if p.name not in listed]
    if stray:
        raise NemoconvError(f"{path}: shard {stray[0]} is on disk but missing from {INDEX_NAME}")
    return [owned_file(path, s) for s in listed], weight_map


def _read_manifest(path: Path) -> dict | None:
    """nemoconv's manifest of the checkpoint: information only, so a broken one reads as none."""
    if not (path / MANIFEST_NAME).is_file():
        return None
    manifest_path = owned_file(path, MANIFEST_NAME)  # a link out is refused like any other file read
    try:
        manifest = load_json(manifest_path)
    except NemoconvError:
        return None
    return manifest if isinstance(manifest, dict) else None


def open_checkpoint(source: str | Path, scheme: str = "auto", iteration: int | None = None,
                    config_file: str | Path | None = None) -> Checkpoint:
    """Open a checkpoint directory (or Hub repo id) lazily: config, headers, index, scheme. A Megatron
    torch_dist checkpoint (`iteration`: which iter_* directory; `config_file`: its HF config) is read too."""
    path = resolve_source(source)
    from nemoconv.checkpoint.megatron import find_torch_dist, read_megatron

    dist_dir = find_torch_dist(path, iteration)
    if dist_dir is not None:
        mg = read_megatron(path, dist_dir, scheme, config_file)
        return Checkpoint(dist_dir, mg.config, mg.spec, mg.entries, mg.files, "megatron", _read_manifest(dist_dir),
                          not_read=mg.not_read)
    owned_file(path, "config.json")
    config, spec = load_config(path)
    files, weight_map = _shard_files(path)
    entries: dict[str, TensorEntry] = {}
    shard_meta: dict[str, dict] = {}
    for f in files:
        header, meta = read_header(f)
        shard_meta[f.name] = meta
        for name, entry in header.items():
            if name in entries:
                raise NemoconvError(f"{path}: tensor {name!r} is stored twice ({entries[name].file.name}, {f.name})")
            entries[name] = entry
    if weight_map is not None:
        for name, shard in weight_map.items():
            entry = entries.get(name)
            if entry is None or entry.file.name != shard:
                raise NemoconvError(f"{path}: {INDEX_NAME} maps {name!r} to {shard}, which does not hold it")
        unlisted = [n for n in entries if n not in weight_map]
        if unlisted:
            raise NemoconvError(f"{path}: tensor {unlisted[0]!r} in {entries[unlisted[0]].file.name} is not in {INDEX_NAME}")
    if not entries:
        raise NemoconvError(f"{path}: the checkpoint holds no tensors")
    manifest = _read_manifest(path)
    detected = scheme if scheme != "auto" else detect_scheme(path, entries, shard_meta)
    check_stored_sizes(spec, entries, get_scheme(detected))  # before anything is sized from config.json
    return Checkpoint(path, config, spec, entries, files, detected, manifest, shard_meta)


def detect_scheme(path: Path, entries: dict, shard_meta: dict[str, dict]) -> str:
    stamped = {m.get("nemoconv_scheme") for m in shard_meta.values()} - {None}
    if len(stamped) == 1:
        return stamped.pop()
    matches = detect_schemes(entries)
    if len(matches) != 1:
        what = "no known naming scheme" if not matches else f"several schemes ({', '.join(matches)})"
        raise NemoconvError(f"{path}: tensor names match {what}; pass --from {'|'.join(scheme_names())}")
    return matches[0]
