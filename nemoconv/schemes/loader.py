"""The schemes present: every `mappings/*.toml`, checked against the schema and loaded once.

A scheme is a file: the command line's choices, quantize's output schemes and auto-detection all come from the
files found here, so adding `mappings/<name>.toml` adds a scheme. A file that breaks the schema (or is not TOML)
is refused with its path and line, before anything is converted.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

import tomllib

from nemoconv.errors import NemoconvError
from nemoconv.schemes.rules import Scheme
from nemoconv.schemes.schema import Invalid, build
from nemoconv.schemes.toml_lines import key_lines, line_of

CANONICAL = "hf"


@lru_cache(maxsize=1)
def mappings_dir() -> Path:
    """`mappings/` beside the package in a checkout; the copy installed as `nemoconv/mappings` otherwise."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "mappings", package / "mappings"):
        if (candidate / f"{CANONICAL}.toml").is_file():
            return candidate
    raise NemoconvError("cannot find the mappings/ directory (broken installation)")


def _describe(path: tuple) -> str:
    """`("rename", 3, "to")` → `rename[3].to`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NemoconvError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise NemoconvError(f"{path}:{line}: not UTF-8 text (a mapping file is TOML)") from None


def read_scheme(path: Path) -> Scheme:
    """One mapping file → its Scheme, or NemoconvError `FILE:LINE: key: what is wrong`."""
    text = _read_text(path)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column \d+\)$", str(exc))
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)$", "", str(exc))
        line = int(where.group(1)) if where else text.count("\n") + 1
        raise NemoconvError(f"{path}:{line}: not valid TOML: {reason}") from None
    try:
        scheme = build(Scheme, table)
    except Invalid as exc:
        line = line_of(key_lines(text), exc.path)
        raise NemoconvError(f"{path}:{line}: {_describe(exc.path) + ': ' if exc.path else ''}{exc.message}") from None
    if scheme.name != path.stem:
        raise NemoconvError(f"{path}:{line_of(key_lines(text), ('scheme',))}: scheme = {scheme.name!r}, but a "
                            f"scheme's file is named after it ({scheme.name}.toml)")
    return scheme


@lru_cache(maxsize=None)
def _load(directory: Path) -> Mapping[str, Scheme]:
    schemes = {}
    for path in sorted(directory.glob("*.toml")):
        scheme = read_scheme(path)
        schemes[scheme.name] = scheme
    if CANONICAL not in schemes:
        raise NemoconvError(f"{directory}: no {CANONICAL}.toml (the canonical scheme every other one is written "
                            f"against)")
    return MappingProxyType(schemes)


def load_schemes(directory: Path | None = None) -> Mapping[str, Scheme]:
    """Every scheme by name (read-only), from `directory` or the package's mappings/."""
    return _load(Path(directory) if directory is not None else mappings_dir())


def get_scheme(name: str) -> Scheme:
    schemes = load_schemes()
    if name not in schemes:
        raise NemoconvError(f"unknown scheme {name!r} (known: {', '.join(scheme_names())})")
    return schemes[name]


def scheme_names() -> tuple[str, ...]:
    """The schemes present, the canonical one first (the command line's choices)."""
    return (CANONICAL,) + tuple(sorted(set(load_schemes()) - {CANONICAL}))


def quantize_outputs() -> tuple[str, ...]:
    """The schemes `nemoconv quantize --to` writes (files with `quantize_output = true`)."""
    return tuple(n for n in scheme_names() if load_schemes()[n].quantize_output)


def detect_schemes(tensor_names: Iterable[str]) -> list[str]:
    """The schemes whose `detect` regexes match one of `tensor_names` (auto-detection wants exactly one)."""
    names = list(tensor_names)
    return [s.name for s in (load_schemes()[n] for n in scheme_names())
            if any(rx.search(t) for rx in s.detect for t in names)]
