"""`nemoconv upload DIR --repo-id ORG/NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nemoconv.cli.options import options_of
from nemoconv.cli.render import stdout_console
from nemoconv.cli.render_upload import render_upload


def upload(
    ctx: typer.Context,
    directory: Path = typer.Argument(..., metavar="DIR", help="Checkpoint directory to publish."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repo ORG/NAME (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if needed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and the commit message."),
    force: bool = typer.Option(False, "--force", help="Upload even without a passing verify report."),
):
    """Publish a checkpoint to the Hugging Face Hub (HF_TOKEN or `hf auth login` is honoured).

    Refuses a checkpoint whose nemoconv-verify.json does not bind a PASS to the files on disk, unless --force.
    Up to 2 GB: one commit. Larger: huggingface_hub's resumable folder upload (run the same command again after
    an interruption; what was committed is skipped), with its progress bars.
    """
    from nemoconv.commands.upload import upload as do_upload  # the record's hashing: only when upload runs

    options = options_of(ctx)
    plan = do_upload(directory, repo_id, private=private, revision=revision, dry_run=dry_run, force=force,
                     quiet=options.quiet)
    if not options.quiet:
        render_upload(plan, dry_run, stdout_console(options))
