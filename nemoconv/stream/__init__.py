"""Layer 4 — the tensor stream: the generator that renames/splits/fuses every source tensor (`pipeline`, with
`items`, `tensor_ops`, `network`), its plan on meta tensors (`plan`), and the one writer of convert and quantize
(`writer`: shards from `shards`, side files, manifest, `card`, inside an atomic output directory from `output`)."""
