"""Prompts for `verify` (and calibration): a user's file, or a deterministic built-in set.

A prompts file holds one text per line, or JSONL objects with `text` or `input_ids`. Text goes
through the checkpoint's `tokenizer.json` (the `tokenizers` library); without one only token ids
work. Without a file the built-in set is text when a tokenizer exists, seeded token ids otherwise.
Every problem with a file is one `NemoconvError` line naming the file and line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from nemoconv.errors import NemoconvError
from nemoconv.untrusted import parse_json

# Varied on purpose (prose, code, numbers, dialogue, other languages): a layout bug that only shows on
# some token statistics still gets exercised. Each is long enough for --seq-len 64 with a real tokenizer.
BUILTIN_TEXTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes. Within fifty years presses were running in more than two hundred European cities, "
    "and the price of a book fell so far that ordinary merchants could afford small libraries of their own.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    \"\"\"Merge two sorted lists in linear "
    "time.\"\"\"\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
    "            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n"
    "    out.extend(a[i:]); out.extend(b[j:])\n    return out\n\nprint(merge_sorted([1, 4, 9], [2, 3, 10, 11]))\n",
    "Question: A train leaves the station at 9:40 and travels 315 kilometres at an average speed of 84 km/h. "
    "At what time does it arrive? Answer: 315 / 84 = 3.75 hours, which is 3 hours and 45 minutes, so the train "
    "arrives at 13:25. Check: 84 * 3.75 = 315. The same method works for any distance d and speed v: t = d / v.",
    "User: Can you explain why the sky looks blue during the day but red at sunset?\nAssistant: Sunlight is "
    "scattered by the molecules in the air, and shorter wavelengths scatter much more strongly than longer ones. "
    "At noon the light reaching you has been scattered across the whole sky, so blue dominates; at sunset it "
    "crosses far more atmosphere, the blue is scattered away, and the remaining light is red and orange.",
    "La fotosíntesis es el proceso mediante el cual las plantas, las algas y algunas bacterias convierten la "
    "energía de la luz en energía química. En los cloroplastos, el agua se divide y se libera oxígeno, mientras "
    "que el dióxido de carbono se fija en azúcares que la planta utiliza para crecer y almacenar energía.",
    "{\"id\": 4182, \"name\": \"sensor-7\", \"readings\": [21.4, 21.9, 22.3, 22.1, 21.7], \"unit\": \"celsius\", "
    "\"status\": \"ok\", \"location\": {\"building\": \"B\", \"floor\": 3, \"room\": \"3.14\"}, \"tags\": "
    "[\"hvac\", \"north-wing\", \"calibrated-2024-03\"], \"last_seen\": \"2024-05-02T17:45:09Z\"}",
    "Mamba layers replace attention with a selective state space model: each token updates a fixed-size "
    "recurrent state through input-dependent decay and gating, so inference needs constant memory per layer "
    "instead of a key-value cache that grows with the sequence. Hybrid models keep a few attention layers for "
    "precise recall and use Mamba layers everywhere else.",
    "量子计算利用量子比特的叠加和纠缠来处理信息。与只能表示零或一的经典比特不同，量子比特可以同时处于多种状态的"
    "叠加之中。研究人员希望在化学模拟、优化问题和密码学等领域，量子计算机能够解决经典计算机难以处理的问题。",
)
SEED = 20240521  # built-in token-id prompts: fixed, so every run and every machine feeds the same ids


@dataclass
class Prompt:
    source: str           # where it came from, for the report ("prompts.txt:3", "built-in text 2", ...)
    ids: list[int]
    text: str | None = None
    extended_from: int | None = None  # original length when verify extended it to --seq-len

    def to_dict(self) -> dict:
        out = {"source": self.source, "tokens": len(self.ids)}
        if self.text is not None:
            out["text"] = self.text if len(self.text) <= 200 else self.text[:200] + "…"
        if self.extended_from is not None:
            out["extended_from"] = self.extended_from
        return out


@dataclass
class TokenizerInfo:
    tokenizer: object | None  # tokenizers.Tokenizer
    path: Path | None
    note: str | None = None


def find_tokenizer(*directories: Path) -> TokenizerInfo:
    """The first `tokenizer.json` among the directories (reference first); a note if two differ."""
    found = [Path(d) / "tokenizer.json" for d in directories if (Path(d) / "tokenizer.json").is_file()]
    if not found:
        return TokenizerInfo(None, None)
    path = found[0]
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise NemoconvError(f"{path}: cannot load tokenizer ({' '.join(str(exc).split())[:200]})") from None
    note = None
    if len(found) > 1 and _file_sha(found[0]) != _file_sha(found[1]):
        note = f"the two checkpoints' tokenizer.json differ; prompts were tokenized with {path}"
    return TokenizerInfo(tokenizer, path, note)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=True).ids)


def check_ids(ids: list[int], vocab_size: int, where: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise NemoconvError(f"{where}: token id {t} is outside the model's vocabulary (0..{vocab_size - 1})")


def read_prompt_file(path: str | Path, tokenizer, vocab_size: int) -> list[Prompt]:
    """Parse a prompts file: text lines, or JSONL with `text` or `input_ids` per line."""
    path = Path(path)
    if not path.is_file():
        raise NemoconvError(f"{path}: prompts file not found")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NemoconvError(f"{path}: prompts file is not UTF-8 text") from None
    except OSError as exc:
        raise NemoconvError(f"{path}: cannot read prompts file ({exc.strerror or exc})") from None
    lines = [(n, line) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    if not lines:
        raise NemoconvError(f"{path}: prompts file is empty")
    jsonl = path.suffix.lower() in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{")
    prompts = []
    for n, line in lines:
        where = f"{path}:{n}"
        if jsonl:
            prompts.append(_jsonl_prompt(line, where, tokenizer, vocab_size))
        else:
            prompts.append(text_prompt(line, where, tokenizer, vocab_size, path))
    return prompts


def text_prompt(text: str, where: str, tokenizer, vocab_size: int, path: Path | None = None) -> Prompt:
    if tokenizer is None:
        hint = f" (write {path} as JSONL with input_ids)" if path is not None else " (give input_ids)"
        raise NemoconvError(f"{where}: text prompt, but neither checkpoint has a tokenizer.json{hint}")
    ids = encode(tokenizer, text)
    if not ids:
        raise NemoconvError(f"{where}: the prompt tokenizes to no tokens")
    check_ids(ids, vocab_size, where)
    return Prompt(where, ids, text)


def _jsonl_prompt(line: str, where: str, tokenizer, vocab_size: int) -> Prompt:
    obj = parse_json(line, where)  # a user's file: 5000-digit ids or deep nesting are one clear line too
    if not isinstance(obj, dict) or ("text" not in obj and "input_ids" not in obj):
        raise NemoconvError(f"{where}: each JSONL line must be an object with \"text\" or \"input_ids\"")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise NemoconvError(f"{where}: input_ids must be a non-empty list of integers")
        check_ids(ids, vocab_size, where)
        return Prompt(where, list(ids), obj.get("text") if isinstance(obj.get("text"), str) else None)
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise NemoconvError(f"{where}: \"text\" must be a non-empty string")
    return text_prompt(text, where, tokenizer, vocab_size)


def builtin_prompts(num_prompts: int, seq_len: int, tokenizer, vocab_size: int) -> list[Prompt]:
    """The built-in set: texts through the tokenizer when there is one, then seeded token ids."""
    prompts: list[Prompt] = []
    if tokenizer is not None:
        for k, text in enumerate(BUILTIN_TEXTS[:num_prompts]):
            ids = [t for t in encode(tokenizer, text)]
            if any(not 0 <= t < vocab_size for t in ids):
                raise NemoconvError(
                    f"tokenizer.json produces token ids beyond the model's vocabulary ({vocab_size}); "
                    f"it does not belong to this checkpoint"
                )
            if ids:
                prompts.append(Prompt(f"built-in text {k}", ids, text))
    for k in range(len(prompts), num_prompts):
        g = torch.Generator().manual_seed(SEED + k)
        ids = torch.randint(0, vocab_size, (seq_len,), generator=g).tolist()
        prompts.append(Prompt(f"built-in ids (seed {SEED + k})", ids))
    return prompts


def fit_prompts(prompts: list[Prompt], seq_len: int) -> tuple[list[Prompt], list[Prompt]]:
    """Truncate long prompts to seq_len; return (all, the ones still short: verify extends those)."""
    short = []
    for p in prompts:
        if len(p.ids) > seq_len:
            p.ids = p.ids[:seq_len]
        elif len(p.ids) < seq_len:
            short.append(p)
    return prompts, short


def prompts_from_list(items, tokenizer, vocab_size: int) -> list[Prompt]:
    """Prompts given in Python: texts, or lists of token ids."""
    out = []
    for k, item in enumerate(items):
        where = f"prompts[{k}]"
        if isinstance(item, str):
            out.append(text_prompt(item, where, tokenizer, vocab_size))
        elif isinstance(item, (list, tuple)) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in item):
            check_ids(list(item), vocab_size, where)
            out.append(Prompt(where, list(item)))
        else:
            raise NemoconvError(f"{where}: a prompt must be a string or a non-empty list of token ids")
    if not out:
        raise NemoconvError("prompts: the list is empty")
    return out


# ---- the tokenizer and the generation ids: what a serving stack runs beside the weights ----------------------

GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")


def tokenizer_differences(reference: Path, candidate: Path, configs: tuple[dict, dict]) -> list[str]:
    """What differs between two checkpoints' tokenizers and generation ids, one short line each (a file present
    on one side only is a difference). Every file is read as untrusted JSON; `configs` are both config.json
    as the checkpoints were opened (they may hold `Infinity`, as transformers writes `time_step_limit`)."""
    ref, cand = Path(reference), Path(candidate)
    diffs = _json_diffs(ref, cand, "tokenizer.json", _tokenizer_json_diffs)
    diffs += _json_diffs(ref, cand, "tokenizer_config.json", _tokenizer_config_diffs)
    diffs += _json_diffs(ref, cand, "special_tokens_map.json", _value_diffs)
    for name in ("tokenizer.model", "chat_template.jinja"):
        diffs += _bytes_diffs(ref, cand, name)
    diffs += _json_diffs(ref, cand, "generation_config.json", _generation_id_diffs)
    return diffs + _generation_id_diffs("config.json", *configs)


def _json_diffs(ref: Path, cand: Path, name: str, compare) -> list[str]:
    from nemoconv.untrusted import load_json, want_dict

    a, b = ref / name, cand / name
    if not a.is_file() and not b.is_file():
        return []
    if a.is_file() != b.is_file():
        return [f"{name}: in the {'reference' if a.is_file() else 'candidate'} only"]
    return compare(name, want_dict(load_json(a), str(a)), want_dict(load_json(b), str(b)))


def _bytes_diffs(ref: Path, cand: Path, name: str) -> list[str]:
    a, b = ref / name, cand / name
    if a.is_file() != b.is_file():
        return [f"{name}: in the {'reference' if a.is_file() else 'candidate'} only"]
    if a.is_file() and _file_sha(a) != _file_sha(b):
        return [f"{name} differs"]
    return []


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value_diffs(name: str, a: dict, b: dict, keys=None) -> list[str]:
    keys = keys if keys is not None else sorted(set(a) | set(b))
    return [f"{name} {k}: {_short(a.get(k))} vs {_short(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


def _tokenizer_json_diffs(name: str, a: dict, b: dict) -> list[str]:
    ma, mb = a.get("model"), b.get("model")
    diffs = []
    if isinstance(ma, dict) and isinstance(mb, dict):
        diffs += _vocab_diffs(name, ma.get("vocab"), mb.get("vocab"))
        diffs += _merges_diffs(name, ma.get("merges"), mb.get("merges"))
        others = sorted((set(ma) | set(mb)) - {"vocab", "merges"})
        diffs += _value_diffs(f"{name} model", ma, mb, others)
    elif ma != mb:
        diffs.append(f"{name} model differs")
    diffs += _added_token_diffs(name, a.get("added_tokens"), b.get("added_tokens"))
    diffs += [f"{name} {part} differs" for part in _TOKENIZER_PARTS if a.get(part) != b.get(part)]
    return diffs


def _vocab_diffs(name: str, a, b) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):  # BPE, WordPiece, WordLevel: token → id
        moved = [t for t in a if t in b and a[t] != b[t]]
        only = [t for t in a.keys() ^ b.keys()]
        diffs = []
        if moved:
            t = moved[0]
            diffs.append(f"{name} vocab: {len(moved)} ids differ, first {_short(t)} {a[t]}→{b[t]}")
        if only:
            diffs.append(f"{name} vocab: {len(only)} tokens in one side only, first {_short(only[0])}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):  # Unigram: [piece, score] by id
        changed = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        diffs = [f"{name} vocab: {len(a)} vs {len(b)} entries"] if len(a) != len(b) else []
        if changed:
            i = changed[0]
            diffs.append(f"{name} vocab: {len(changed)} ids differ, first id {i}: {_short(a[i])} vs {_short(b[i])}")
        return diffs
    return [] if a == b else [f"{name} vocab differs"]


def _merges_diffs(name: str, a, b) -> list[str]:
    def canonical(merges):  # "a b" and ["a", "b"] are the same merge (tokenizers writes both forms)
        if not isinstance(merges, list):
            return merges
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) if isinstance(m, list) else m
                for m in merges]

    a, b = canonical(a), canonical(b)
    if a == b:
        return []
    if not (isinstance(a, list) and isinstance(b, list)):
        return [f"{name} merges differ"]
    changed = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    first = changed[0] if changed else min(len(a), len(b))
    return [f"{name} merges: {len(a)} vs {len(b)}, first difference at rank {first}"]


def _added_token_diffs(name: str, a, b) -> list[str]:
    def by_id(tokens):
        if not isinstance(tokens, list):
            return {"?": tokens}
        return {t.get("id") if isinstance(t, dict) else i: t for i, t in enumerate(tokens)}

    a, b = by_id(a), by_id(b)
    ids = [i for i in (a.keys() | b.keys()) if a.get(i) != b.get(i)]
    if not ids:
        return []
    i = sorted(ids, key=str)[0]
    show = [(t.get("content") if isinstance(t, dict) else t) for t in (a.get(i), b.get(i))]
    return [f"{name} added_tokens: {len(ids)} differ, first id {i}: {_short(show[0])} vs {_short(show[1])}"]


def _tokenizer_config_diffs(name: str, a: dict, b: dict) -> list[str]:
    keys = sorted(k for k in set(a) | set(b)
                  if k in ("chat_template", "added_tokens_decoder") or k.endswith(("_token", "_tokens")))
    return _value_diffs(name, a, b, keys)


def _generation_id_diffs(name: str, a: dict, b: dict) -> list[str]:
    return [f"{name} {k} {a.get(k)} vs {b.get(k)}" for k in GENERATION_IDS if a.get(k) != b.get(k)]
