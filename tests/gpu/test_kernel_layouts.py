"""The compiler's choices that decide bits: the fused RMSNorm must add its squares in the same order with and without
its FP8 output. Triton lays each row out by its widest memory access; an FP8 store of 16 bytes per thread once moved
the whole row to 16 elements per thread, so the sum of squares (and, in the last bit, y) changed with HAS_Q — the
bitwise GPU test caught it only at batches ≥ 16, where enough values sit next to a rounding boundary.

This compiles the kernel for sm90 (Triton only: no GPU needed) and compares the layout of the reduction's input.
Skips without Triton."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nemoconv.model.cuda import triton_ops  # noqa: E402

ALIGNED = ("X", "DELTA", "R_OUT", "Y", "W", "Q", "Q_SCALE", "stride_x", "stride_d", "stride_r", "stride_y",
           "stride_q", "N")     # what the JIT specializes as divisible by 16 for real tensors
SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def reduce_layout(x: str, y: str, block: int, delta: bool, has_q: bool) -> str:
    sig = {"X": f"*{x}", "DELTA": f"*{y}", "R_OUT": f"*{x}", "Y": f"*{y}", "W": f"*{y}",
           "Q": "*fp8e4nv" if has_q else f"*{x}", "Q_SCALE": "*fp32" if has_q else f"*{x}", "M": "i32",
           "stride_x": "i32", "stride_d": "i32", "stride_r": "i32", "stride_y": "i32", "stride_q": "i32", "N": "i32",
           "eps": "fp32", "HAS_DELTA": "constexpr", "HAS_Q": "constexpr", "BLOCK": "constexpr", "QVEC": "constexpr"}
    names = list(sig)
    src = ASTSource(fn=triton_ops._rmsnorm_kernel, signature=sig,
                    constexprs={"HAS_DELTA": delta, "HAS_Q": has_q, "BLOCK": block, "QVEC": 16 // SIZE[y]},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED})
    ir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": triton_ops._warps(block)}).asm["ttgir"]
    layouts = dict(re.findall(r"^(#blocked\d*) = (#ttg\.blocked<.*>)$", ir, re.M))
    operand = re.search(r'"tt\.reduce"\((%[\w.]+)\)', ir).group(1)
    used = re.search(re.escape(operand) + r" = [^\n]*: tensor<\d+xf32, (#blocked\d*)>", ir).group(1)
    return layouts[used]


@pytest.mark.parametrize("x,y", [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16"), ("fp32", "fp32")])
@pytest.mark.parametrize("block", [512, 4096])
@pytest.mark.parametrize("delta", [False, True])
def test_rmsnorm_sums_squares_in_one_order_with_and_without_fp8_output(x, y, block, delta):
    assert reduce_layout(x, y, block, delta, True) == reduce_layout(x, y, block, delta, False)
