"""The built-in Nemotron-H hybrid model (docs/DESIGN.md §5).

    model = load_model(path, device="cpu", dtype=torch.float32)    # any scheme, FP8 too
    logits = model(input_ids, attention_mask=None)                  # [b, s, vocab] float32, no cache
    cache = model.new_cache(batch_size, max_length)                 # HybridCache, preallocated
    logits = model.prefill(input_ids, cache, attention_mask=None)   # [b, s, vocab]
    logits = model.decode_step(tokens, cache)                       # [b, vocab]
    tokens = model.generate(input_ids, max_new_tokens=16)           # [b, s + 16], greedy by default

Read in this order: `modeling` (the LM, its blocks), the layers it is made of (`mamba`, `attention`, `mlp`, and
`common`: the per-pass context `Pass`, norms, the attention mask), `cache` (HybridCache), `reference` (torch
definitions of the sequence ops), `fp8` (FP8 linears), `loading`. `cuda/` is the CUDA runtime: `kernels` (one
dispatch function per operation, Triton or reference), `triton_ops`, `graphs`, `warmup`, and `runner`, the one
interface through which the model and the serving engine pick fused paths and CUDA graphs. Many requests with
prefix caching are `nemoconv.serving`.
"""

from nemoconv.model.cache import HybridCache
from nemoconv.model.common import Pass
from nemoconv.model.fp8 import Linear, fp8_linear, fp8_linear_emulated, quantize_fp8
from nemoconv.model.loading import build_model, canonical_name, load_model
from nemoconv.model.modeling import Block, NemotronHLM

__all__ = ["Block", "HybridCache", "Linear", "NemotronHLM", "Pass", "build_model", "canonical_name", "fp8_linear",
           "fp8_linear_emulated", "load_model", "quantize_fp8"]
