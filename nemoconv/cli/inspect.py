"""`nemoconv inspect SRC [--json]`."""

from __future__ import annotations

import json
import sys

import typer

from nemoconv.cli.choices import FromScheme
from nemoconv.cli.options import options_of
from nemoconv.cli.render import stdout_console
from nemoconv.cli.render_inspect import render_inspect
from nemoconv.commands.inspect import inspect_checkpoint
from nemoconv.errors import NemoconvError


def inspect(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="Checkpoint directory or Hub repo id (org/name[@revision])."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    from_: FromScheme = typer.Option("auto", "--from", help="Naming scheme of SRC (auto-detected)."),
):
    """Show a checkpoint's scheme, layer layout, dimensions, parameters, dtypes, quantization and shards, and
    check every tensor against config.json (exit 2 naming the first problem, as convert and verify would)."""
    out = stdout_console(options_of(ctx))
    info = inspect_checkpoint(src, scheme=from_.value)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render_inspect(info, out)
    for warning in info["warnings"]:
        if as_json:
            print(f"warning: {warning}", file=sys.stderr)
        else:
            out.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if not info["check"]["ok"]:  # shown, then exit 2: the checkpoint cannot be converted or verified as it is
        raise NemoconvError(f"{info['path']}: {info['check']['error']}")
