"""The prefill's matrix products on Hopper: a persistent Triton GEMM fed by TMA (imported only where Triton is;
`triton_ops` re-exports `gemm`).

y = x Wᵀ for x [m, k] and an nn.Linear weight W [n, k], both bf16 or fp16, optionally with relu² of the rounded
result in the epilogue (the MLP's up_proj at prefill: no relu² pass over an [m, inner] matrix). One program per SM
walks output tiles of 128 × 256 in grouped order (8 row tiles share a column band, so W's band stays in L2), each
tile's k loop pipelined through TMA loads (3 stages) into wgmma. Arithmetic: exact products, float32 sums in
k order, one rounding to the output dtype; a row's result does not depend on the other rows (no split of k), which
a prefix-cache hit relies on. On an H200 cuBLAS gave the same bits on the 8B layout's products at 2048 and 4352 rows
(not at a few hundred rows with k = 21504, where it splits k). `gemm_ok` says where it applies (sm90, 16-byte
aligned rows, Triton with host tensor descriptors, a product that fills the GPU); elsewhere the caller uses cuBLAS.

Why ours and not cuBLAS (H200, 8B layout, 2048-token prefill): alone, each product shape takes the same time as
cuBLAS's within ~3 % either way; inside the model's graphed prefill the products took 38.4 ms against cuBLAS's
40.6 (torch.profiler, same process), and relu² in the epilogue saves a 1.0 ms pass. Measured and not taken: warp
specialization of the tile loop (Triton 3.6), the epilogue stored in two halves, 4 stages (with those halves),
128 × 128 tiles: equal or slower per shape, within the card's ±3 % from run to run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:                     # a Triton before host TMA descriptors: the products stay on cuBLAS
    TensorDescriptor = None
AVAILABLE = TensorDescriptor is not None

BM, BN, BK = 128, 256, 64
GROUP_M = 8
WARPS, STAGES = 8, 3
_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _tile_of(tile, tiles_m, tiles_n, GROUP: tl.constexpr):
    """Grouped order: GROUP row tiles walk one column band before the next band starts."""
    per_group = GROUP * tiles_n
    first_m = (tile // per_group) * GROUP
    rows = tl.minimum(tiles_m - first_m, GROUP)
    within = tile % per_group
    return first_m + within % rows, within // rows


@triton.jit(do_not_specialize=["M", "N", "K", "NUM_PROGRAMS"])    # one compiled kernel for every shape
def _gemm_kernel(x_desc, w_desc, y_desc, M, N, K, NUM_PROGRAMS, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, GROUP: tl.constexpr, RELU2: tl.constexpr):
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    k_steps = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
        pm, pn = _tile_of(tile, tiles_m, tiles_n, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ks in range(k_steps):
            x = x_desc.load([pm * BM, ks * BK])                  # TMA zero-fills past m and k
            w = w_desc.load([pn * BN, ks * BK])
            acc = tl.dot(x, w.T, acc)
        out = acc.to(y_desc.dtype)
        if RELU2:                                                # relu² of the rounded product, rounded again
            r = tl.maximum(out.to(tl.float32), 0.0)
            out = (r * r).to(y_desc.dtype)
        y_desc.store([pm * BM, pn * BN], out)                    # TMA clips the tile at m and n


@functools.lru_cache(maxsize=None)
def _programs(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def gemm_ok(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x2 [m, k] · weightᵀ runs here: CUDA sm90, both bf16 or both fp16, rows contiguous and 16-byte aligned
    (TMA's rule for strides and bases), and enough output tiles to give every SM one (`fills_the_gpu`)."""
    if not AVAILABLE or not x2.is_cuda or x2.dtype not in _DTYPES or weight.dtype != x2.dtype:
        return False
    if x2.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x2.shape[1] or weight.shape[0] % 8:
        return False
    aligned = all(t.stride(-1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in (x2, weight))
    return aligned and _device_ok(x2.get_device()) and fills_the_gpu(x2.shape[0], weight.shape[0], x2.get_device())


def fills_the_gpu(m: int, n: int, index: int) -> bool:
    """At least one full tile of rows and one output tile per SM. Fewer (a decode batch, a short prefill tail, a
    narrow product of a few hundred rows) stay on cuBLAS, which splits the reduction or picks smaller tiles there:
    at 64 rows of the 8B layout this kernel took the b64 decode step from 7.7k to 4.5k tokens/s on an H200."""
    return m >= BM and _tiles(m, n) >= _programs(index)


def _tiles(m: int, n: int) -> int:
    return triton.cdiv(m, BM) * triton.cdiv(n, BN)


def gemm(x2: torch.Tensor, weight: torch.Tensor, relu2: bool = False) -> torch.Tensor:
    """x2 [m, k] · weight [n, k]ᵀ → [m, n] in x2's dtype (relu2: relu² of the rounded product). `gemm_ok` first."""
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    programs = min(_programs(x2.get_device()), _tiles(m, n))
    _gemm_kernel[(programs,)](
        TensorDescriptor.from_tensor(x2, [BM, BK]), TensorDescriptor.from_tensor(weight, [BN, BK]),
        TensorDescriptor.from_tensor(y, [BM, BN]), m, n, k, NUM_PROGRAMS=programs, BM=BM, BN=BN, BK=BK,
        GROUP=GROUP_M, RELU2=relu2, num_warps=WARPS, num_stages=STAGES)
    return y
