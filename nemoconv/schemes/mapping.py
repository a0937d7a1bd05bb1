"""Naming schemes as data: `mappings/<scheme>.toml` parsed into rules that the pipeline interprets.

A scheme is defined against the canonical `hf` names. Its file holds:
- `detect`: regexes of tensor names only this scheme has (scheme auto-detection);
- `aliases`: spellings other tools write, normalized on read (hf only: `model.` prefix, `embedding`);
- `rename`: ordered name templates `hf` ↔ `to`, first match wins in both directions;
- `merge_experts`: per-expert HF tensors stacked into one tensor (optionally transposed);
- `fuse`: several HF tensors concatenated along an axis (split back by sizes computed from the config);
- `cast`: dtype a tensor takes in this scheme;
- `drop`: HF tensors this scheme cannot hold (always recorded as a lossy step);
- `split`: one HF tensor stored as several named parts along an axis (Megatron's Mamba `in_proj.weight.z`…);
- `trim`: HF tensors whose rows a source may pad (Megatron's vocab padding), cut back to a config size on read.

A `rename` may also hold `kind` (the layer kind the rule is for: `M`, `*`, `-`, `E`; the layer is named by the
field `i` in the main stack or `k` in the flattened MTP stack) and `index` (`"k = d * SIZE + j"`: the flat
field `k` of one side is the nested `d`, `j` of the other, SIZE a config value; `j` may be a number or
`last`). Both need the config: pass `spec` to `to_scheme` / `to_hf`.

Templates use `{name}` placeholders: `{i}`, `{j}`, `{k}` match digits, `{rest}` anything, `{x:a|b}` one of
the alternatives, any other `{name}` one dotted component. The same templates rename `exclude_modules`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import tomllib

from nemoconv.errors import NemoconvError
from nemoconv.storage.safetensors_io import dtype_name

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")
_DEFAULT_PATTERNS = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "rest": r".+", "prefix": r".+", "layer": r".+"}


class Template:
    """A name template that matches names and formats new ones from the captured fields."""

    def __init__(self, text: str):
        self.text = text
        parts, last, self.fields = [], 0, []
        for m in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[last:m.start()]))
            name, alt = m.group(1), m.group(2)
            pattern = alt if alt is not None else _DEFAULT_PATTERNS.get(name, r"[^.]+")
            parts.append(f"(?P<{name}>{pattern})")
            self.fields.append(name)
            last = m.end()
        parts.append(re.escape(text[last:]))
        self.regex = re.compile("^" + "".join(parts) + "$")

    def match(self, name: str) -> dict[str, str] | None:
        m = self.regex.match(name)
        return m.groupdict() if m else None

    def format(self, fields: dict[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], self.text)

    def __repr__(self):
        return f"Template({self.text!r})"


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
        return cls(*m.groups())

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


@dataclass(frozen=True)
class Rename:
    hf: Template
    to: Template
    kind: str | None = None  # the layer kind this rule is for (needs the config)
    index: Index | None = None  # flat ↔ nested layer index (needs the config)

    def applies(self, fields: dict, spec) -> bool:
        if self.kind is None:
            return True
        if spec is None:
            return False
        if "i" in fields:
            codes, i = spec.layer_codes, int(fields["i"])
            return i < len(codes) and codes[i] in self.kind
        code = spec.mtp_layer_code(int(fields["k"]))
        return code is not None and code in self.kind


@dataclass(frozen=True)
class Split:
    hf: Template  # the whole tensor, in HF space
    to: Template  # its parts, in HF space with a {part} field (renamed afterwards like any other tensor)
    parts: tuple[str, ...]
    sizes: tuple[str, ...]
    axis: int


@dataclass(frozen=True)
class Trim:
    hf: Template
    size: str  # config value the rows are cut back to


@dataclass(frozen=True)
class MergeExperts:
    hf: Template  # must contain {j}, the expert index
    to: Template  # merged name, in HF space (renamed afterwards like any other tensor)
    transpose: bool
    count: str  # config field holding the number of experts


@dataclass(frozen=True)
class Fuse:
    hf: tuple[Template, ...]
    to: Template
    axis: int
    sizes: tuple[str, ...]  # products of config fields, e.g. "num_attention_heads*head_dim"
    unless_quantized: bool  # if any member or companion is FP8, nothing is fused
    companions: tuple[Template, ...] = ()  # join the group to decide, always emitted unchanged
    groups: str | None = None  # interleave: each of this many row groups holds its share of every member


@dataclass(frozen=True)
class Cast:
    hf: Template
    dtype: str  # a dtype name (`float32`)
    only_from: str | None = None  # cast only tensors stored in this dtype


@dataclass(frozen=True)
class Drop:
    hf: Template
    reason: str


@dataclass
class Scheme:
    name: str
    description: str
    detect: list[re.Pattern]
    aliases: list[Rename] = field(default_factory=list)
    renames: list[Rename] = field(default_factory=list)
    merges: list[MergeExperts] = field(default_factory=list)
    fuses: list[Fuse] = field(default_factory=list)
    casts: list[Cast] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    splits: list[Split] = field(default_factory=list)
    trims: list[Trim] = field(default_factory=list)
    container: str = "safetensors"  # how the scheme's checkpoints are stored: safetensors or torch_dist
    fp8_experts: bool = True  # whether merged/routed FP8 experts can be represented

    # ---- names --------------------------------------------------------------------------
    def normalize(self, name: str) -> str:
        """Apply read aliases (e.g. `model.` → `backbone.`) to a name in this scheme."""
        for alias in self.aliases:  # applied in order, each at most once
            fields = alias.hf.match(name)
            if fields is not None:
                name = alias.to.format(fields)
        return name

    def to_scheme(self, hf_name: str, spec=None) -> str | None:
        for rule in self.renames:
            fields = rule.hf.match(hf_name)
            if fields is not None and rule.index is not None:
                fields = rule.index.nest(fields, spec) if spec is not None else None
            if fields is not None and rule.applies(fields, spec):
                return rule.to.format(fields)
        return None

    def to_hf(self, name: str, spec=None) -> str | None:
        for rule in self.renames:
            fields = rule.to.match(name)
            if fields is not None and rule.index is not None:
                fields = rule.index.flatten(fields, spec) if spec is not None else None
            if fields is not None and rule.applies(fields, spec):
                return rule.hf.format(fields)
        return None

    def cast_for(self, hf_name: str, stored=None) -> str | None:
        """The dtype name this scheme stores `hf_name` in (`stored`: its current dtype, a name or torch dtype)."""
        for rule in self.casts:
            if rule.hf.match(hf_name) is not None:
                if rule.only_from is not None and stored is not None and dtype_name(stored) != rule.only_from:
                    return None
                return rule.dtype
        return None

    def drop_for(self, hf_name: str) -> Drop | None:
        for rule in self.drops:
            if rule.hf.match(hf_name) is not None:
                return rule
        return None

    def rename_module(self, hf_module: str) -> str:
        """Rename a module path (e.g. an `exclude_modules` entry) by renaming `<module>.weight`."""
        renamed = self.to_scheme(hf_module + ".weight")
        if renamed is None or not renamed.endswith(".weight"):
            raise NemoconvError(f"scheme {self.name}: no rule renames module {hf_module!r}")
        return renamed[: -len(".weight")]


_DTYPE_BY_NAME = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _template(text, where: str) -> Template:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a name template string")
    return Template(text)


def _parse_scheme(path: Path) -> Scheme:
    data = tomllib.loads(path.read_text())
    name = data["scheme"]
    where = path.name
    scheme = Scheme(
        name=name,
        description=data.get("description", ""),
        detect=[re.compile(p) for p in data.get("detect", [])],
        fp8_experts=bool(data.get("fp8_experts", True)),
        container=data.get("container", "safetensors"),
    )
    for r in data.get("aliases", []):
        scheme.aliases.append(Rename(_template(r["from"], where), _template(r["to"], where)))
    for r in data.get("rename", []):
        index = Index.parse(r["index"]) if "index" in r else None
        scheme.renames.append(Rename(_template(r["hf"], where), _template(r["to"], where), r.get("kind"), index))
    for r in data.get("split", []):
        scheme.splits.append(Split(_template(r["hf"], where), _template(r["to"], where), tuple(r["parts"]),
                                   tuple(r["sizes"]), int(r.get("axis", 0))))
    for r in data.get("trim", []):
        scheme.trims.append(Trim(_template(r["hf"], where), r["size"]))
    for r in data.get("merge_experts", []):
        scheme.merges.append(MergeExperts(_template(r["hf"], where), _template(r["to"], where),
                                          bool(r.get("transpose", False)), r.get("count", "n_routed_experts")))
    for r in data.get("fuse", []):
        scheme.fuses.append(Fuse(tuple(_template(t, where) for t in r["hf"]), _template(r["to"], where),
                                 int(r.get("axis", 0)), tuple(r["sizes"]), bool(r.get("unless_quantized", False)),
                                 tuple(_template(t, where) for t in r.get("companions", [])), r.get("groups")))
    for r in data.get("cast", []):
        only = r.get("only_from")
        scheme.casts.append(Cast(_template(r["hf"], where), _DTYPE_BY_NAME[r["dtype"]],
                                 _DTYPE_BY_NAME[only] if only else None))
    for r in data.get("drop", []):
        scheme.drops.append(Drop(_template(r["hf"], where), r["reason"]))
    return scheme


def mappings_dir() -> Path:
    """`mappings/` beside the package in a checkout; the copy installed as `nemoconv/mappings` otherwise."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "mappings", package / "mappings"):
        if (candidate / "hf.toml").is_file():
            return candidate
    raise NemoconvError("cannot find the mappings/ directory (broken installation)")


@lru_cache(maxsize=None)
def load_schemes() -> dict[str, Scheme]:
    schemes = {}
    for path in sorted(mappings_dir().glob("*.toml")):
        scheme = _parse_scheme(path)
        schemes[scheme.name] = scheme
    if "hf" not in schemes:
        raise NemoconvError("mappings/hf.toml is missing")
    return schemes


def get_scheme(name: str) -> Scheme:
    schemes = load_schemes()
    if name not in schemes:
        raise NemoconvError(f"unknown scheme {name!r} (known: {', '.join(sorted(schemes))})")
    return schemes[name]


# Config values the rules use that ModelSpec does not hold as attributes.
_DERIVED = {"mtp_layers_per_depth": lambda spec: len(spec.mtp_codes)}


def spec_value(name: str, spec) -> int:
    name = name.strip()
    if name.isdigit():
        return int(name)
    return int(_DERIVED[name](spec)) if name in _DERIVED else int(getattr(spec, name))


def config_product(expr: str, spec) -> int:
    """Evaluate `a*b*…` over ModelSpec attributes or integer literals (split sizes of fused tensors)."""
    value = 1
    for term in expr.split("*"):
        value *= spec_value(term, spec)
    return value
