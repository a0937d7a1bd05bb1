"""The CUDA runtime of the built-in model: `kernels` (one dispatch function per operation: Triton / mamba-ssm on
CUDA, the torch reference elsewhere), `triton_ops` and `triton_decode` (our fused kernels), `triton_pdl` (how they
launch inside CUDA graphs: programmatic dependent launch), `graphs` (CUDA graph capture and replay), `warmup` (kernel
compilation in the background), the sm90 autotune table (`sm90_autotune.json`), and `runner`: the one interface
through which the model and the serving engine choose fused paths, static-shape decode and CUDA graphs."""
