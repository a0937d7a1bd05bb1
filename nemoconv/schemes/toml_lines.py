"""Where a key or table is in a TOML text: tomllib reports no lines for valid TOML, so schema errors find theirs here.

`key_lines(text)` maps paths as the schema names them (`("scheme",)`, `("rename", 3)` for the fourth `[[rename]]`,
`("rename", 3, "to")` for its `to` key) to 1-based line numbers. Only what starts a line outside any value is
looked at (table headers and `key =`); strings, comments and multi-line arrays are skipped, so a value that
looks like a header or a key is never taken for one. Keys inside inline tables are located at their outer key.
"""

from __future__ import annotations

import re

_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[\s*({_DOTTED})\s*\]\]")
_HEADER = re.compile(rf"\s*\[\s*({_DOTTED})\s*\]")
_KEY = re.compile(rf"\s*({_DOTTED})\s*=")


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip()[1:-1] if p.strip()[:1] in "\"'" else p.strip() for p in re.findall(_PART, dotted))


class _ValueScanner:
    """Follows strings and brackets across lines: whether the next line starts inside a value."""

    def __init__(self):
        self.depth, self.open_string = 0, ""  # open_string: '"""' or "'''" while a multi-line string is open

    @property
    def inside(self) -> bool:
        return bool(self.depth or self.open_string)

    def scan(self, line: str, start: int = 0) -> None:
        i = start
        while i < len(line):
            if self.open_string:
                end = line.find(self.open_string, i)
                if end < 0:
                    return
                i, self.open_string = end + 3, ""
                continue
            c = line[i]
            if c == "#":
                return
            if line.startswith(('"""', "'''"), i):
                self.open_string, i = line[i:i + 3], i + 3
            elif c in "\"'":
                i = self._skip_string(line, i)
            else:
                self.depth += (c in "[{") - (c in "]}")
                i += 1

    @staticmethod
    def _skip_string(line: str, i: int) -> int:
        quote, i = line[i], i + 1
        while i < len(line) and line[i] != quote:
            i += 2 if quote == '"' and line[i] == "\\" else 1
        return i + 1


def key_lines(text: str) -> dict[tuple, int]:
    lines: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    table: tuple = ()
    scanner = _ValueScanner()
    for number, line in enumerate(text.splitlines(), 1):
        if scanner.inside:
            scanner.scan(line)
            continue
        header = _ARRAY_HEADER.match(line)
        if header:
            name = _parts(header.group(1))
            counts[name] = counts.get(name, 0) + 1
            table = name + (counts[name] - 1,)
            lines.setdefault(name, number)
            lines[table] = number
            continue
        header = _HEADER.match(line)
        if header:
            table = _parts(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            parts = _parts(key.group(1))
            for n in range(1, len(parts) + 1):
                lines.setdefault(table + parts[:n], number)
            scanner.scan(line, key.end())
    return lines


def line_of(lines: dict[tuple, int], path: tuple) -> int:
    """The line of `path`, else of the nearest enclosing key or table found; 1 when none is."""
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return 1
