"""Layer 7 — the parts of `verify`: prompts and tokenizers, logit metrics, the verify record."""
