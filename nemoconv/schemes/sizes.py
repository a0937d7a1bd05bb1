"""Config arithmetic in the mapping files: a rule's `sizes`, `size`, `count`, `groups` and an index's SIZE are
products of `ModelSpec` integers and literals (`num_attention_heads*head_dim`), evaluated per checkpoint."""

from __future__ import annotations

from dataclasses import fields
from functools import lru_cache

from nemoconv.storage.model_spec import ModelSpec

# Config values the rules use that ModelSpec does not hold as attributes.
_DERIVED = {"mtp_layers_per_depth": lambda spec: len(spec.mtp_codes)}


@lru_cache(maxsize=1)
def config_names() -> frozenset[str]:
    """The names a rule may use: ModelSpec's integer fields and properties, and the derived values above."""
    ints = {f.name for f in fields(ModelSpec) if f.type == "int"}
    ints |= {name for name, value in vars(ModelSpec).items()
             if isinstance(value, property) and value.fget.__annotations__.get("return") == "int"}
    return frozenset(ints | set(_DERIVED))


def check_expression(expr: str) -> str:
    """`expr` if every `*`-separated term is a literal or a known config name; ValueError naming the term."""
    for term in expr.split("*"):
        term = term.strip()
        if not term.isdigit() and term not in config_names():
            raise ValueError(f"{term!r} in {expr!r} is neither an integer nor a config value "
                             f"(known: {', '.join(sorted(config_names()))})")
    return expr


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
