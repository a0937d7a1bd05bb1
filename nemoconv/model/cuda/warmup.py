"""Compile a model's GPU kernels on a background thread while its weights load from disk.

The first run of the built-in model on a GPU compiles every Triton kernel it launches (ours and
mamba-ssm's), about a second each, before any real work. `start` runs the same kernels, with the same
shapes, on a stand-in of the network (each kind of layer once, a 256-token vocabulary, made-up weights:
under a GB for an 8B-shaped network) on a thread of its own, so that the compiling overlaps with loading
the real weights (file reads and host-to-device copies, which release the GIL). `wait_all` joins it;
call it before the real model runs anything: a CUDA graph captured while the thread still launches
kernels would fail. Triton caches what is compiled (in memory and on disk), so the real model then
finds it; shapes the stand-in did not run simply compile as before.

The stand-in runs eagerly (no CUDA graphs): a prefill of `prefill` positions of `batch` rows into a
cache, two decode steps, and a whole-sequence forward of `forward` positions; then the prefill and decode
steps again with our kernels launched as a captured graph launches them (`triton_pdl.eager_too`: other
compiled variants); with fp8=True all that again on a copy whose Mamba and MLP linears are FP8 (the
quantizing norm, relu² and GEMM paths). NEMOCONV_WARMUP=0 turns it off.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import torch

from nemoconv import settings
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import FP8_MAX, quantize_fp8
from nemoconv.model.loading import build_model
from nemoconv.storage.config import MAMBA, MLP

_running: list["Warmup"] = []
_lock = threading.Lock()


class Warmup:
    """One background warm-up: `seconds` it ran, `error` if it failed (the real run is unaffected)."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.seconds = 0.0
        self.waited = 0.0
        self.error = ""

    def join(self) -> None:
        if self.thread is not None:
            t0 = time.perf_counter()
            self.thread.join()
            self.waited += time.perf_counter() - t0

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "waited": round(self.waited, 3), "error": self.error}


last: Warmup | None = None   # the latest started (benchmarks/bench_verify.py reports how long it ran)


def stand_in_spec(spec):
    """The network with each kind of layer once (in order of appearance, then the first again, so each norm
    variant between kinds occurs), no MTP heads, and a 256-token vocabulary."""
    kinds = "".join(dict.fromkeys(spec.layer_codes))
    return dataclasses.replace(spec, layer_codes=kinds + kinds[0], vocab_size=256, mtp_codes="", num_mtp_layers=0,
                               raw={**spec.raw, "vocab_size": 256})


def default_fp8_linears(spec) -> set[str]:
    """The linears quantize's default preset makes FP8 (docs/DESIGN.md §7): Mamba in/out_proj, MLP up/down_proj."""
    pairs = {MAMBA: ("in_proj", "out_proj"), MLP: ("up_proj", "down_proj")}
    return {f"backbone.layers.{i}.mixer.{name}" for i, code in enumerate(spec.layer_codes)
            for name in pairs.get(code, ())}


def _tensors(spec, device, dtype, fp8: bool):
    """Made-up weights of plausible magnitude, drawn on the device (no NaN/inf: routing must pick real experts)."""
    g = torch.Generator(device=device).manual_seed(0)
    targets = default_fp8_linears(spec) if fp8 else set()
    for name, shape in spec.hf_shapes().items():
        if name.endswith("A_log"):
            t = torch.zeros(shape, device=device).uniform_(0.0, 2.7, generator=g)
        elif name.endswith(".D") or "norm" in name or name.endswith("dt_bias"):
            t = torch.ones(shape, device=device) * (-4.0 if name.endswith("dt_bias") else 1.0)
        elif name.endswith("bias"):
            t = torch.zeros(shape, device=device)
        else:
            t = torch.randn(shape, device=device, generator=g) / math.sqrt(shape[-1])
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in targets:
            scale = (t.abs().amax() / FP8_MAX).clamp(min=1e-12)
            yield name, quantize_fp8(t, scale)
            yield prefix + ".weight_scale", scale.reshape(())
            yield prefix + ".input_scale", torch.tensor(0.02, device=device)
            continue
        yield name, t.to(dtype)


def _exercise(spec, device, dtype, batch: int, prefill: int, steps: int, forward: int, fp8: bool) -> None:
    model = build_model(stand_in_spec(spec), _tensors(stand_in_spec(spec), device, dtype, fp8), device=device,
                        dtype=dtype)
    model.cuda_graphs = False
    g = torch.Generator(device=device).manual_seed(1)
    with torch.inference_mode():
        ids = torch.randint(0, 256, (batch, max(prefill, forward) + 2), device=device, generator=g)
        _generate(model, ids, spec, dtype, batch, prefill, steps)
        if forward:
            model(ids[:, :forward])
        if device.type == "cuda":
            # the real model captures its prefill and decode steps into graphs, where our kernels launch with PDL:
            # other compiled variants, which would otherwise compile inside the first capture
            from nemoconv.model.cuda import triton_pdl
            with triton_pdl.eager_too():
                _generate(model, ids, spec, dtype, batch, prefill, steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, ids, spec, dtype, batch: int, prefill: int, steps: int) -> None:
    """What generate runs: a prefill into a cache, up to two decode steps, and the head's product at the real
    vocabulary's tile."""
    cache = model.new_cache(batch, prefill + steps + 1)
    model.prefill(ids[:, :prefill], cache, last_only=True)
    for j in range(min(steps, 2)):
        model.decode_step(ids[:, prefill + j], cache)
    _head_product(spec, ids.device, dtype, batch)


def _head_product(spec, device, dtype, batch: int) -> None:
    """The lm_head's skinny product at the real vocabulary's tile: the stand-in's 256-row head takes another one.
    (Triton specializes on a width's divisibility by 16, so a small weight of the same divisibility compiles the
    same kernel.)"""
    x = torch.zeros(batch, spec.hidden_size, device=device, dtype=dtype)
    weight = torch.zeros(64 if spec.vocab_size % 16 == 0 else 65, spec.hidden_size, device=device, dtype=dtype)
    if kernels.skinny_ok(x, weight):
        fused = kernels.triton_kernels().fused
        fused.skinny_linear(x, weight, tile=fused.skinny_tile(batch, spec.vocab_size, spec.hidden_size, False))


def _run(w: Warmup, spec, device, dtype, batch, prefill, steps, forward, fp8) -> None:
    t0 = time.perf_counter()
    try:
        torch.cuda.set_device(device)
        _exercise(spec, device, dtype, batch, prefill, steps, forward, False)
        if fp8:
            _exercise(spec, device, dtype, batch, prefill, steps, forward, True)
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only means the real run compiles
        w.error = f"{type(exc).__name__}: {exc}"
    finally:
        w.seconds = time.perf_counter() - t0


def start(spec, device, dtype: torch.dtype, *, batch: int, prefill: int, steps: int, forward: int,
          fp8: bool = False) -> Warmup | None:
    """Start warming up the kernels of `spec` on `device` (CUDA with the Triton kernels only); None otherwise."""
    global last
    device = torch.device(device)
    if device.type != "cuda" or not settings.current().warmup or prefill < 1 or batch < 1:
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if kernels.backend(torch.empty(0, device=device)) != "triton":
        return None
    w = Warmup()
    w.thread = threading.Thread(target=_run, args=(w, spec, device, dtype, batch, prefill, steps, forward, fp8),
                                name="nemoconv-warmup", daemon=True)
    with _lock:
        _running.append(w)
    last = w
    w.thread.start()
    return w


def wait_all() -> None:
    """Join every warm-up still running (call before the real model launches anything)."""
    with _lock:
        pending = list(_running)
        _running.clear()
    for w in pending:
        w.join()
