"""Layer 4 — the tensor stream: one generator that renames/splits/fuses every source tensor (`pipeline`), and
the writer that publishes shards, index, manifest and card atomically (`output`, `card`)."""
