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
