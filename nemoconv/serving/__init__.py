"""Many requests on the built-in model: paged KV blocks and Mamba state slots (`paged`), hybrid-aware prefix
caching (`prefix_cache`), and the `PrefixCachingEngine` (`engine`), which runs the model through its runner
(`nemoconv.model.cuda.runner`)."""

from nemoconv.serving.engine import Generation, PrefixCachingEngine, resolve_prefill_chunk

__all__ = ["Generation", "PrefixCachingEngine", "resolve_prefill_chunk"]
