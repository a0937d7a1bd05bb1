"""A naming scheme as frozen rule objects; each class is also the schema of its table in `mappings/<scheme>.toml`.

A scheme is defined against the canonical `hf` names. Its file holds:
- `scheme`, `description`; `detect`: regexes of tensor names only this scheme has (auto-detection);
- `container`: how its checkpoints are stored; `fp8_experts`: whether it can hold FP8 routed experts;
  `quantize_output`: whether `nemoconv quantize --to` writes it (engines read ModelOpt FP8 in it);
- `[[aliases]]`: spellings other tools write, normalized on read (hf only: `model.` prefix, `embedding`);
- `[[rename]]`: ordered name templates `hf` ↔ `to`, first match wins in both directions;
- `[[merge_experts]]`: per-expert HF tensors stacked into one tensor (optionally transposed);
- `[[fuse]]`: several HF tensors concatenated along an axis (split back by sizes computed from the config);
- `[[cast]]`: dtype a tensor takes in this scheme; `[[drop]]`: HF tensors this scheme cannot hold (lossy);
- `[[split]]`: one HF tensor stored as several named parts along an axis (Megatron's `in_proj.weight.z`…);
- `[[trim]]`: HF tensors whose rows a source may pad (Megatron's vocab padding), cut back on read.

A `rename` may also hold `kind` (the layer kind the rule is for: `M`, `*`, `-`, `E`; the layer is named by the
field `i` in the main stack or `k` in the flattened MTP stack), `index` (`"k = d * SIZE + j"`: the flat field
`k` of one side is the nested `d`, `j` of the other, SIZE a config value; `j` may be a number or `last`) and
`read_only` (a spelling only read: its `to` has fields `hf` cannot give). `kind` and `index` need the config:
pass `spec` to `to_scheme` / `to_hf`. The same templates rename `exclude_modules` (renamer.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nemoconv.errors import NemoconvError
from nemoconv.schemes.schema import (
    Invalid,
    expression,
    expressions,
    flag,
    key,
    layer_index,
    layer_kinds,
    non_negative,
    one_of,
    patterns,
    scheme_name,
    tables,
    template,
    templates,
    text,
    texts,
)
from nemoconv.schemes.template import Index, Template
from nemoconv.storage.safetensors_io import dtype_name

DTYPES = ("float32", "bfloat16", "float16")
CONTAINERS = ("safetensors", "torch_dist")
frozen_rule = dataclass(frozen=True, kw_only=True)
_ANY_SPEC = object()  # Scheme._memo: answers that hold for every spec


def _uses_only(target: Template, available, key_name: str, source: str, hint: str = "") -> None:
    """`target` is formatted from the fields `source` captured: it may use no other."""
    extra = [f for f in target.fields if f not in set(available)]
    if extra:
        raise Invalid(f"{{{extra[0]}}} is not a field {source} captures (it has: "
                      f"{', '.join('{' + f + '}' for f in sorted(available)) or 'none'}){hint}", (key_name,))


@frozen_rule
class Alias:
    from_: Template = key(template, toml="from")
    to: Template = key(template)

    def __post_init__(self):
        _uses_only(self.to, self.from_.fields, "to", "from")


@frozen_rule
class Rename:
    hf: Template = key(template)
    to: Template = key(template)
    kind: str | None = key(layer_kinds, None)  # the layer kind this rule is for (needs the config)
    index: Index | None = key(layer_index, None)  # flat ↔ nested layer index (needs the config)
    read_only: bool = key(flag, False)  # only read: never used to write a name

    def __post_init__(self):
        nested = self.index.nested_fields if self.index else set()
        flat = {self.index.flat} if self.index else set()
        if self.index and self.index.flat not in self.hf.fields:
            raise Invalid(f"index: {{{self.index.flat}}} is not a field of hf", ("index",))
        if self.index and not nested <= set(self.to.fields):
            raise Invalid(f"index: {sorted(nested)} are not all fields of to", ("index",))
        if not self.read_only:
            _uses_only(self.to, set(self.hf.fields) | nested, "to", "hf",
                       "; a rule that is only read says read_only = true")
        _uses_only(self.hf, set(self.to.fields) | flat, "hf", "to")
        if self.kind is not None and not {"i", "k"} & set(self.hf.fields):
            raise Invalid("kind needs the layer as field {i} or {k} in hf", ("kind",))

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


@frozen_rule
class Split:
    hf: Template = key(template)  # the whole tensor, in HF space
    to: Template = key(template)  # its parts, in HF space with a {part} field (renamed afterwards)
    parts: tuple[str, ...] = key(texts)
    sizes: tuple[str, ...] = key(expressions)
    axis: int = key(non_negative, 0)

    def __post_init__(self):
        if "part" not in self.to.fields:
            raise Invalid("to needs a {part} field", ("to",))
        if len(self.parts) != len(self.sizes):
            raise Invalid(f"{len(self.parts)} parts but {len(self.sizes)} sizes", ("sizes",))
        _uses_only(self.to, set(self.hf.fields) | {"part"}, "to", "hf")
        _uses_only(self.hf, self.to.fields, "hf", "to")


@frozen_rule
class Trim:
    hf: Template = key(template)
    size: str = key(expression)  # config value the rows are cut back to


@frozen_rule
class MergeExperts:
    hf: Template = key(template)  # must contain {j}, the expert index
    to: Template = key(template)  # merged name, in HF space (renamed afterwards like any other tensor)
    transpose: bool = key(flag, False)
    count: str = key(expression, "n_routed_experts")  # config field holding the number of experts

    def __post_init__(self):
        if "j" not in self.hf.fields:
            raise Invalid("hf needs a {j} field (the expert index)", ("hf",))
        _uses_only(self.to, set(self.hf.fields) - {"j"}, "to", "hf (besides {j})")
        _uses_only(self.hf, set(self.to.fields) | {"j"}, "hf", "to")


@frozen_rule
class Fuse:
    hf: tuple[Template, ...] = key(templates)
    to: Template = key(template)
    sizes: tuple[str, ...] = key(expressions)  # products of config fields, e.g. "num_attention_heads*head_dim"
    axis: int = key(non_negative, 0)
    unless_quantized: bool = key(flag, False)  # if any member or companion is FP8, nothing is fused
    companions: tuple[Template, ...] = key(templates, ())  # join the group to decide, always emitted unchanged
    groups: str | None = key(expression, None)  # interleave: each of this many row groups holds its share

    def __post_init__(self):
        if len(self.hf) != len(self.sizes):
            raise Invalid(f"{len(self.hf)} members in hf but {len(self.sizes)} sizes", ("sizes",))
        fields = set(self.hf[0].fields)
        for name, group in (("hf", self.hf), ("companions", self.companions)):
            if any(set(t.fields) != fields for t in group):
                raise Invalid(f"every member must capture the same fields as {self.hf[0].text!r}", (name,))
        _uses_only(self.to, fields, "to", "hf")


@frozen_rule
class Cast:
    hf: Template = key(template)
    dtype: str = key(one_of(*DTYPES))
    only_from: str | None = key(one_of(*DTYPES), None)  # cast only tensors stored in this dtype


@frozen_rule
class Drop:
    hf: Template = key(template)
    reason: str = key(text)


@frozen_rule
class Scheme:
    name: str = key(scheme_name, toml="scheme")
    description: str = key(text)
    detect: tuple[re.Pattern, ...] = key(patterns, ())
    container: str = key(one_of(*CONTAINERS), "safetensors")  # how its checkpoints are stored
    fp8_experts: bool = key(flag, True)  # whether merged/routed FP8 experts can be represented
    quantize_output: bool = key(flag, False)  # whether `nemoconv quantize --to` may write it
    aliases: tuple[Alias, ...] = key(tables(Alias), ())
    renames: tuple[Rename, ...] = key(tables(Rename), toml="rename")
    merges: tuple[MergeExperts, ...] = key(tables(MergeExperts), (), toml="merge_experts")
    fuses: tuple[Fuse, ...] = key(tables(Fuse), (), toml="fuse")
    casts: tuple[Cast, ...] = key(tables(Cast), (), toml="cast")
    drops: tuple[Drop, ...] = key(tables(Drop), (), toml="drop")
    splits: tuple[Split, ...] = key(tables(Split), (), toml="split")
    trims: tuple[Trim, ...] = key(tables(Trim), (), toml="trim")

    # ---- names --------------------------------------------------------------------------
    def _memo(self, spec) -> dict:
        """Answers by name for one spec (a frozen ModelSpec): a conversion asks about every name twice (the plan,
        then the write) and each answer tries the rules in turn. One spec at a time keeps it bounded; the
        (spec, answers) pair is swapped whole, so threads converting other checkpoints never mix answers."""
        slot = self.__dict__.get("_answers")
        if slot is None or (slot[0] is not spec and spec is not _ANY_SPEC):
            slot = (spec, {})
            self.__dict__["_answers"] = slot  # not a field: equality, hashing and repr ignore it
        return slot[1]

    def _remembered(self, answer, name: str, spec):
        """answer(name[, spec]) through the memo of `spec` (_ANY_SPEC: an answer that ignores the spec)."""
        memo = self._memo(spec)
        key = (answer.__name__, name)
        if key not in memo:
            memo[key] = answer(name) if spec is _ANY_SPEC else answer(name, spec)
        return memo[key]

    def normalize(self, name: str) -> str:
        """Apply read aliases (e.g. `model.` → `backbone.`) to a name in this scheme."""
        return self._remembered(self._normalize, name, _ANY_SPEC)  # its answer does not depend on the spec

    def _normalize(self, name: str) -> str:
        for alias in self.aliases:  # applied in order, each at most once
            fields = alias.from_.match(name)
            if fields is not None:
                name = alias.to.format(fields)
        return name

    def to_scheme(self, hf_name: str, spec=None) -> str | None:
        return self._remembered(self._to_scheme, hf_name, spec)

    def _to_scheme(self, hf_name: str, spec) -> str | None:
        for r in self.renames:
            if r.read_only:
                continue
            fields = r.hf.match(hf_name)
            if fields is not None and r.index is not None:
                fields = r.index.nest(fields, spec) if spec is not None else None
            if fields is not None and r.applies(fields, spec):
                return r.to.format(fields)
        return None

    def to_hf(self, name: str, spec=None) -> str | None:
        return self._remembered(self._to_hf, name, spec)

    def _to_hf(self, name: str, spec) -> str | None:
        for r in self.renames:
            fields = r.to.match(name)
            if fields is not None and r.index is not None:
                fields = r.index.flatten(fields, spec) if spec is not None else None
            if fields is not None and r.applies(fields, spec):
                return r.hf.format(fields)
        return None

    def hf_name(self, stored_name: str, spec=None) -> str | None:
        """The canonical name of a tensor stored as `stored_name` in this scheme (aliases applied first)."""
        return self.to_hf(self.normalize(stored_name), spec)

    def cast_for(self, hf_name: str, stored=None) -> str | None:
        """The dtype name this scheme stores `hf_name` in (`stored`: its current dtype, a name or torch dtype)."""
        for cast in self.casts:
            if cast.hf.match(hf_name) is not None:
                if cast.only_from is not None and stored is not None and dtype_name(stored) != cast.only_from:
                    return None
                return cast.dtype
        return None

    def drop_for(self, hf_name: str) -> Drop | None:
        for drop in self.drops:
            if drop.hf.match(hf_name) is not None:
                return drop
        return None

    def rename_module(self, hf_module: str) -> str:
        """Rename a module path (e.g. an `exclude_modules` entry) by renaming `<module>.weight`."""
        renamed = self.to_scheme(hf_module + ".weight")
        if renamed is None or not renamed.endswith(".weight"):
            raise NemoconvError(f"scheme {self.name}: no rule renames module {hf_module!r}")
        return renamed[: -len(".weight")]
