"""Module lists (`exclude_modules`, `ignore`) renamed between schemes by the same rules as the tensors.

A module is renamed as its `<module>.weight` tensor is: into `hf` by the source scheme, out of `hf` by the
target. A fused module stands for its members (MAX's `qkv_proj` → q/k/v), and members that the target
fuses become the fused module when the output holds it (vLLM's lesson: exclusions left in the old names
quietly quantize what they meant to exclude).
"""

from __future__ import annotations

from nemoconv.schemes.rules import Scheme
from nemoconv.untrusted import want_str

_WEIGHT = ".weight"


def _hf_members(module: str, src: Scheme) -> list[str] | None:
    """The hf modules a source-scheme module stands for; None when no rule names it as a tensor's module."""
    hf = src.hf_name(module + _WEIGHT)
    if hf is None or not hf.endswith(_WEIGHT):
        return None
    for fuse in src.fuses:  # a fused source module stands for its members
        fields = fuse.to.match(hf)
        if fields is not None:
            return [t.format(fields)[: -len(_WEIGHT)] for t in fuse.hf]
    return [hf[: -len(_WEIGHT)]]


def _in_target(hf_module: str, dst: Scheme, out_names: set[str]) -> str:
    """`hf_module` in `dst`: the fused module holding it when the output has one, else its own name."""
    for fuse in dst.fuses:
        for member in fuse.hf:
            fields = member.match(hf_module + _WEIGHT)
            fused = dst.to_scheme(fuse.to.format(fields)) if fields is not None else None
            if fused is not None and fused in out_names:
                return fused[: -len(_WEIGHT)]
    return dst.rename_module(hf_module)


def rename_modules(modules: list[str], src: Scheme, dst: Scheme, out_names: set[str]) -> list[str]:
    """Rename module entries from `src` into `dst` (`out_names`: the tensors the output holds); a pattern or a
    name no rule knows is kept as written; duplicates (three members of one fused module) are kept once."""
    renamed: list[str] = []
    for module in modules:
        members = _hf_members(want_str(module, "a quantization exclusion list entry"), src)
        if members is None:
            renamed.append(module)  # a pattern or a non-tensor name: kept as written
            continue
        for hf_module in members:
            target = _in_target(hf_module, dst, out_names)
            if target not in renamed:
                renamed.append(target)
    return renamed
