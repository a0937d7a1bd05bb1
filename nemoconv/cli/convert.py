"""`nemoconv convert SRC OUT --to SCHEME`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nemoconv.cli.choices import DType, FromScheme, Scheme
from nemoconv.cli.options import options_of
from nemoconv.cli.render import stdout_console
from nemoconv.cli.render_convert import render_conversion
from nemoconv.commands.convert import convert as do_convert


def convert(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="Source checkpoint directory or Hub repo id."),
    dst: Path = typer.Argument(..., metavar="OUT", help="Output directory (written atomically)."),
    to: Scheme = typer.Option(..., "--to", help="Target naming scheme."),
    from_: FromScheme = typer.Option("auto", "--from", help="Source scheme (auto-detected)."),
    dtype: DType = typer.Option(DType.keep, "--dtype", help="Cast floating-point weights (FP8 and scales kept)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard, e.g. 5GB, 500MB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT (only once complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Discard what an interrupted run left and start over."),
    iteration: Optional[int] = typer.Option(None, "--iteration", min=0,
                                            help="Megatron source: which iter_* checkpoint (default: the latest)."),
    config_file: Optional[Path] = typer.Option(None, "--config",
                                               help="Megatron source: its HF config.json (when it carries none)."),
):
    """Convert a checkpoint between naming schemes (mappings/*.toml), bit-exactly where lossless.

    Every tensor is checked against config.json before anything is written; every source tensor is
    written or reported as dropped; lossy steps are listed in the summary and nemoconv-manifest.json.
    """
    options = options_of(ctx)
    with options.progress(f"convert → {to.value}") as progress:
        manifest = do_convert(src, dst, to=to.value, from_=from_.value, dtype=dtype.value,
                              max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run,
                              progress=progress, iteration=iteration, config_file=config_file,
                              resume=not no_resume)
    if options.quiet and not dry_run:
        return
    render_conversion(manifest, dst, dry_run, stdout_console(options))
