"""Hugging Face Hub access: fetch only the files a checkpoint needs (config, safetensors, index, tokenizer,
quantization config), honouring HF_HOME, HF_TOKEN and HF_HUB_OFFLINE through huggingface_hub itself."""

from __future__ import annotations

from pathlib import Path

from .errors import NemoconvError

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
    """One clear line for the Hub's failures (auth, not found, rate limit, offline)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    name = type(exc).__name__
    if status == 401 or name in ("GatedRepoError",) or "401" in str(exc)[:200]:
        reason = "not authorized (set HF_TOKEN or run `huggingface-cli login`)"
    elif status == 404 or name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"):
        reason = "not found (check the repo id and revision)"
    elif status == 429:
        reason = "rate limited by the Hub; try again later"
    elif name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        reason = "not in the local cache and HF_HUB_OFFLINE is set"
    else:
        reason = f"{name}: {str(exc).splitlines()[0] if str(exc) else 'Hub request failed'}"
    return NemoconvError(f"{what}: {reason}")


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
    from .checkpoint import open_checkpoint
    from .record import check_record
    from .sidefiles import upload_files

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
    from . import __version__

    return {
        "repo_id": repo_id,
        "revision": revision,
        "files": [{"path": p.name, "bytes": p.stat().st_size} for p in files],
        "commit_message": f"Upload Nemotron-H checkpoint ({what}) with nemoconv {__version__}: {status}",
    }


def upload(directory, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
           force: bool = False, api=None) -> dict:
    """Create the repo if needed and upload DIR in one commit (huggingface_hub)."""
    plan = plan_upload(Path(directory), repo_id, revision, force)
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi()
    operations = [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(Path(directory) / f["path"]))
                  for f in plan["files"]]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=plan["commit_message"],
                                 revision=revision)
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(exc, f"upload to {repo_id}") from None
    plan["commit_url"] = getattr(info, "commit_url", None)
    return plan
