"""Layer 3 — a checkpoint as a whole: config + shard headers + index, its scheme detected, the files that travel
with it (side files), Hub fetch, and Megatron dist checkpoints opened as the same `Checkpoint`."""
