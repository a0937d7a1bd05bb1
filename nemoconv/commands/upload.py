"""`nemoconv upload`: publish a verified checkpoint to the Hugging Face Hub.

The plan (`plan_upload`) is the checkpoint's own files and a commit message that states the verify verdict;
a checkpoint whose verify record does not bind a PASS to the files on disk now is refused unless `force`
(nemoconv.verification.record). Fetching from the Hub is storage's job (nemoconv.checkpoint.hub).
"""

from __future__ import annotations

import glob
from pathlib import Path

from nemoconv.checkpoint.hub import hub_error
from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.checkpoint.sidefiles import upload_files
from nemoconv.errors import NemoconvError
from nemoconv.verification.record import check_record
from nemoconv.version import __version__

# Above this, `upload` sends the folder with huggingface_hub's streamed folder upload: resumable (run the same
# command again after an interruption: committed files are skipped, uploaded chunks deduplicated), with its own
# progress bars, committed in several parts when the Hub's limits require it. Below it: one commit.
LARGE_UPLOAD_BYTES = 2 * 1000**3


def plan_upload(directory: Path, repo_id: str, revision: str | None, force: bool) -> dict:
    """What `upload` would send: the files, their sizes, the commit message. Refuses a checkpoint whose verify
    record does not bind a PASS to the files on disk now (nemoconv.verification.record), unless `force`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NemoconvError(f"{directory}: no such checkpoint directory")
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise NemoconvError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    ck = open_checkpoint(directory)
    verdict = check_record(directory, ck, force)
    files = upload_files(ck)  # the checkpoint's own files only: never a link out, a pickle or a stray file
    quantized = ck.quantization() is not None
    what = f"{ck.scheme} scheme" + (", FP8" if quantized else "")
    status = verdict.clause
    if verdict.forced:
        status += f"; uploaded with --force despite: {'; '.join(verdict.forced)}"
    return {
        "repo_id": repo_id,
        "revision": revision,
        "files": [{"path": p.name, "bytes": p.stat().st_size} for p in files],
        "commit_message": f"Upload Nemotron-H checkpoint ({what}) with nemoconv {__version__}: {status}",
    }


def upload(directory, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
           force: bool = False, api=None, quiet: bool = False) -> dict:
    """Create the repo if needed and upload DIR: one commit, or for a large checkpoint huggingface_hub's
    resumable folder upload of exactly the planned files."""
    plan = plan_upload(Path(directory), repo_id, revision, force)
    total = sum(f["bytes"] for f in plan["files"])
    plan["method"] = "resumable folder upload" if total > LARGE_UPLOAD_BYTES else "single commit"
    if dry_run:
        return plan
    from huggingface_hub import HfApi  # only when something is sent: its import is slow

    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if total > LARGE_UPLOAD_BYTES:
            info = _upload_folder(api, Path(directory), plan, revision, quiet)
        else:
            info = _upload_commit(api, Path(directory), plan, revision)
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(exc, f"upload to {repo_id}") from None
    plan["commit_url"] = getattr(info, "commit_url", None)
    return plan


def _upload_commit(api, directory: Path, plan: dict, revision: str | None):
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(directory / f["path"]))
                  for f in plan["files"]]
    return api.create_commit(plan["repo_id"], operations=operations, commit_message=plan["commit_message"],
                             revision=revision)


def _upload_folder(api, directory: Path, plan: dict, revision: str | None, quiet: bool):
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    # exactly the planned files: each name as a pattern that matches only itself
    allow = [glob.escape(f["path"]) for f in plan["files"]]
    return api.upload_folder(repo_id=plan["repo_id"], folder_path=str(directory), allow_patterns=allow,
                             commit_message=plan["commit_message"], revision=revision)
