"""The files beside the tensors that a checkpoint needs, and nothing else (docs/DESIGN.md §2).

Carried: the tokenizer, the generation config, the chat template, the quantization config, license texts,
and the `*.py` modules that `auto_map` names (remote code). Each is read through `paths.read_owned` (a link
leaving the checkpoint or its Hub cache blobs is never followed), its content is checked (no pickle or
torch.save zip under any name, JSON that parses, text that is UTF-8) and the checked bytes are written as
a new regular file. Everything else is reported as not carried, with the reason.

`upload` sends the same set, plus the tensors, the config and what nemoconv wrote (`upload_files`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nemoconv.checkpoint.local import INDEX_NAME, MANIFEST_NAME, QUANT_CONFIG_NAME, Checkpoint
from nemoconv.errors import NemoconvError
from nemoconv.storage.paths import check_plain_name, link_leaves, owned_file, read_owned
from nemoconv.untrusted import parse_json

CARD_NAME = "README.md"
VERIFY_RECORD = "nemoconv-verify.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
OTHER_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json", QUANT_CONFIG_NAME)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt", "NOTICE.md")
# Written anew by convert/quantize (the index, manifest, config and card describe the new tensors; a verify
# record is about the source), so never copied.
WRITTEN_ANEW = (INDEX_NAME, MANIFEST_NAME, "config.json", CARD_NAME, VERIFY_RECORD)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".distcp")
_BINARY = ("tokenizer.model",)  # sentencepiece protobuf: checked for pickles only
MAX_SIDE_FILE = 256 << 20  # the largest tokenizer.json of a real model is ~30 MiB


@dataclass
class SideFile:
    name: str
    data: bytes  # the checked bytes: what is written is what was checked


def remote_code_files(config: dict) -> set[str]:
    """The `*.py` modules named by config.json's `auto_map` (`module.Class`; `repo--module.Class` lives
    in another repo and is not carried)."""
    auto_map = config.get("auto_map")
    refs = []
    if isinstance(auto_map, dict):
        for value in auto_map.values():
            refs += value if isinstance(value, list) else [value]
    names = set()
    for ref in refs:
        if isinstance(ref, str) and "--" not in ref and ref.count(".") == 1:
            module = ref.split(".")[0] + ".py"
            try:
                names.add(check_plain_name(module, "config.json auto_map"))
            except NemoconvError:
                continue  # not a module beside the checkpoint: nothing to carry
    return names


def why_not_content(name: str, data: bytes) -> str | None:
    """Why these bytes may not be carried under this name, or None."""
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickled data (never copied)"
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "a zip archive, as torch.save writes (never copied)"
    if name in _BINARY:
        return None
    if name.endswith(".json"):
        try:
            parse_json(data, name)
        except NemoconvError as exc:
            return str(exc).removeprefix(f"{name}: ")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    return "not text (holds NUL bytes)" if "\0" in text else None


def _why_not_carried(directory: Path, name: str, wanted: set[str]) -> str:
    if name.endswith(_PICKLE_SUFFIXES):
        return "pickle format (never read)"
    if (directory / name).is_dir() and not (directory / name).is_symlink():
        return "a directory"
    if name not in wanted:
        return "not a file a checkpoint needs"
    if link_leaves(directory, name):
        return "a symbolic link leaving the checkpoint"
    return "not a regular file"


def select_side_files(directory: Path, config: dict) -> tuple[list[SideFile], dict[str, str]]:
    """The side files to carry (checked, with their bytes), and {name: reason} for every other file."""
    directory = Path(directory)
    wanted = set(TOKENIZER_FILES + OTHER_FILES + LICENSE_FILES) | remote_code_files(config)
    carried: list[SideFile] = []
    skipped: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.startswith(".") or name.endswith(".safetensors") or name in WRITTEN_ANEW:
            continue  # hidden files, the tensors and what is written anew are not side files
        if name not in wanted or link_leaves(directory, name) or not path.is_file():
            skipped[name] = _why_not_carried(directory, name, wanted)
            continue
        try:
            data = read_owned(directory, name, MAX_SIDE_FILE)
        except NemoconvError as exc:
            skipped[name] = str(exc).removeprefix(f"{path}: ")
            continue
        reason = why_not_content(name, data)
        if reason:
            skipped[name] = reason
        else:
            carried.append(SideFile(name, data))
    return carried, skipped


def write_side_files(out_dir: Path, carried: list[SideFile]) -> None:
    """Write the checked bytes as new regular files (no links, no permission bits copied)."""
    for f in carried:
        (out_dir / f.name).write_bytes(f.data)


def upload_files(ck: Checkpoint) -> list[Path]:
    """What `upload` sends: the shards, index and config, the side files a checkpoint needs, and what
    nemoconv wrote (manifest, verify record, card). Nothing else, and nothing through a link leaving it."""
    directory = ck.path
    names = [f.name for f in ck.shard_files] + ["config.json"]
    names += [f.name for f in select_side_files(directory, ck.config)[0]]
    names += [n for n in (INDEX_NAME, MANIFEST_NAME, VERIFY_RECORD, CARD_NAME) if (directory / n).is_file()]
    return [owned_file(directory, n) for n in sorted(set(names))]
