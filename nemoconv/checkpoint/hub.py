"""Hugging Face Hub access: fetch only the files a checkpoint needs (config, safetensors, index, tokenizer,
quantization config), honouring HF_HOME, HF_TOKEN and HF_HUB_OFFLINE through huggingface_hub itself."""

from __future__ import annotations

from pathlib import Path

from nemoconv.errors import NemoconvError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "hf_quant_config.json",
    "nemoconv-manifest.json",
    "nemoconv-verify.json",
    "README.md",
]


def split_repo_id(text: str) -> tuple[str, str | None]:
    repo_id, _, revision = text.partition("@")
    return repo_id, (revision or None)


def hub_error(exc: Exception, what: str) -> NemoconvError:
    """One clear line for the Hub's failures, saying what really happened (huggingface_hub's error classes
    first: the Hub answers 401 for a repo that does not exist as well as for one you may not read)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    names = {c.__name__ for c in type(exc).__mro__}
    login = "log in with `hf auth login` or set HF_TOKEN"
    if "GatedRepoError" in names:
        reason = f"the repo is gated: accept its terms on its Hub page, then {login}"
    elif "RevisionNotFoundError" in names:
        reason = "no such revision (branch, tag or commit) in this repo"
    elif "RepositoryNotFoundError" in names:
        reason = f"no such repo, or a private one you cannot read (check the id; for a private repo, {login})"
    elif "OfflineModeIsEnabled" in names or ("LocalEntryNotFoundError" in names and _offline()):
        reason = "not in the local cache, and HF_HUB_OFFLINE is set"
    elif "LocalEntryNotFoundError" in names:  # (a subclass of EntryNotFoundError: asked first)
        reason = "not in the local cache, and the Hub could not be reached (check the network or a proxy)"
    elif "EntryNotFoundError" in names or status == 404:
        reason = "not found (check the repo id and revision)"
    elif status == 401:
        reason = f"not authorized ({login})"
    elif status == 403:
        reason = f"forbidden: your token may not read or write this repo ({login} with a token that can)"
    elif status == 429:
        reason = "rate limited by the Hub; try again later"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'Hub request failed'}"
    return NemoconvError(f"{what}: {reason}")


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def download_checkpoint(source: str) -> Path:
    """`org/name[@revision]` → a local snapshot directory (from the cache when present)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise NemoconvError("huggingface_hub is not installed; pass a local directory") from None
    repo_id, revision = split_repo_id(source)
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(exc, f"{source}") from None
    return Path(path)


VERIFY_REPORT = "nemoconv-verify.json"


def plan_upload(directory: Path, repo_id: str, revision: str | None, force: bool) -> dict:
    """What `upload` would send: the files, their sizes, the commit message. Refuses a checkpoint whose verify
    record does not bind a PASS to the files on disk now (nemoconv.record), unless `force`."""
    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.checkpoint.sidefiles import upload_files
    from nemoconv.verification.record import check_record

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
    from nemoconv.version import __version__

    return {
        "repo_id": repo_id,
        "revision": revision,
        "files": [{"path": p.name, "bytes": p.stat().st_size} for p in files],
        "commit_message": f"Upload Nemotron-H checkpoint ({what}) with nemoconv {__version__}: {status}",
    }


# Above this, `upload` sends the folder with huggingface_hub's streamed folder upload: resumable (run the same
# command again after an interruption: committed files are skipped, uploaded chunks deduplicated), with its own
# progress bars, committed in several parts when the Hub's limits require it. Below it: one commit.
LARGE_UPLOAD_BYTES = 2 * 1000**3


def upload(directory, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
           force: bool = False, api=None, quiet: bool = False) -> dict:
    """Create the repo if needed and upload DIR: one commit, or for a large checkpoint huggingface_hub's
    resumable folder upload of exactly the planned files."""
    plan = plan_upload(Path(directory), repo_id, revision, force)
    total = sum(f["bytes"] for f in plan["files"])
    plan["method"] = "resumable folder upload" if total > LARGE_UPLOAD_BYTES else "single commit"
    if dry_run:
        return plan
    from huggingface_hub import HfApi

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
    import glob

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    # exactly the planned files: each name as a pattern that matches only itself
    allow = [glob.escape(f["path"]) for f in plan["files"]]
    return api.upload_folder(repo_id=plan["repo_id"], folder_path=str(directory), allow_patterns=allow,
                             commit_message=plan["commit_message"], revision=revision)
