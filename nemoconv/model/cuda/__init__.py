"""The CUDA runtime of the built-in model: Triton / mamba-ssm kernel dispatch, CUDA graphs, warm-up."""
