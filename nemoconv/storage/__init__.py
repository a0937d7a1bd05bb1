"""Layer 1 — files on disk: safe paths, safetensors headers and bytes, config.json, Megatron dist formats.

Nothing here knows naming schemes or models; everything above reads and writes through it."""
