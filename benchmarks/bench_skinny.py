"""The skinny product of decode steps (`triton_gemv`) against cuBLAS, at the 8B layout's weight shapes.

For bf16 and FP8 weights (per-tensor scales, ModelOpt's format) and 1 and 8 rows, each of the seven weight shapes
(in_proj, out_proj, up, down, qkv, o, lm_head; FP8 only for the four the default preset quantizes) is timed:
  cublas   what the model ran before: F.linear (bf16), torch._scaled_mm on rows padded to 16 (FP8)
  chosen   the tile `triton_gemv.skinny_tile` picks for that shape
  tiles    every tile of the sweep (`--sweep`), best first: how the choice was made
Each time is µs per product from one CUDA graph that multiplies enough copies of the weight (≥ 400 MB) that none
of them is in L2, median of 5 replays; with bytes/µs as TB/s and the largest difference from cuBLAS's result,
relative to its largest value. `step_us` sums each shape times its count in one decode step of the 8B layout.
Prints one JSON object.

    python benchmarks/bench_skinny.py [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nemoconv.model import fp8  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_time_us  # noqa: E402

try:
    from nemoconv.model.cuda.triton_gemv import skinny_linear, skinny_tile
except ImportError as exc:              # no Triton: nothing to measure
    sys.exit(f"bench_skinny needs Triton and a CUDA device ({exc})")

# (out, in) and how many times one decode step of the 8B layout multiplies by it
SHAPES = {"in_proj": ((18560, 4096), 24), "out_proj": ((4096, 8192), 24), "up": ((21504, 4096), 24),
          "down": ((4096, 21504), 24), "qkv": ((6144, 4096), 4), "o": ((4096, 4096), 4),
          "lm_head": ((131072, 4096), 1)}
FP8_SHAPES = ("in_proj", "out_proj", "up", "down")


def sweep_tiles(rows: int) -> list[tuple]:
    if rows == 1:
        return [(bn, bk, w, 1, False) for bn, bk, w in itertools.product((8, 16, 32), (512, 1024, 2048), (4, 8))]
    return [(bn, bk, 4, st, True) for bn, bk, st in itertools.product((64, 128), (64, 128, 256), (3, 4, 5))]


def graph_us(calls, device) -> float:
    """µs per call of `calls` (one product each), all of them in one CUDA graph: median of 5 replays."""
    return graph_time_us(lambda: [c() for c in calls], device, repeat=5, calls=1) / len(calls)


def shape_row(name: str, rows: int, quantized: bool, sweep: bool, device) -> dict:
    (n, k), _ = SHAPES[name]
    nbytes = n * k * (1 if quantized else 2)
    copies = max(1, -(-400_000_000 // nbytes))
    g = torch.Generator(device=device).manual_seed(rows * 7 + n)
    weights = [torch.randn(n, k, generator=g, device=device).to(torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(rows, k, generator=g, device=device).to(torch.bfloat16)
    if quantized:
        w_scale = torch.tensor(0.08 / fp8.FP8_MAX, device=device)
        x_scale = torch.tensor(4.0 / fp8.FP8_MAX, device=device)
        weights = [fp8.quantize_fp8(w, w_scale) for w in weights]
        x_q = fp8.quantize_fp8(F.pad(x, (0, 0, 0, fp8.padded_rows(rows) - rows)), x_scale)

        def cublas(w):
            return torch._scaled_mm(x_q, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)[:rows]

        def ours(w, tile=None):
            return skinny_linear(x_q[:rows], w, scales=(x_scale, w_scale), out_dtype=torch.bfloat16, tile=tile)
    else:
        def cublas(w):
            return F.linear(x, w)

        def ours(w, tile=None):
            return skinny_linear(x, w, tile=tile)
    want = cublas(weights[0]).float()

    def timed(tile) -> list:
        diff = ((ours(weights[0], tile).float() - want).abs().max() / want.abs().max()).item()
        us = graph_us([lambda w=w: ours(w, tile) for w in weights], device)
        return [round(us, 2), round(nbytes / us / 1e6, 3), round(diff, 5)]

    chosen = skinny_tile(rows, n, k, quantized)
    row = {"cublas_us": round(graph_us([lambda w=w: cublas(w) for w in weights], device), 2),
           "chosen_tile": list(chosen)}
    row["cublas_TB_s"] = round(nbytes / row["cublas_us"] / 1e6, 3)
    row["chosen_us"], row["chosen_TB_s"], row["chosen_rel_diff"] = timed(chosen)
    if sweep:
        row["tiles"] = sorted(([*timed(t), list(t)] for t in sweep_tiles(rows)), key=lambda r: r[0])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time every tile of the sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_skinny needs a CUDA device")
    device = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name()}
    for quantized, rows in itertools.product((False, True), (1, 8)):
        key = f"{'fp8' if quantized else 'bf16'}_rows{rows}"
        names = FP8_SHAPES if quantized else tuple(SHAPES)
        shapes = {name: shape_row(name, rows, quantized, args.sweep, device) for name in names}
        step = {which: round(sum(SHAPES[name][1] * r[f"{which}_us"] for name, r in shapes.items()), 1)
                for which in ("cublas", "chosen")}
        res[key] = {"step_us": step, "shapes": shapes}
        print(key, json.dumps(step), file=sys.stderr, flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
