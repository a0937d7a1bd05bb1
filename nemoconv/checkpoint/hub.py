"""Hugging Face Hub access: fetch only the files a checkpoint needs (config, safetensors, index, tokenizer,
quantization config), honouring HF_HOME, HF_TOKEN and HF_HUB_OFFLINE through huggingface_hub itself."""

from __future__ import annotations

from pathlib import Path

from nemoconv.errors import NemoconvError

# The verify record beside a checkpoint (nemoconv.verification.record writes and reads it; upload checks it).
VERIFY_REPORT = "nemoconv-verify.json"

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
    VERIFY_REPORT,
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
