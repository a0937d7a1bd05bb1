"""The decode step's and the prefill's own Triton kernels at the 8B layout's shapes, against what they replace.

For each kernel: its time per call (CUDA events, median of `--repeat` runs of 20 calls, inside one CUDA
graph so launch overhead does not count), the bytes it must move, the bandwidth that makes, and its
largest difference from the torch reference (`nemoconv.model.reference`) on the same inputs:
  ssm_step      ours at several tiles vs mamba-ssm's selective_state_update (the kernel it replaced),
                batch 1, 8 and 64: the fp32 state is read and written once
  conv_step     the decode conv step at batch 1, 8 and 64
  conv_seq      the prefill conv over 2048 positions at several tiles (the strided xBC slice of in_proj's
                output, as the model passes it), and the model's call: with the cached context and the step sizes
  gated_norm    the Mamba output norm at batch 1, 8 and 64 (z the strided slice of in_proj's output): ours, and
                ours writing out_proj's FP8 input (rows zero-padded to 16), against what they replace: mamba-ssm's
                layer_norm_fwd, and it followed by the quantize launch; "bitwise" = equal to the mamba-ssm path
  ssd_scan      the prefill's SSD scan over `seq` positions (x, B, C strided views of one xBC, as the model
                passes them): ours (two launches) against mamba-ssm's five-kernel scan it replaced; "bytes" is
                what any scan must move (x, B, C, dt in; y out), the reference is float64
  norm_fp8      the hidden-size RMSNorm (+ residual add) writing the next linear's FP8 input, and the standalone
                quantize, at batch 1 padded to 16 rows and unpadded (what the padding rows cost), 8 and 64
Prints one JSON object.

    python benchmarks/bench_kernels.py [--repeat 5]
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --small    # CPU: correctness only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nemoconv.model import reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_time_us  # noqa: E402

H, P, G, N, HIDDEN, CONV_K = 128, 64, 8, 128, 4096, 4
INNER = H * P
CONV_DIM = INNER + 2 * G * N
IN_PROJ = INNER + CONV_DIM + H


def row(us: float, nbytes: int, diff: float) -> dict:
    return {"us": round(us, 2), "bytes": nbytes, "TB_s": round(nbytes / us / 1e6, 3) if us == us else None,
            "max_abs_diff_vs_reference": diff}


def ssm_step_rows(device, repeat: int, batches, tiles) -> dict:
    from nemoconv.model.cuda import triton_decode

    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for b in batches:
        state0 = (torch.randn(b, H, P, N, generator=g) * 0.1).to(device)
        x = torch.randn(b, H, P, generator=g).to(device, torch.bfloat16)
        dt = (torch.rand(b, H, generator=g) * 0.1).to(device)
        A = -torch.rand(H, generator=g).to(device)
        Bm = torch.randn(b, G, N, generator=g).to(device, torch.bfloat16)
        Cm = torch.randn(b, G, N, generator=g).to(device, torch.bfloat16)
        D = torch.randn(H, generator=g).to(device)
        ref_state = state0.clone()
        ref_y = reference.ssm_step(ref_state, x, dt, A, Bm, Cm, D)
        nbytes = 2 * state0.numel() * 4
        for tile in tiles:
            state = state0.clone()
            y = triton_decode.ssm_step(state, x, dt, A, Bm, Cm, D, tile=tile)
            diff = max(float((y.float() - ref_y.float()).abs().max()), float((state - ref_state).abs().max()))
            work = state0.clone()
            us = graph_time_us(lambda: triton_decode.ssm_step(work, x, dt, A, Bm, Cm, D, tile=tile), device, repeat)
            out[f"b{b}_ours_{tile[0]}x{tile[1]}w"] = row(us, nbytes, diff)
        if device.type == "cuda":
            out[f"b{b}_mamba_ssm"] = mamba_ssm_row(state0, x, dt, A, Bm, Cm, D, ref_state, ref_y, nbytes, repeat)
    return out


def mamba_ssm_row(state0, x, dt, A, Bm, Cm, D, ref_state, ref_y, nbytes, repeat) -> dict:
    from nemoconv.model.cuda import kernels

    selective_state_update = kernels.triton_kernels().state_update   # imported past mamba-ssm's CUDA-only root
    b = x.shape[0]
    zeros = torch.zeros(H, device=x.device)
    args = (x, dt[:, :, None].expand(b, H, P), A[:, None, None].expand(H, P, N), Bm, Cm)
    kw = dict(D=D[:, None].expand(H, P), z=None, dt_bias=zeros[:, None].expand(H, P), dt_softplus=False)
    state = state0.clone()
    y = selective_state_update(state, *args, **kw)
    diff = max(float((y.float() - ref_y.float()).abs().max()), float((state - ref_state).abs().max()))
    work = state0.clone()
    return row(graph_time_us(lambda: selective_state_update(work, *args, **kw), x.device, repeat), nbytes, diff)


def conv_step_rows(device, repeat: int, batches) -> dict:
    from nemoconv.model.cuda import triton_conv

    g = torch.Generator(device="cpu").manual_seed(1)
    out = {}
    for b in batches:
        zx = torch.randn(b, IN_PROJ, generator=g).to(device, torch.bfloat16)
        xbc, dt = zx[:, INNER:INNER + CONV_DIM], zx[:, INNER + CONV_DIM:]
        w = (torch.randn(CONV_DIM, CONV_K, generator=g) / 2).to(device, torch.bfloat16)
        bias = torch.randn(CONV_DIM, generator=g).to(device, torch.bfloat16)
        state0 = torch.randn(b, CONV_DIM, CONV_K - 1, generator=g).to(device, torch.bfloat16)
        dt_bias, A_log = torch.randn(H, generator=g).to(device), torch.randn(H, generator=g).to(device)
        ref_state = state0.clone()
        ref = reference.causal_conv1d_silu_step(xbc, w, bias, ref_state)
        state = state0.clone()
        y, _, _ = triton_conv.conv_step(xbc, dt, w, bias, state, dt_bias, (0.0, float("inf")), A_log)
        diff = max(float((y.float() - ref.float()).abs().max()), float((state.float() - ref_state.float()).abs().max()))
        work = state0.clone()
        us = graph_time_us(lambda: triton_conv.conv_step(xbc, dt, w, bias, work, dt_bias, (0.0, float("inf")), A_log),
                           device, repeat)
        nbytes = 2 * state0.numel() * 2 + 2 * b * CONV_DIM * 2
        out[f"b{b}"] = row(us, nbytes, diff)
    return out


def conv_seq_rows(device, repeat: int, seq: int, tiles) -> dict:
    from nemoconv.model.cuda import triton_conv

    g = torch.Generator(device="cpu").manual_seed(2)
    zx = torch.randn(1, seq, IN_PROJ, generator=g).to(device, torch.bfloat16)
    xbc = zx[..., INNER:INNER + CONV_DIM]
    w = (torch.randn(CONV_DIM, CONV_K, generator=g) / 2).to(device, torch.bfloat16)
    bias = torch.randn(CONV_DIM, generator=g).to(device, torch.bfloat16)
    ref = reference.causal_conv1d_silu(xbc, w, bias, None)
    out = {}
    saved = triton_conv.CONV_TILE
    try:
        for tile in tiles:
            triton_conv.CONV_TILE = tile
            y = triton_conv.conv_silu(xbc, w, bias, None)
            diff = float((y.float() - ref.float()).abs().max())
            us = graph_time_us(lambda: triton_conv.conv_silu(xbc, w, bias, None), device, repeat)
            out["x".join(map(str, tile))] = row(us, 2 * seq * CONV_DIM * 2, diff)
    finally:
        triton_conv.CONV_TILE = saved
    # the model's prefill call: the cached context read and refreshed, the step sizes and A in the same launches
    dt = zx[..., INNER + CONV_DIM:]
    dt_bias, A_log = torch.full((H,), -3.0, device=device), torch.zeros(H, device=device)
    state = torch.randn(1, CONV_DIM, CONV_K - 1, generator=g).to(device, torch.bfloat16)
    ref_state = state.clone()
    ref = reference.causal_conv1d_silu(xbc, w, bias, ref_state)
    step = (dt, dt_bias, (0.0, float("inf")), A_log)
    y, _, _ = triton_conv.conv_silu(xbc, w, bias, state.clone(), step=step)
    diff = float((y.float() - ref.float()).abs().max())
    us = graph_time_us(lambda: triton_conv.conv_silu(xbc, w, bias, state, step=step), device, repeat)
    out["model_call"] = row(us, 2 * seq * CONV_DIM * 2 + seq * H * 6, diff)
    return out


def mamba_ssm_gated_norm(y, z, weight, eps, group_size):
    """mamba-ssm's layer_norm_fwd (RMS, gate before the norm) on [rows, n]: what kernels.gated_rmsnorm ran before."""
    from nemoconv.model.cuda import kernels

    kernels.triton_kernels()                     # registers mamba_ssm past its CUDA-only root
    from mamba_ssm.ops.triton.layernorm_gated import _layer_norm_fwd

    return _layer_norm_fwd(y, weight, None, eps, z=z, group_size=group_size, norm_before_gate=False,
                           is_rms_norm=True)[0]


def gated_norm_rows(device, repeat: int, batches) -> dict:
    from nemoconv.model import fp8
    from nemoconv.model.cuda import triton_ops

    g = torch.Generator(device="cpu").manual_seed(3)
    out = {}
    eps, group = 1e-5, INNER // G
    for b in batches:
        zx = torch.randn(b, IN_PROJ, generator=g).to(device, torch.bfloat16)
        z = zx[:, :INNER]
        y = torch.randn(b, INNER, generator=g).to(device, torch.bfloat16)
        w = (1 + torch.randn(INNER, generator=g) / 5).to(device, torch.bfloat16)
        ref = reference.gated_rmsnorm(y, z, w, eps, group)
        scale = (ref.float().abs().max() / 300).reshape(())
        rows = fp8.padded_rows(b)
        ours = triton_ops.gated_rmsnorm(y, z, w, eps, group)
        ours_q = triton_ops.gated_rmsnorm(y, z, w, eps, group, quant=(scale, rows))
        diff = float((ours.float() - ref.float()).abs().max())
        nbytes = 3 * b * INNER * 2
        variants = {"ours": (lambda: triton_ops.gated_rmsnorm(y, z, w, eps, group), nbytes),
                    "ours_fp8": (lambda: triton_ops.gated_rmsnorm(y, z, w, eps, group, quant=(scale, rows)),
                                 2 * b * INNER * 2 + rows * INNER)}
        if device.type == "cuda":
            theirs = mamba_ssm_gated_norm(y, z, w, eps, group)
            theirs_q = triton_ops.quantize_fp8(theirs, scale, rows)
            same = {"ours": torch.equal(ours.view(torch.int16), theirs.view(torch.int16)),
                    "ours_fp8": torch.equal(ours_q.view(torch.uint8), theirs_q.view(torch.uint8))}
            variants["mamba_ssm"] = (lambda: mamba_ssm_gated_norm(y, z, w, eps, group), nbytes)
            variants["mamba_ssm_then_quantize"] = (
                lambda: triton_ops.quantize_fp8(mamba_ssm_gated_norm(y, z, w, eps, group), scale, rows),
                nbytes + b * INNER * 2 + rows * INNER)
        for name, (fn, moved) in variants.items():
            out[f"b{b}_{name}"] = row(graph_time_us(fn, device, repeat), moved, diff)
            if device.type == "cuda" and name in same:
                out[f"b{b}_{name}"]["bitwise"] = same[name]
    return out


def norm_fp8_rows(device, repeat: int, batches) -> dict:
    from nemoconv.model.cuda import triton_ops

    g = torch.Generator(device="cpu").manual_seed(4)
    out = {}
    for b in batches:
        x = torch.randn(b, HIDDEN, generator=g).to(device, torch.bfloat16)
        d = torch.randn(b, HIDDEN, generator=g).to(device, torch.bfloat16)
        w = (1 + torch.randn(HIDDEN, generator=g) / 10).to(device, torch.bfloat16)
        scale = torch.tensor(0.01, device=device)
        ref = reference.rmsnorm(x + d, w, 1e-5)
        for rows in sorted({b, b + (-b) % 16}):
            tag = f"b{b}" if rows == b else f"b{b}_padded{rows}"
            _, y, _ = triton_ops.rmsnorm(x, w, 1e-5, delta=d, quant=(scale, rows))
            diff = float((y.float() - ref.float()).abs().max())
            out[f"{tag}_add_rmsnorm_fp8"] = row(
                graph_time_us(lambda: triton_ops.rmsnorm(x, w, 1e-5, delta=d, quant=(scale, rows)), device, repeat),
                b * HIDDEN * 2 * 4 + rows * HIDDEN, diff)
            out[f"{tag}_quantize_fp8"] = row(
                graph_time_us(lambda: triton_ops.quantize_fp8(x, scale, rows), device, repeat),
                b * HIDDEN * 2 + rows * HIDDEN, 0.0)
        out[f"b{b}_add_rmsnorm"] = row(
            graph_time_us(lambda: triton_ops.rmsnorm(x, w, 1e-5, delta=d), device, repeat), b * HIDDEN * 2 * 4,
            float((triton_ops.rmsnorm(x, w, 1e-5, delta=d)[1].float() - ref.float()).abs().max()))
    return out


def ssd_scan_rows(device, repeat: int, seq: int) -> dict:
    from nemoconv.model.cuda import kernels, triton_ssd

    g = torch.Generator(device="cpu").manual_seed(3)
    xbc = torch.randn(1, seq, CONV_DIM, generator=g)
    xbc[..., INNER:] *= 0.3
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (tl.dot): float16 there
    xbc = xbc.to(device, torch.bfloat16 if device.type == "cuda" else torch.float16)
    x, Bm, Cm = (t.reshape(1, seq, -1, w) for t, w in zip(xbc.split([INNER, G * N, G * N], dim=-1), (P, N, N)))
    dt = torch.nn.functional.softplus(torch.randn(1, seq, H, generator=g) - 2.0).to(device)
    A, D = -(torch.rand(H, generator=g) * 4 + 0.5).to(device), torch.randn(H, generator=g).to(device)
    ref = reference.ssd_chunk_scan(*(t.double() for t in (x, dt, A, Bm, Cm, D)), 128)
    nbytes = 2 * x.numel() * 2 + 2 * Bm.numel() * 2 + dt.numel() * 4
    runs = {"ours": lambda: triton_ssd.ssd_scan(x, dt, A, Bm, Cm, D, 128, None, True)}
    if device.type == "cuda":
        fwd = kernels.triton_kernels().chunk_scan_fwd
        runs["mamba_ssm"] = lambda: fwd(x, dt, A, Bm, Cm, 128, D=D)
    return {name: row(graph_time_us(fn, device, repeat), nbytes, float((fn()[0].double() - ref).abs().max()))
            for name, fn in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="CPU (Triton's interpreter): correctness, no timing")
    args = ap.parse_args()
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    batches = (1, 2) if args.small else (1, 8, 64)
    ssm_tiles = [(16, 4)] if args.small else [(8, 2), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]
    conv_tiles = [(16, 256, 4)] if args.small else [(16, 256, 4), (32, 256, 4), (64, 256, 8), (32, 512, 8),
                                                    (64, 128, 4), (128, 128, 8)]
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
           "ssm_step": ssm_step_rows(device, args.repeat, batches, ssm_tiles),
           "conv_step": conv_step_rows(device, args.repeat, batches),
           "conv_seq": conv_seq_rows(device, args.repeat, 64 if args.small else 2048, conv_tiles),
           "gated_norm": gated_norm_rows(device, args.repeat, batches),
           "norm_fp8": norm_fp8_rows(device, args.repeat, batches),
           "ssd_scan": ssd_scan_rows(device, args.repeat, 64 if args.small else 2048)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
