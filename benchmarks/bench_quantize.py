"""FP8 quantization benchmark on one GPU: `nemoconv quantize` of an 8B-shaped checkpoint, then decode speed.

1. Writes a random bf16 checkpoint with the Nemotron-H-8B layout (52 layers M-M-M-M*-…, hidden 4096,
   32/8 heads of 128, MLP 21504, Mamba 128 heads of 64, 8 groups, state 128, vocab 131072; ~16 GB in
   5 GB shards) to disk, drawing the tensors on the GPU (untimed).
2. Times `nemoconv.quantize(SRC, OUT, preset="default", device="cuda")` with calibration on
   --calib-samples × --calib-seq-len tokens (default 128 × 512), cold (first CUDA/Triton use included),
   with its plan / calibrate / write split, the peak GPU memory (layer-by-layer calibration should stay
   far below the checkpoint's size) and the calibrator used. Goal: ≤ 120 s.
3. Loads SRC (bf16) and OUT (FP8) in the built-in model, one at a time, and measures greedy decode
   tokens/s at batch 1 (and 8): (generate(N new) − generate(1 new)) / (N − 1) steps, after a warm-up,
   median of --repeat; plus logit agreement of the two on one prompt.
Prints one JSON object (also to --out).

    python benchmarks/bench_quantize.py [--dir /tmp/nemoconv-qbench] [--out result.json]
    python benchmarks/bench_quantize.py --small    # tiny shapes on the CPU: a smoke run of every step
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from nemoconv.data.demo_checkpoint import tiny_config
from nemoconv.storage.config import parse_config
from nemoconv.storage.safetensors_io import PlannedTensor
from nemoconv.stream.output import ShardedWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PATTERN_8B, SHAPE_8B, SHAPE_SMALL, random_tensor, timed  # noqa: E402

DIMS_8B, DIMS_SMALL = SHAPE_8B, SHAPE_SMALL
GOAL_QUANTIZE_S = 120


def make_config(small: bool) -> dict:
    cfg = tiny_config("dense", hybrid_override_pattern="M-M*-M-" if small else PATTERN_8B,
                      **(DIMS_SMALL if small else DIMS_8B))
    cfg.update(torch_dtype="bfloat16", residual_in_fp32=False, use_bias=False, mlp_bias=False)
    return cfg


def write_source(directory: Path, small: bool, device) -> int:
    cfg = make_config(small)
    spec = parse_config(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    planned = [PlannedTensor(n, torch.bfloat16, s) for n, s in spec.hf_shapes().items()]
    writer = ShardedWriter(directory, planned, 5_000_000_000, {"format": "pt"})
    g = torch.Generator(device=device).manual_seed(0)
    for p in planned:
        writer.write(p.name, random_tensor(p.name, p.shape, g, device).to(torch.bfloat16).cpu())
    writer.close()
    return sum(p.nbytes for p in planned)




def decode_tok_s(model, ids, new: int, device, repeat: int) -> float:
    model.generate(ids, max_new_tokens=new)  # warm-up: kernels compiled, decode graph captured
    t_one, _ = timed(lambda: model.generate(ids, max_new_tokens=1), device, repeat)
    t_all, _ = timed(lambda: model.generate(ids, max_new_tokens=new), device, repeat)
    return ids.shape[0] * (new - 1) / max(t_all - t_one, 1e-9)


def decode_section(src: Path, out: Path, device, args) -> dict:
    import nemoconv
    from nemoconv.model.cuda import kernels

    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (8, args.prompt), generator=g).to(device)
    result, logits = {}, {}
    for label, path in (("bf16", src), ("fp8", out)):
        model = nemoconv.load_model(path, device=device, dtype=torch.bfloat16)
        logits[label] = model(prompt[:1]).float().cpu()
        result[label] = {"decode_b1_tok_s": round(decode_tok_s(model, prompt[:1], args.new, device, args.repeat), 1)}
        if not args.small:
            result[label]["decode_b8_tok_s"] = round(decode_tok_s(model, prompt, args.new, device, args.repeat), 1)
        result[label]["kernels"] = kernels.backend(model.backbone.embeddings.weight)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref, cand = logits["bf16"][0], logits["fp8"][0]
    result["fp8_over_bf16_b1"] = round(result["fp8"]["decode_b1_tok_s"] / result["bf16"]["decode_b1_tok_s"], 3)
    if "decode_b8_tok_s" in result["fp8"]:
        result["fp8_over_bf16_b8"] = round(result["fp8"]["decode_b8_tok_s"] / result["bf16"]["decode_b8_tok_s"], 3)
    result["logits_fp8_vs_bf16"] = {
        "cosine_mean": round(torch.nn.functional.cosine_similarity(ref, cand, dim=-1).mean().item(), 5),
        "top1_agreement": round((ref.argmax(-1) == cand.argmax(-1)).float().mean().item(), 4)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="Tiny shapes on the CPU (smoke run).")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nemoconv-qbench"))
    ap.add_argument("--calib-samples", type=int, default=None, help="default 128 (8 with --small)")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="default 512 (64 with --small)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=None, help="decode tokens, default 128 (16 with --small)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calibrator", default="auto", choices=["auto", "modelopt", "builtin"])
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = ap.parse_args()
    samples = args.calib_samples or (8 if args.small else 128)
    seq_len = args.calib_seq_len or (64 if args.small else 512)
    args.new = args.new or (16 if args.small else 128)
    if args.small:
        args.prompt = min(args.prompt, 32)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")

    from nemoconv.commands.quantize import quantize
    from nemoconv.quant.calibrate import modelopt_status

    shutil.rmtree(args.dir, ignore_errors=True)
    src, out = args.dir / "src", args.dir / "fp8"
    t0 = time.perf_counter()
    nbytes = write_source(src, args.small, device)
    build_s = time.perf_counter() - t0
    subprocess.run(["sync"], check=False)  # the write-back of the source is not quantize's cost
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = quantize(src, out, preset="default", calib_samples=samples, calib_seq_len=seq_len,
                               device=device.type, calibrator=args.calibrator)
    quantize_s = time.perf_counter() - t0
    q = result["quantization"]
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "layout": "small" if args.small else "nemotron-h-8b",
        "source_bytes": nbytes, "output_bytes": result["bytes_out"], "build_s": round(build_s, 1),
        "quantize": {
            "wall_s": round(quantize_s, 2), "timings_s": result["timings_s"], "goal_s": GOAL_QUANTIZE_S,
            "goal_met": quantize_s <= GOAL_QUANTIZE_S,
            "calibration_tokens": f"{samples} x {seq_len}", "calibrator": q["calibration"]["calibrator"],
            "activation_dtype": q["calibration"]["dtype"], "quantized_linears": len(q["targets"]),
            "exclude_modules": q["exclude_modules"],
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        },
        "modelopt": modelopt_status()[1],
    }
    if not args.skip_decode:
        report["decode"] = decode_section(src, out, device, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
