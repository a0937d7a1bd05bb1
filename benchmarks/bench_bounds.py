"""How much fusing could still gain (issue 18): the built-in model's own decode graph and prefill, timed with kinds of
non-product kernels not run at all, on the Nemotron-H-8B layout (random bf16 weights, built as bench_generate does).

A kind is dropped by swapping the `kernels` function that launches it for one that returns a fixed random tensor of
the right shape, with no launch. The model's values are then wrong on purpose: only the times mean something. The
stand-ins are random and not zeros because products of zeros draw less power, and a card at its power limit then
runs them faster: on an H200, a prefill whose norms returned zeros ran 8 ms faster than one whose norms returned
random values. With zeros the bound would be a lie.
  decode    the decode step's CUDA graph at batch 1 and 8, as generate captures it, in ms per replay (the median of
            `repeat` runs of 50 back-to-back replays, as bench_generate times its floors). Rows: all kernels;
            without the conv step, the gated norm or the RMSNorms; without all three. Beside it is
            bench_generate's weight-streaming floor with state.
  prefill   2048 tokens into a kept cache, with a graph and eagerly (bench_generate's `ours_prefill`). Rows: all
            kernels; without each kind of non-product kernel (conv, SSD scan, RMSNorms, relu², gated norm,
            attention); without all of them. Beside it are the prompt's matrix products alone.
A kind's gain is more than any fusion of it can win, because its work is gone as well as its launch. `bounds` sets
each target of issue 18 against the best time without all the kinds.

    python benchmarks/bench_bounds.py [--out FILE] [--repeat 3]
    python benchmarks/bench_bounds.py --small      # tiny shapes on the CPU (eager): a smoke run of every step
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg  # noqa: E402
from common import GpuMonitor, timed  # noqa: E402

from nemoconv.model.cuda import kernels  # noqa: E402
from nemoconv.storage.config import parse_config  # noqa: E402

DECODE_KINDS = ("conv_step", "gated_norm", "norms")
PREFILL_KINDS = ("conv", "ssd", "norms", "relu2", "gated_norm", "attention")
_fixed: dict[tuple, torch.Tensor] = {}


def fixed(shape, dtype, device, scale: float = 1.0, sign: int = 0) -> torch.Tensor:
    """A random stand-in of this shape, made once (sign ±1: all of that sign)."""
    key = (tuple(shape), dtype, str(device), scale, sign)
    if key not in _fixed:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a stand-in is first asked for inside a graph capture (no eager pass before it)")
        t = torch.randn(shape, generator=torch.Generator().manual_seed(len(_fixed))) * scale
        _fixed[key] = (t.abs() * sign if sign else t).to(device=device, dtype=dtype)
    return _fixed[key]


def _no_conv(xbc, dt, weight, bias, conv_state, dt_bias, dt_limit, A_log):
    """(the conv's input as its output, small positive step sizes, negative A)."""
    return xbc, fixed(dt.shape, torch.float32, dt.device, 0.01, 1), fixed(A_log.shape, torch.float32, dt.device, 1, -1)


def _no_ssd(x, dt, A, B, C, D, chunk_size, initial_state=None, return_final_state=False):
    y = fixed(x.shape, x.dtype, x.device)
    return (y, initial_state) if return_final_state else y


STAND_INS = {   # kind → the `kernels` functions it swaps
    "conv_step": {"mamba_step_inputs": _no_conv},
    "conv": {"mamba_sequence_inputs": _no_conv},
    "ssd": {"ssd_chunk_scan": _no_ssd},
    "norms": {"add_rmsnorm": lambda r, d, w, eps: (r, fixed(d.shape, w.dtype, d.device)),
              "rmsnorm": lambda x, w, eps: fixed(x.shape, w.dtype, x.device)},
    "relu2": {"relu2": lambda x: fixed(x.shape, x.dtype, x.device, 1, 1)},
    "gated_norm": {"gated_rmsnorm": lambda y, z, w, eps, group: fixed(y.shape, y.dtype, y.device)},
    "attention": {"attention": lambda q, k, v, mask, causal: fixed(q.shape, q.dtype, q.device)},
}


@contextmanager
def dropped(kinds):
    """The model runs without these kinds of kernels while inside."""
    saved = {}
    try:
        for kind in kinds:
            for name, stand_in in STAND_INS[kind].items():
                saved.setdefault(name, getattr(kernels, name))
                setattr(kernels, name, stand_in)
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def decode_ms(model, batch: int, vocab: int, device, repeat: int) -> float:
    """ms per decode step at this batch: on CUDA, generate's captured step graph replayed; on the CPU, one eager
    step. An eager generate comes first, so that the stand-ins are made outside any graph capture."""
    ids = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)
    model.runner.generation_caches.clear()
    saved = model.cuda_graphs
    model.cuda_graphs = False
    try:
        model.generate(ids, max_new_tokens=3)
    finally:
        model.cuda_graphs = saved
    if device.type != "cuda":
        cache = model.new_cache(batch, 32)
        token = model.prefill(ids, cache, last_only=True).argmax(-1, keepdim=True)
        return timed(lambda: model.decode_step(token, cache), device, repeat)[0] * 1e3
    model.runner.generation_caches.clear()
    model.generate(ids, max_new_tokens=8)                      # captures the step's graph
    graph = model.runner.generation_cache(batch, ids.shape[1] + 8).static_decoder().graph
    if graph is None:
        raise RuntimeError("generate captured no decode graph (NEMOCONV_CUDA_GRAPHS=0?)")
    graph.replay()
    return timed(lambda: [graph.replay() for _ in range(50)], device, repeat)[0] / 50 * 1e3


def decode_rows(model, vocab: int, device, repeat: int) -> dict:
    rows = {}
    for batch in (1, 8):
        per = {}
        for name, kinds in [("all", ())] + [(f"without_{k}", (k,)) for k in DECODE_KINDS] + \
                [("without_all", DECODE_KINDS)]:
            with dropped(kinds):
                ms = decode_ms(model, batch, vocab, device, repeat)
            per[name] = {"ms": round(ms, 4), "tok_s": round(batch / ms * 1e3, 1)}
        floor = bg.weight_streaming_floor(model, batch, device, repeat, with_state=True)
        per["floor_with_state"] = {"ms": floor["step_ms"], "tok_s": floor["tok_s"]}
        rows[f"b{batch}"] = per
    return rows


def prefill_rows(model, ids, device, repeat: int) -> dict:
    rows = {}
    for name, kinds in [("all", ())] + [(f"without_{k}", (k,)) for k in PREFILL_KINDS] + \
            [("without_all", PREFILL_KINDS)]:
        with dropped(kinds), GpuMonitor() as gpu:
            graphed = bg.ours_prefill(model, ids, device, repeat, graphs=True)
            eager = bg.ours_prefill(model, ids, device, repeat, graphs=False)
        rows[name] = {"graph_tok_s": round(graphed, 1), "eager_tok_s": round(eager, 1), "gpu": gpu.summary}
    rows["gemms_only"] = bg.prefill_gemm_floor(model, ids.shape[1], device, repeat)
    return rows


def bounds(decode: dict, prefill: dict) -> dict:
    """Each target of issue 18 that a dropped kind bears on, against the rate without all the kinds."""
    t = bg.TARGETS
    pairs = {"decode_b1_tok_s": decode["b1"]["without_all"]["tok_s"],
             "decode_b8_tok_s": decode["b8"]["without_all"]["tok_s"],
             "prefill_tok_s": prefill["without_all"]["graph_tok_s"],
             "prefill_eager_tok_s": prefill["without_all"]["eager_tok_s"]}
    return {k: {"target": t[k], "without_all": v, "reachable_by_fusion": v >= t[k]} for k, v in pairs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="Tiny shapes on the CPU (smoke run).")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if args.small:
        args.prefill, args.repeat = min(args.prefill, 64), 1
    spec = parse_config(bg.config(args.small))
    model = bg.build_ours(spec, device)
    ids = torch.randint(3, spec.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(1)).to(device)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "small": args.small,
           "repeat": args.repeat}
    res["decode"] = decode_rows(model, spec.vocab_size, device, args.repeat)
    res["prefill"] = prefill_rows(model, ids, device, args.repeat)
    res["bounds"] = None if args.small else bounds(res["decode"], res["prefill"])   # tiny CPU times bound nothing
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
