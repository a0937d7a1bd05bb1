"""Autotuning of mamba-ssm's SSD kernels (the fallback scan only; `kernels` seeds them when it imports them).

mamba-ssm's SSD kernels are `@triton.autotune`d: on the first call for a key every config is compiled and timed
(42 configs over the 5 forward kernels). On sm90 the recorded choices in `sm90_autotune.json` go into each
autotuner's cache beforehand (`seed`), so those keys compile one config and time none. NEMOCONV_AUTOTUNE=full turns
the recorded choices off; NEMOCONV_AUTOTUNE_TABLE=file.json adds choices of your own (the format
`autotune_choices()` returns, recorded on your GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nemoconv import settings
from nemoconv.errors import NemoconvError
from nemoconv.untrusted import load_json, want_dict, want_list, want_str

# Autotune choices of mamba-ssm's SSD forward kernels recorded on sm90 (see the file's "_about"): a data file
# shipped with the package, read like any JSON nemoconv did not write.
SM90_AUTOTUNE_FILE = Path(__file__).with_name("sm90_autotune.json")

_SSD_MODULES = ("ssd_chunk_state", "ssd_state_passing", "ssd_bmm", "ssd_chunk_scan", "ssd_combined")


def _autotuners():
    """(kernel name, triton Autotuner) of mamba-ssm's SSD modules."""
    from triton.runtime.autotuner import Autotuner

    seen = set()
    for mod_name in _SSD_MODULES:
        mod = sys.modules.get("mamba_ssm.ops.triton." + mod_name)
        for obj in list(vars(mod).values()) if mod is not None else ():
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                yield getattr(obj.base_fn, "__name__", "?"), obj


def _jsonable(key) -> list:
    return [k if isinstance(k, (bool, int, float, str)) or k is None else str(k) for k in key]


def autotune_choices() -> dict[str, list]:
    """What mamba-ssm's autotuners chose so far in this process: kernel → [[key, str(config)], …]."""
    out: dict[str, list] = {}
    for name, tuner in _autotuners():
        for key, config in tuner.cache.items():
            out.setdefault(name, []).append([_jsonable(key), str(config)])
    return out


def load_autotune_table(path, what: str, wrapped: bool) -> dict[str, list]:
    """kernel → [[autotune key, str(triton.Config)], …] from a JSON file: ours (`wrapped`: the table under
    "kernels") or a user's (NEMOCONV_AUTOTUNE_TABLE: what `autotune_choices()` returns)."""
    data = want_dict(load_json(path, what), what)
    table = want_dict(data.get("kernels"), f"{what}: kernels") if wrapped else data
    out: dict[str, list] = {}
    for kernel, rows in table.items():
        for row in want_list(rows, f"{what}: {kernel}"):
            row = want_list(row, f"{what}: a choice of {kernel}")
            if len(row) != 2:
                raise NemoconvError(f"{what}: a choice of {kernel} must be [key, config], got {len(row)} items")
            out.setdefault(kernel, []).append([want_list(row[0], f"{what}: a key of {kernel}"),
                                               want_str(row[1], f"{what}: a config of {kernel}")])
    return out


def seed() -> dict:
    """Put the recorded sm90 choices (and NEMOCONV_AUTOTUNE_TABLE's) into the autotuners' caches."""
    mode = settings.current().autotune
    try:
        sm90 = mode != "full" and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    except Exception:  # noqa: BLE001 - no usable device: nothing to seed
        sm90 = False
    table = load_autotune_table(SM90_AUTOTUNE_FILE, "the recorded sm90 autotune table", wrapped=True) if sm90 else {}
    extra = settings.current().autotune_table
    if extra and mode != "full":
        for k, v in load_autotune_table(extra, f"NEMOCONV_AUTOTUNE_TABLE {extra}", wrapped=False).items():
            table.setdefault(k, []).extend(v)
    seeded = 0
    for name, tuner in _autotuners():
        by_str = {str(c): c for c in tuner.configs}
        for key, config in table.get(name, ()):
            c = by_str.get(config)
            if c is not None and len(tuner.configs) > 1:
                tuner.cache.setdefault(tuple(key), c)
                seeded += 1
    return {"mode": mode, "seeded": seeded}


state: dict = {}         # what `seed` did: {"mode", "seeded"} or {"error"} (kernels fills it)
