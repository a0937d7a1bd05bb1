"""The schema of `mappings/*.toml`, declared by the rule classes themselves (rules.py).

Each field of a rule class is also a key of its table, declared with `key(check, default)`: `check` validates
the TOML value and turns it into what the rule holds (a `Template`, a compiled regex, a tuple); a field
without a default is a required key. `build` checks a parsed table against its class: an unknown key, a
wrong type, a missing key or a rule that contradicts itself raises `Invalid` with the path of the offending
key (`("rename", 3, "to")`), which the loader turns into `file:line`.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, field, fields
from typing import Any, Callable

from nemoconv.schemes.sizes import check_expression
from nemoconv.schemes.template import Index, Template
from nemoconv.storage.model_spec import LAYER_KIND_NAMES
from nemoconv.untrusted import type_name

Check = Callable[[Any], Any]


class Invalid(Exception):
    """A mapping file breaks the schema at `path` (table names, array positions and keys, outermost first)."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.message, self.path = message, path

    def within(self, *outer) -> "Invalid":
        return Invalid(self.message, tuple(outer) + self.path)


def key(check: Check, default: Any = MISSING, *, toml: str | None = None):
    """A rule field that is a key of its table; `toml`: the key's spelling when it differs from the field's."""
    return field(default=default, metadata={"check": check, "toml": toml or ""})


def table_keys(cls) -> dict[str, Any]:
    """TOML key → dataclass field, for the fields declared with `key`."""
    return {f.metadata["toml"] or f.name: f for f in fields(cls) if "check" in f.metadata}


def build(cls, table: Any):
    """The frozen `cls` for one parsed TOML table, or `Invalid` at the offending key."""
    if not isinstance(table, dict):
        raise Invalid(f"expected a table, got {type_name(table)}")
    declared = table_keys(cls)
    for name in table:
        if name not in declared:
            raise Invalid(f"unknown key {name!r} (allowed: {', '.join(declared)})", (name,))
    values = {}
    for name, f in declared.items():
        if name in table:
            try:
                values[f.name] = f.metadata["check"](table[name])
            except Invalid as exc:
                raise exc.within(name) from None
            except ValueError as exc:
                raise Invalid(str(exc), (name,)) from None
        elif f.default is MISSING:
            raise Invalid(f"missing required key {name!r}")
    return cls(**values)


# ---- the checks: one per kind of value -------------------------------------------------------------------


def _want(value, kind: type, what: str):
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):  # True is an int in Python
        raise Invalid(f"expected {what}, got {type_name(value)}")
    return value


def text(value) -> str:
    return _want(value, str, "a string")


def flag(value) -> bool:
    return _want(value, bool, "true or false")


def non_negative(value) -> int:
    if _want(value, int, "an integer") < 0:
        raise Invalid(f"expected an axis >= 0, got {value}")
    return value


def one_of(*choices: str) -> Check:
    def check(value) -> str:
        if text(value) not in choices:
            raise Invalid(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _items(check: Check) -> Check:
    """A non-empty array whose every element passes `check`; a tuple."""
    def check_all(value) -> tuple:
        if not _want(value, list, "an array"):
            raise Invalid("expected a non-empty array")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check(item))
            except Invalid as exc:
                raise exc.within(i) from None
            except ValueError as exc:
                raise Invalid(str(exc), (i,)) from None
        return tuple(out)
    return check_all


def template(value) -> Template:
    return Template(text(value))  # ValueError on a broken placeholder


def pattern(value) -> re.Pattern:
    try:
        return re.compile(text(value))
    except re.error as exc:
        raise Invalid(f"invalid regular expression {value!r}: {exc}") from None


def expression(value) -> str:
    return check_expression(text(value))


def layer_index(value) -> Index:
    return Index.parse(text(value))


def layer_kinds(value) -> str:
    bad = sorted(set(text(value)) - set(LAYER_KIND_NAMES)) if value else ["(empty)"]
    if bad:
        raise Invalid(f"{value!r}: layer kinds are {', '.join(LAYER_KIND_NAMES)}, not {''.join(bad)!r}")
    return value


def scheme_name(value) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", text(value)) or value == "auto":
        raise Invalid(f"scheme name {value!r}: lower-case letters, digits and _ (a command-line choice; not 'auto')")
    return value


texts, templates, patterns, expressions = _items(text), _items(template), _items(pattern), _items(expression)


def tables(cls) -> Check:
    """An array of tables, each built into `cls`."""
    return _items(lambda item: build(cls, item))
