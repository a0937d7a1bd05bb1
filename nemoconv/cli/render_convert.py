"""`nemoconv convert`'s summary: what was (or would be) written, and every lossy step."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from nemoconv.cli.render import human_bytes


def render_conversion(manifest: dict, dst: Path, dry_run: bool, out: Console) -> None:
    verb = "plan" if dry_run else "wrote"
    out.print(f"{verb}: {manifest['scheme_from']} → {manifest['scheme_to']}: {manifest['tensors_in']} tensors "
              f"({human_bytes(manifest['bytes_in'])}) → {manifest['tensors_out']} tensors "
              f"({human_bytes(manifest['bytes_out'])})" + ("" if dry_run else f" in {dst}"))
    if manifest["lossless"]:
        out.print("[green]lossless[/green]: round trips are bit-exact")
    else:
        out.print(f"[yellow]{len(manifest['lossy_steps'])} lossy step(s)[/yellow]:")
        for step in manifest["lossy_steps"]:
            out.print(f"  {step['step']:<5} {step['tensor']}: {step['detail']}", markup=False, highlight=False,
                      soft_wrap=True)
    for warning in manifest.get("warnings", []):
        out.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if manifest["files_not_carried"]:
        out.print("[yellow]not carried[/yellow]: " + escape("; ".join(
            f"{name} ({why})" for name, why in manifest["files_not_carried"].items())), highlight=False, soft_wrap=True)
    if dry_run:
        out.print("dry run: nothing written")
