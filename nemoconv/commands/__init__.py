"""Layer 8 — the commands (convert, quantize, verify, inspect, upload, demo) as Python functions; the CLI and
the package facade call these."""
