"""`nemoconv demo`: the small trained Nemotron-H that ships with nemoconv, taken through the whole workflow.

The FP8 output is verified at the CLI's default settings (4 built-in prompts × 64 tokens, 16 greedy tokens, the
fp8 profile's thresholds), so its PASS is what `nemoconv verify DIR/source-hf DIR/fp8` says. The lossless
conversions are verified with the exact profile (identical logits) on fewer, shorter prompts.

Each step, as it completes, goes to `on_step` as a dict with an "event" key (the CLI renders it:
nemoconv.cli.render_demo); the returned dict sums the run up."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.commands.convert import convert
from nemoconv.commands.quantize import quantize
from nemoconv.commands.verify import verify
from nemoconv.data import tiny_trained_checkpoint
from nemoconv.errors import VerificationFailed
from nemoconv.storage.safetensors_io import TensorReader
from nemoconv.stream.output import check_output_free

# quantize's calibration, shortened so the demo stays quick on a CPU (16 × 256 tokens; the builtin observers
# give ModelOpt's amax values, several times faster on a CPU); verify keeps all its defaults
DEMO_CALIBRATION = dict(calib_samples=16, calib_seq_len=256, calibrator="builtin")
CONVERSION_VERIFY = dict(num_prompts=2, seq_len=32, max_new_tokens=8)


def run_demo(directory: str | Path | None = None, on_step: Optional[Callable[[dict], None]] = None,
             overwrite: bool = False) -> dict:
    """Copy the shipped model → convert through every scheme → back to hf (bit-exact check) → verify →
    quantize → verify; the FP8 output is verified at the CLI's defaults.

    `overwrite`: DIR may hold an earlier demo; the demo's own outputs in it are replaced, nothing else is touched."""
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="nemoconv-demo-"))
    check_output_free(root, overwrite=overwrite)
    root.mkdir(parents=True, exist_ok=True)
    tell = on_step or (lambda step: None)
    src = _copy_shipped_model(root / "source-hf")
    tell({"event": "copied", "path": str(src), "pattern": open_checkpoint(src).spec.layer_codes})
    results: dict = {"directory": str(root), "steps": []}

    for to in ("nemo", "max"):
        manifest = convert(src, root / f"converted-{to}", to=to, overwrite=overwrite)
        results["steps"].append({"step": f"convert hf→{to}", "tensors": manifest["tensors_out"],
                                 "lossless": manifest["lossless"]})
        tell({"event": "converted", "from": "hf", "to": to, "tensors_in": manifest["tensors_in"],
              "tensors_out": manifest["tensors_out"], "lossless": manifest["lossless"]})
    manifest = convert(root / "converted-nemo", root / "nemo-to-max", to="max", overwrite=overwrite)
    tell({"event": "chained", "from": "nemo", "to": "max", "tensors_out": manifest["tensors_out"]})
    convert(root / "nemo-to-max", root / "round-trip-hf", to="hf", overwrite=overwrite)
    same = _same_bytes(src, root / "round-trip-hf")
    results["steps"].append({"step": "round trip hf→nemo→max→hf bit-exact", "ok": same})
    tell({"event": "round_trip", "path": ["hf", "nemo", "max", "hf"], "bit_exact": same})
    if not same:
        raise VerificationFailed("demo round trip is not bit-exact")

    for to in ("nemo", "max"):
        # lossless conversions must give identical logits (profile exact): fewer, shorter prompts than
        # verify's defaults show that as well and keep the demo quick on a CPU
        report = verify(src, root / f"converted-{to}", device="cpu", report_path=root / f"verify-{to}.json",
                        **CONVERSION_VERIFY)
        results["steps"].append({"step": f"verify hf vs {to}", "passed": report.passed})
        tell({"event": "verified", "reference": "hf", "candidate": to, "passed": report.passed,
              "profile": report.profile, **CONVERSION_VERIFY})
        if not report.passed:
            raise VerificationFailed(report.failure_line())

    q = quantize(src, root / "fp8", preset="default", device="cpu", quiet=True, overwrite=overwrite,
                 **DEMO_CALIBRATION)
    report = verify(src, root / "fp8", device="cpu", report_path=root / "verify-fp8.json")
    results["steps"].append({"step": "quantize FP8 + verify", "passed": report.passed,
                             "calibrator": q["quantization"]["calibration"]["calibrator"]})
    o = report.overall
    tell({"event": "quantized", "preset": "default", "linears": len(q["quantization"]["targets"]),
          "passed": report.passed, "profile": report.profile, "cosine_mean": o["cosine_mean"],
          "kl_mean": o["kl_mean"], "top1_agreement": o["top1_agreement"],
          "calibrator": q["quantization"]["calibration"]["calibrator"]})
    if not report.passed:
        raise VerificationFailed(report.failure_line())
    tell({"event": "complete", "directory": str(root)})
    return results


def _copy_shipped_model(dst: Path) -> Path:
    """The shipped checkpoint, copied so the demo's steps never write next to the package's data."""
    if dst.exists():  # an earlier demo's copy (--overwrite)
        shutil.rmtree(dst)
    shutil.copytree(tiny_trained_checkpoint(), dst)
    for f in dst.iterdir():  # package data may be read-only; the copy is the user's
        f.chmod(0o644)
    return dst


def _same_bytes(a: Path, b: Path) -> bool:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.entries) != set(cb.entries):
        return False
    with TensorReader() as reader:
        for name, entry in ca.entries.items():
            other = cb.entries[name]
            if entry.dtype != other.dtype or entry.shape != other.shape:
                return False
            if not torch.equal(reader.read(entry).view(-1).view(torch.uint8), reader.read(other).view(-1).view(torch.uint8)):
                return False
    return True
