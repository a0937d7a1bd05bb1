"""The pieces of `nemoconv quantize` (the entry point is `nemoconv.quantize`):

    targets    which linears a preset quantizes, --exclude globs, mixer groups, the exclusion list
    fp8        E4M3 weights and scales exactly as ModelOpt 0.47 exports them; hf_quant_config.json
    calibrate  calibration tokens and the layer-by-layer amax pass through the built-in model
"""
