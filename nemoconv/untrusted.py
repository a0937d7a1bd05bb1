"""Reading JSON that nemoconv did not write (config, index, safetensors headers, records, manifests).

Every such file is hostile until checked: Python's `json` accepts duplicate keys (the last wins),
`NaN`/`Infinity`, numbers that overflow to `inf` (`1e400`), and raises ValueError on 5000-digit integers
or RecursionError on deep nesting. Here each of those is a `NemoconvError` naming the file, and the typed
getters below turn "a list where a dict belongs" into one clear line instead of a TypeError later.
"""

from __future__ import annotations

import math
from pathlib import Path

from nemoconv.errors import NemoconvError

MAX_JSON_BYTES = 64 << 20  # no config, index or record of a real checkpoint comes near this
MAX_DEPTH = 64             # nesting deeper than any file nemoconv reads needs


class _Duplicate(Exception):
    pass


def _pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}… does not fit a float")
    return value


def _constant(text: str):
    raise ValueError(f"{text} is not valid JSON")


def _infinity(text: str):
    """transformers writes float("inf") as the bare `Infinity` of Python's json; NaN is never accepted."""
    if text in ("Infinity", "-Infinity"):
        return float(text)
    return _constant(text)


def _depth(obj) -> int:
    """Nesting depth (a scalar inside a container counts one level), without recursion; only containers are
    visited (a safetensors header holds thousands of numbers)."""
    deepest, stack = 1, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        if not children:
            continue
        if d + 1 > deepest:
            deepest = d + 1
            if deepest > MAX_DEPTH:
                return deepest
        stack.extend((v, d + 1) for v in children if isinstance(v, (dict, list)))
    return deepest


def parse_json(data: bytes | str, what: str, allow_infinity: bool = False):
    """Strict JSON: no duplicate keys, no NaN/Infinity, finite floats, integers of sane length, bounded
    nesting. `what` names the source in the error. `allow_infinity`: accept the literals `Infinity` and
    `-Infinity` (config.json as transformers writes it); numbers that overflow (`1e400`) stay errors."""
    import json

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        if isinstance(data, (bytes, bytearray, memoryview)) and text.startswith("\ufeff"):
            text = text[1:]
        obj = json.loads(text, object_pairs_hook=_pairs, parse_float=_float,
                         parse_constant=_infinity if allow_infinity else _constant)
    except _Duplicate as dup:
        raise NemoconvError(f"{what}: key {str(dup)[:80]!r} appears twice") from None
    except UnicodeDecodeError:
        raise NemoconvError(f"{what}: not UTF-8 text") from None
    except RecursionError:
        raise NemoconvError(f"{what}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, too many digits, overflowing floats
        reason = str(exc).splitlines()[0][:120] if str(exc) else "invalid"
        raise NemoconvError(f"{what}: not valid JSON ({reason})") from None
    if _depth(obj) > MAX_DEPTH:
        raise NemoconvError(f"{what}: nested too deeply (more than {MAX_DEPTH} levels)")
    return obj


def load_json(path: str | Path, what: str | None = None, max_bytes: int = MAX_JSON_BYTES,
              allow_infinity: bool = False):
    """Read and strictly parse a JSON file of at most `max_bytes`."""
    path = Path(path)
    what = what or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise NemoconvError(f"{what}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise NemoconvError(f"{what}: larger than {max_bytes >> 20} MiB; not a file nemoconv reads")
    return parse_json(data, what, allow_infinity)


# ---- typed getters: one clear line when a value has the wrong type or range ----------------------------


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


type_name = _type_name  # for callers that phrase their own "must be …, not …" errors


def want_dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise NemoconvError(f"{what} must be a JSON object, not {_type_name(value)}")
    return value


def want_list(value, what: str) -> list:
    if not isinstance(value, list):
        raise NemoconvError(f"{what} must be a list, not {_type_name(value)}")
    return value


def want_str(value, what: str, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise NemoconvError(f"{what} must be a string, not {_type_name(value)}")
    if len(value) > max_len:
        raise NemoconvError(f"{what} is longer than {max_len} characters")
    return value


def want_int(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (a float with an integral value is accepted, as JSON writers emit `1.0`), within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NemoconvError(f"{what} must be an integer, not {_type_name(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise NemoconvError(f"{what} must be an integer, got {value!r}")
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}…({len(str(value))} digits)"
        raise NemoconvError(f"{what} = {shown} is out of range [{lo if lo is not None else '-∞'}, "
                            f"{hi if hi is not None else '∞'}]")
    return value


def want_float(value, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NemoconvError(f"{what} must be a number, not {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise NemoconvError(f"{what} = {value!r} is out of range [{lo}, {hi}]")
    return value
