"""Name templates (`backbone.layers.{i}.mixer.{rest}`) and the layer-index arithmetic between two of them.

`{i}`, `{j}`, `{k}` match digits, `{rest}`, `{prefix}`, `{layer}` anything, `{x:a|b}` one of the alternatives,
any other `{name}` one dotted component. A template matches a name into fields and formats fields into a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nemoconv.schemes.sizes import check_expression, spec_value

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")
_DEFAULT_PATTERNS = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "rest": r".+", "prefix": r".+", "layer": r".+"}


@dataclass(frozen=True)
class Template:
    """A name template that matches names and formats new ones from the captured fields."""

    text: str
    regex: re.Pattern = field(init=False, repr=False, compare=False)
    fields: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        parts, names, last = [], [], 0
        for m in _PLACEHOLDER.finditer(self.text):
            literal = self.text[last:m.start()]
            if "{" in literal or "}" in literal:
                raise ValueError(f"template {self.text!r}: unmatched brace in {literal!r}")
            name, alt = m.group(1), m.group(2)
            if name in names:
                raise ValueError(f"template {self.text!r}: field {{{name}}} appears twice")
            parts.append(re.escape(literal))
            parts.append(f"(?P<{name}>{alt if alt is not None else _DEFAULT_PATTERNS.get(name, r'[^.]+')})")
            names.append(name)
            last = m.end()
        tail = self.text[last:]
        if "{" in tail or "}" in tail:
            raise ValueError(f"template {self.text!r}: unmatched brace in {tail!r}")
        try:
            regex = re.compile("^" + "".join(parts) + re.escape(tail) + "$")
        except re.error as exc:
            raise ValueError(f"template {self.text!r}: invalid alternatives ({exc})") from None
        object.__setattr__(self, "regex", regex)
        object.__setattr__(self, "fields", tuple(names))

    def match(self, name: str) -> dict[str, str] | None:
        m = self.regex.match(name)
        return m.groupdict() if m else None

    def format(self, fields: dict[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], self.text)


@dataclass(frozen=True)
class Index:
    """`flat = outer * size + inner`: one side's flat layer index is the other side's two nested ones."""

    flat: str
    outer: str
    size: str
    inner: str  # a field name, a digit string, or "last"

    @classmethod
    def parse(cls, text: str) -> "Index":
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\w+)\s*\*\s*(\w+)\s*\+\s*(\w+)\s*", text)
        if m is None:
            raise ValueError(f"index {text!r}: expected 'k = d * SIZE + j'")
        check_expression(m.group(3))
        return cls(*m.groups())

    @property
    def nested_fields(self) -> set[str]:
        """The fields the nested side has that the flat side computes (`outer`, and `inner` unless fixed)."""
        return {self.outer} | ({self.inner} if self.inner != "last" and not self.inner.isdigit() else set())

    def _fixed_inner(self, size: int) -> int | None:
        if self.inner == "last":
            return size - 1
        return int(self.inner) if self.inner.isdigit() else None

    def nest(self, fields: dict, spec) -> dict | None:
        """Add `outer` (and `inner`) computed from `flat`; None when a fixed inner position does not match."""
        size = spec_value(self.size, spec)
        if size <= 0:
            return None
        outer, inner = divmod(int(fields[self.flat]), size)
        fixed = self._fixed_inner(size)
        if fixed is not None and inner != fixed:
            return None
        out = {**fields, self.outer: str(outer)}
        if fixed is None:
            out[self.inner] = str(inner)
        return out

    def flatten(self, fields: dict, spec) -> dict | None:
        size = spec_value(self.size, spec)
        fixed = self._fixed_inner(size)
        inner = fixed if fixed is not None else int(fields[self.inner])
        if size <= 0 or not 0 <= inner < size:
            return None
        return {**fields, self.flat: str(int(fields[self.outer]) * size + inner)}
