"""`nemoconv demo`: a tiny Nemotron-H checkpoint built locally, taken through the whole workflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .checkpoint import open_checkpoint
from .convert import convert
from .demo_checkpoint import PRESETS, write_tiny_checkpoint
from .errors import NemoconvError, VerificationFailed
from .output import check_output_free


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def run_demo(directory: str | Path | None = None, kind: str = "moe", console=None, overwrite: bool = False) -> dict:
    """Build → convert through every scheme → back to hf (bit-exact check) → verify → quantize → verify.

    `overwrite`: DIR may hold an earlier demo; the demo's own outputs in it are replaced, nothing else is touched."""
    if kind not in PRESETS:
        raise NemoconvError(f"--kind must be one of {', '.join(PRESETS)}, got {kind!r}")
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="nemoconv-demo-"))
    check_output_free(root, overwrite=overwrite)
    root.mkdir(parents=True, exist_ok=True)
    src = write_tiny_checkpoint(root / "source-hf", kind, dtype=torch.bfloat16, trained_like=True)
    _say(console, f"[bold]built[/bold] tiny {kind} Nemotron-H checkpoint (bf16, pattern "
                  f"{open_checkpoint(src).spec.layer_codes}) in {src}")
    results: dict = {"directory": str(root), "steps": []}

    for to in ("nemo", "max"):
        manifest = convert(src, root / f"converted-{to}", to=to, overwrite=overwrite)
        results["steps"].append({"step": f"convert hf→{to}", "tensors": manifest["tensors_out"],
                                 "lossless": manifest["lossless"]})
        _say(console, f"convert hf → {to:<4}: {manifest['tensors_in']} → {manifest['tensors_out']} tensors, "
                      f"{'lossless' if manifest['lossless'] else 'lossy'}")
    manifest = convert(root / "converted-nemo", root / "nemo-to-max", to="max", overwrite=overwrite)
    _say(console, f"convert nemo → max: {manifest['tensors_out']} tensors")
    convert(root / "nemo-to-max", root / "round-trip-hf", to="hf", overwrite=overwrite)
    same = _same_bytes(src, root / "round-trip-hf")
    results["steps"].append({"step": "round trip hf→nemo→max→hf bit-exact", "ok": same})
    _say(console, f"round trip hf → nemo → max → hf: {'[green]bit-exact[/green]' if same else '[red]DIFFERS[/red]'}")
    if not same:
        raise VerificationFailed("demo round trip is not bit-exact")

    from .verify import verify

    for to in ("nemo", "max"):
        # the max candidate is also generated with prefix caching (memory and state modes)
        report = verify(src, root / f"converted-{to}", num_prompts=2, seq_len=16, max_new_tokens=8, device="cpu",
                        profile="auto", report_path=root / f"verify-{to}.json", prefix_cache=to == "max")
        results["steps"].append({"step": f"verify hf vs {to}", "passed": report.passed})
        extra = ""
        if report.prefix_cache is not None:
            st = report.prefix_cache["modes"]["state"]["stats"]
            extra = f", prefix cache: same tokens, {st['tokens_skipped']} prompt tokens skipped in state mode"
        _say(console, f"verify hf vs {to:<4}: {'[green]PASS[/green]' if report.passed else '[red]FAIL[/red]'} "
                      f"(profile {report.profile}{extra})")
        if not report.passed:
            raise VerificationFailed(report.failure_line())

    from .quantize import quantize

    quantize(src, root / "fp8", preset="default", calib_samples=8, calib_seq_len=32, device="cpu", quiet=True,
             overwrite=overwrite)
    report = verify(src, root / "fp8", num_prompts=2, seq_len=16, max_new_tokens=8, device="cpu", profile="fp8",
                    report_path=root / "verify-fp8.json")
    results["steps"].append({"step": "quantize FP8 + verify", "passed": report.passed})
    _say(console, f"quantize FP8 (default preset) + verify: {'[green]PASS[/green]' if report.passed else '[red]FAIL[/red]'}")
    if not report.passed:
        raise VerificationFailed(report.failure_line())
    _say(console, f"[bold green]demo complete[/bold green]: outputs in {root}")
    return results


def _same_bytes(a: Path, b: Path) -> bool:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.entries) != set(cb.entries):
        return False
    from .safetensors_io import TensorReader

    with TensorReader() as reader:
        for name, entry in ca.entries.items():
            other = cb.entries[name]
            if entry.dtype != other.dtype or entry.shape != other.shape:
                return False
            if not torch.equal(reader.read(entry).view(-1).view(torch.uint8), reader.read(other).view(-1).view(torch.uint8)):
                return False
    return True
