"""The background kernel warm-up (`cuda/warmup.py`) compiles every variant of our Triton kernels that a graphed
generate of the same network then launches, the PDL variants included (`triton_pdl`: a constexpr and a compile
option apart, launched only inside graph captures), so that no compile lands inside the first capture.

Skips without CUDA or mamba-ssm's Triton kernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from cuda_cases import DEVICE, build_case, skip_reason

from nemoconv import settings
from nemoconv.model.cuda import warmup

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

PREFILL, STEPS = 24, 3


def our_kernels():
    """(name, JITFunction) of our Triton kernels."""
    from triton.runtime.jit import JITFunction

    from nemoconv.model.cuda import triton_conv, triton_decode, triton_gemv, triton_ops
    for module in (triton_conv, triton_decode, triton_gemv, triton_ops):
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction):
                yield f"{module.__name__.rsplit('.', 1)[1]}.{name}", fn


def compiled() -> dict[str, dict]:
    """Our kernels' compiled variants in this process, on this device: name → {cache key: compiled kernel}."""
    device = torch.cuda.current_device()
    return {name: dict(fn.device_caches[device][0]) for name, fn in our_kernels() if device in fn.device_caches}


def forget_compiled() -> None:
    """Drop our kernels' in-memory variants (what earlier tests compiled), so that the next launches compile again
    (quickly, from Triton's disk cache) and the hook below sees where."""
    for _, fn in our_kernels():
        fn.device_caches.clear()


@contextlib.contextmanager
def compiles_seen():
    """Every Triton compile in the block (any module's): [(kernel, whether a graph capture was under way)]."""
    from triton import knobs
    seen = []

    def hook(*, fn, **_):
        seen.append((f"{fn.module}.{fn.name}", torch.cuda.is_current_stream_capturing()))
        return None                                             # (True would skip the compile)
    before, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = before


def graphed_generate(model):
    """What generate and verify run: a prefill and decode steps, each key eager once, then captured and replayed.
    Returns the cache."""
    ids = torch.randint(3, 1024, (1, PREFILL + STEPS + 1), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cache = model.new_cache(1, PREFILL + STEPS + 1)
    with torch.inference_mode():
        for _ in range(3):                                      # eager, captured, replayed
            cache.reset()
            model.prefill(ids[:, :PREFILL], cache, last_only=True)
        for j in range(STEPS):
            model.decode_step(ids[:, PREFILL + j], cache)
    torch.cuda.synchronize()
    return cache


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_graphed_generate_after_the_warmup_compiles_nothing_inside_its_captures(kind):
    """Nothing compiles while a graph is captured. The dense network compiles nothing of ours at all after the
    warm-up; a MoE prefill runs its experts with as many rows as chose each (eager, a one-row product where one
    token did: routing decides), so there only the captures are checked."""
    model = build_case(kind, torch.bfloat16)
    assert model.cuda_graphs
    forget_compiled()
    with settings.override(pdl=True):
        warmup._exercise(model.spec, torch.device(DEVICE), torch.bfloat16, 1, PREFILL, STEPS, 0, False)
        before = compiled()
        with compiles_seen() as seen:
            cache = graphed_generate(model)
        after = compiled()
    assert cache._decoder.captures == 1
    assert [name for name, capturing in seen if capturing] == []
    if kind == "dense":
        assert cache.prefill_graphs.captures == 1
        new = {name: [str(key)[:300] for key in keys if key not in before.get(name, {})]
               for name, keys in after.items()}
        assert not {name: keys for name, keys in new.items() if keys}

    from nemoconv.model.cuda import triton_pdl  # (imports Triton)
    if triton_pdl.AVAILABLE and torch.cuda.get_device_capability()[0] >= 9:
        launched_pdl = {name for name, kernels in after.items()
                        if any(getattr(k.metadata, "launch_pdl", False) for k in kernels.values())}
        assert {"triton_gemv._skinny_kernel", "triton_ops._rmsnorm_kernel", "triton_decode._ssm_step_kernel"} \
            <= launched_pdl, launched_pdl


def test_without_the_warmups_pdl_pass_the_capture_compiles():
    """The check above can fail: with the warm-up's second pass (PDL variants) left out, the decode graph's capture
    compiles them."""
    model = build_case("dense", torch.bfloat16)
    forget_compiled()
    with settings.override(pdl=True):
        with pytest.MonkeyPatch.context() as mp:
            from nemoconv.model.cuda import triton_pdl
            mp.setattr(triton_pdl, "eager_too", contextlib.nullcontext)
            warmup._exercise(model.spec, torch.device(DEVICE), torch.bfloat16, 1, PREFILL, STEPS, 0, False)
        with compiles_seen() as seen:
            graphed_generate(model)
    if triton_pdl.AVAILABLE and torch.cuda.get_device_capability()[0] >= 9:
        assert any(capturing for _, capturing in seen), seen
