"""Who observes the input amax of the targeted linears during calibration: nemoconv's own forward pre-hooks
(running max), or nvidia-modelopt 0.47's max calibration (`mtq.quantize` with FP8_DEFAULT_CFG) when it imports.
Both return {HF module: amax} per layer; `pick_observer` chooses (--calibrator, NEMOCONV_CALIBRATOR)."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable

import torch
from torch import nn

from nemoconv import settings
from nemoconv.errors import NemoconvError
from nemoconv.quant.fp8 import abs_max


def modelopt_status() -> tuple[object | None, str]:
    """(modelopt.torch.quantization, its version) when nvidia-modelopt 0.47 imports, else (None, why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about untested transformers versions
            import modelopt
            import modelopt.torch.quantization as mtq
    except Exception as exc:  # noqa: BLE001 - ImportError or anything its import raises
        return None, f"not importable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    version = getattr(modelopt, "__version__", "?")
    if not version.startswith("0.47"):
        return None, f"version {version} installed (0.47 is the one we match)"
    return mtq, version


class _Observer:
    """Running amax at the inputs of one layer's targeted linears (the builtin way)."""

    name = "builtin"

    def __init__(self):
        self.handles = []
        self.amax: dict[str, torch.Tensor] = {}

    def attach(self, block: nn.Module, targets: dict[str, str]) -> nn.Module:
        for rel, hf in targets.items():
            self.handles.append(block.get_submodule(rel).register_forward_pre_hook(self._hook(hf)))
        return block

    def _hook(self, hf: str):
        def hook(module, args):
            x = args[0]
            if x.numel():
                a = abs_max(x.detach())
                prev = self.amax.get(hf)
                self.amax[hf] = a if prev is None else torch.maximum(prev, a)
        return hook

    def calibrate(self, block: nn.Module, targets: dict[str, str], loop: Callable[[nn.Module], None]) -> dict:
        self.attach(block, targets)
        try:
            loop(block)
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()
        found, self.amax = self.amax, {}
        return {hf: float(a.float()) for hf, a in found.items()}


class _ModelOptObserver:
    """ModelOpt's max calibration on one layer: targeted linears become plain nn.Linear (the only
    modules mtq converts here), `mtq.quantize(layer, FP8_DEFAULT_CFG, loop)` runs the loop with its
    quantizers in calibration mode, and each input_quantizer's amax is read back."""

    name = "modelopt"

    def __init__(self, mtq):
        self.mtq = mtq

    def calibrate(self, block: nn.Module, targets: dict[str, str], loop: Callable[[nn.Module], None]) -> dict:
        for rel in targets:
            parent_name, _, child = rel.rpartition(".")
            parent = block.get_submodule(parent_name)
            old = getattr(parent, child)
            plain = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
            plain.weight, plain.bias = old.weight, old.bias
            setattr(parent, child, plain)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block = self.mtq.quantize(block, self.mtq.FP8_DEFAULT_CFG, loop)
        found = {}
        for rel, hf in targets.items():
            amax = getattr(block.get_submodule(rel).input_quantizer, "amax", None)
            if amax is not None:
                found[hf] = float(amax.float().reshape(-1).max())
        return found


def pick_observer(calibrator: str):
    if calibrator == "auto":  # NEMOCONV_CALIBRATOR=builtin|modelopt chooses where the CLI has no flag for it
        calibrator = settings.current().calibrator
    if calibrator not in ("auto", "modelopt", "builtin"):
        raise NemoconvError(f"calibrator must be auto, modelopt or builtin, got {calibrator!r}")
    if calibrator == "builtin":
        return _Observer(), "nemoconv (forward pre-hooks, running max)"
    mtq, version = modelopt_status()
    if mtq is None:
        if calibrator == "modelopt":
            raise NemoconvError(f"calibrator 'modelopt' requested but nvidia-modelopt is {version}")
        return _Observer(), f"nemoconv (forward pre-hooks, running max; nvidia-modelopt {version})"
    return _ModelOptObserver(mtq), f"nvidia-modelopt {version} (mtq.quantize, FP8_DEFAULT_CFG, max)"
