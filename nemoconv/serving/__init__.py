"""Layer 6 — many requests on the built-in model: paged KV blocks and Mamba state slots, prefix caching,
the `PrefixCachingEngine`."""
