"""Programmatic dependent launch (Hopper and later): a kernel starts while the one before it is still finishing.

A decode step is ~250 launches, most of them a few µs long and latency-bound (norms, conv, state update), each
waiting for the one before to end. Launched with `launch_pdl=True`, a kernel may start as soon as every block of
the kernel before has called `allow_next` (ours do so first thing); it then reads what it may read early (the
products: their first weight block) and calls `wait_previous`, which returns once the kernel before has ended and
its writes are visible. On an H200 (8B layout, graphs replayed alternately) this took the FP8 decode step at batch
1 from 2.832 to 2.727 ms, where the FP8 products are short beside the small kernels; bf16 steps at batch 1 and 8
did not change (4.221 ms without, 4.235 with; 4.880 and 4.879). Products of several rows (tensor-core tiles)
launch without it: the b8 decode step was slower with it, on the mma.sync tiles and again on the wgmma ones (the
numbers are beside `pdl` in `triton_gemv.skinny_linear`).

The rule every kernel here keeps: before `wait_previous`, only reads of parameters (weights, norm weights,
FP8 scales) and no writes. So every write, and every read of an activation, a cache or a state, happens in the
order it has without PDL, and the results are bit for bit the same. It is transitive: a kernel ends only after
its blocks waited, so after the kernel before it ended.

Only kernels captured into a CUDA graph launch this way. A graph runs after everything queued before it, so a
parameter written before (loading, quantizing in place) is visible to its early reads; eagerly, a kernel could
follow the very kernel that writes its weight, whose writes only `wait_previous` makes visible.
NEMOCONV_PDL=0 turns it off; it is also off on GPUs before sm90 and on Triton without `gdc_wait` (before 3.4).
`eager_too` is for the kernel warm-up only (`warmup`): it launches eagerly with PDL so that those variants (a
constexpr and a compile option apart) compile there and not inside the first graph capture; its results are
thrown away, so an early read there may see anything.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import triton
import triton.language as tl

from nemoconv import settings

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:                     # an older Triton: never launched with PDL, so these are never traced
    gdc_launch_dependents = gdc_wait = None
    AVAILABLE = False


@triton.jit
def allow_next(PDL: tl.constexpr):
    """Let the next kernel launch (it waits in its own `wait_previous` before touching this kernel's outputs)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """Block until the previous kernel has ended and its writes are visible."""
    if PDL:
        gdc_wait()


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


_thread = threading.local()


@contextlib.contextmanager
def eager_too():
    """Within this block (on this thread) kernels launch with PDL outside graph capture too. For the warm-up only:
    eagerly, a kernel's early reads may run before the kernel that wrote them has ended."""
    before = getattr(_thread, "eager", False)
    _thread.eager = True
    try:
        yield
    finally:
        _thread.eager = before


def enabled(t: torch.Tensor) -> bool:
    """Whether a kernel on t's device launches with PDL now: CUDA sm90+ under graph capture (or in `eager_too`),
    a Triton that has it, and NEMOCONV_PDL not 0. Asked at every launch of our kernels, so the cheap tests come
    first (an eager launch pays for the capture query, about half a µs on an H200 host)."""
    if not (AVAILABLE and settings.current().pdl and t.is_cuda):
        return False
    if not (getattr(_thread, "eager", False) or torch.cuda.is_current_stream_capturing()):
        return False
    return _device_ok(t.get_device())
