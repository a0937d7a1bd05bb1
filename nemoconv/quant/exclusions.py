"""The shortest exclusion list that every engine resolves to exactly the unquantized modules (HF names).

Listing every unquantized module one by one is exact but long: a Nemotron-3-Nano-like MoE left with bf16
experts names ~6,000 modules. Instead, per mixer:
    all of its modules unquantized          → `backbone.layers.{i}.mixer.*`
    all of its routed experts unquantized   → `backbone.layers.{i}.mixer.experts*`, the rest by exact name
    otherwise                               → exact names
and the MTP head, when every MTP module is unquantized, → `mtp.*`; other modules by exact name.

Why these forms hold for each engine's matching (tests/test_exclusion_matching.py replays them):
- vLLM (ModelOpt config): excluded if the name is in the list, or an entry is a substring of it, or it fnmatches
  an entry; its fused MoE (`...mixer.experts`) is excluded if it is a substring of an entry naming experts; an
  entry `X*` (not `X.*`) is first split into `X` and `X.*`. `.mixer.*` / `.experts*` stop at the layer index
  (`layers.1.mixer` is no substring of `layers.11.mixer`), so no other layer is caught.
- TensorRT-LLM: fnmatch of the module name (newer versions also of its ancestors); `experts*` also matches the
  fused `experts` module itself, `mixer.*` every module of the mixer (fused qkv_proj included).
- MAX: reads FP8 from the weight_scale tensors; the list must only not contradict them.
"""

from __future__ import annotations

import re

_MIXER = re.compile(r"^(backbone\.layers\.\d+\.mixer)\.(.+)$")
_EXPERT = re.compile(r"^experts\.\d+\.")
CONV1D = "backbone.layers.*.mixer.conv1d"


def compact_exclusions(all_modules: list[str], unquantized: list[str]) -> list[str]:
    """Entries (exact names and patterns) covering exactly `unquantized` among `all_modules` (HF names)."""
    keep = set(unquantized)
    groups: dict[str, list[str]] = {}   # pattern → the modules it stands for
    for name in all_modules:
        m = _MIXER.match(name)
        if m:
            groups.setdefault(m.group(1) + ".*", []).append(name)
            if _EXPERT.match(m.group(2)):
                groups.setdefault(m.group(1) + ".experts*", []).append(name)
            if m.group(2) == "conv1d":
                groups.setdefault(CONV1D, []).append(name)
        elif name.startswith("mtp."):
            groups.setdefault("mtp.*", []).append(name)
    whole = {p for p, members in groups.items() if all(n in keep for n in members)}
    entries: list[str] = []
    for name in all_modules:
        if name not in keep:
            continue
        m = _MIXER.match(name)
        candidates = []
        if m:
            candidates = [m.group(1) + ".*", m.group(1) + ".experts*" if _EXPERT.match(m.group(2)) else None,
                          CONV1D if m.group(2) == "conv1d" else None]
        elif name.startswith("mtp."):
            candidates = ["mtp.*"]
        entry = next((c for c in candidates if c in whole), name)
        if entry not in entries:
            entries.append(entry)
    return entries
