"""`nemoconv demo [DIR]`: the whole workflow on the small trained model that ships with nemoconv."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nemoconv.cli.options import options_of
from nemoconv.cli.render import stdout_console
from nemoconv.cli.render_demo import printer


def demo(
    ctx: typer.Context,
    directory: Optional[Path] = typer.Argument(None, metavar="[DIR]", help="Work directory (default: a temp dir)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse a non-empty DIR: the demo's own outputs in it "
                                   "are replaced; nothing else in it is touched."),
):
    """Run the whole workflow on the small trained Nemotron-H that ships with nemoconv (no download)."""
    from nemoconv.commands.demo import run_demo  # torch: only when the command runs

    options = options_of(ctx)
    run_demo(directory, on_step=None if options.quiet else printer(stdout_console(options)), overwrite=overwrite)
