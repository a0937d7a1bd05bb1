"""Layer 2 — naming schemes: `mappings/*.toml` loaded into rule objects (rename, split, fuse, cast, drop)."""
