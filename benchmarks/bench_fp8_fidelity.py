"""FP8 fidelity on trained weights: per preset, the verify metrics and the held-out perplexity change.

    python benchmarks/bench_fp8_fidelity.py [CHECKPOINT] [--heldout FILE] [--fixtures] [--table]

Without CHECKPOINT it measures the trained model that ships with nemoconv (nemoconv/data/tiny-trained).
`--fixtures` adds ../shared/fixtures/trained-tiny/{dense,moe} when that folder exists. For each
checkpoint and preset it quantizes into a temporary directory (the quantize defaults unless
--calib-* say otherwise), runs `verify` with the CLI's default settings, and computes the held-out
perplexity of the source and of the FP8 output with the built-in model (float32). Prints JSON;
`--table` prints a markdown table after it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nemoconv  # noqa: E402
from nemoconv.data import heldout_loss, heldout_tokens, tiny_trained_checkpoint

PRESETS = ("default", "conservative", "aggressive")
FIXTURES = REPO.parent / "shared" / "fixtures" / "trained-tiny"
SUMMARY_KEYS = ("cosine_mean", "cosine_min", "kl_mean", "top1_agreement", "greedy_identical_prompts", "prompts")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path, help="default: the shipped trained model")
    p.add_argument("--heldout", type=Path, help="heldout_tokens.safetensors (default: beside the checkpoint "
                   "or its parent folder)")
    p.add_argument("--fixtures", action="store_true", help=f"also {FIXTURES}/dense and /moe when present")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--heldout-tokens", type=int, default=20_000, help="held-out ids used (from the start)")
    p.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calibrator", default="auto", choices=("auto", "modelopt", "builtin"))
    p.add_argument("--table", action="store_true", help="also print a markdown table")
    return p.parse_args(argv)


def find_heldout(checkpoint: Path) -> Path:
    for folder in (checkpoint, checkpoint.parent):
        if (folder / "heldout_tokens.safetensors").is_file():
            return folder / "heldout_tokens.safetensors"
    raise SystemExit(f"{checkpoint}: no heldout_tokens.safetensors beside it or in its parent; pass --heldout")


def model_loss(path: Path, tokens: torch.Tensor, window: int) -> float:
    model = nemoconv.load_model(path, device="cpu", dtype=torch.float32)
    return heldout_loss(model, tokens, window=window)


def measure_preset(source: Path, preset: str, tokens: torch.Tensor, source_loss: float, args, work: Path) -> dict:
    out = work / preset
    t0 = time.perf_counter()
    manifest = nemoconv.quantize(source, out, preset=preset, calib_samples=args.calib_samples,
                                 calib_seq_len=args.calib_seq_len, device="cpu", calibrator=args.calibrator)
    t1 = time.perf_counter()
    report = nemoconv.verify(source, out, device="cpu")  # the CLI's default settings
    t2 = time.perf_counter()
    loss = model_loss(out, tokens, args.window)
    quant = manifest["quantization"]
    return {
        "passed": report.passed, "failure": None if report.passed else report.failure_line(),
        "profile": report.profile, **{k: report.summary()[k] for k in SUMMARY_KEYS},
        "quantized_linears": len(quant["targets"]), "bytes_out": manifest["bytes_out"],
        "calibrator": quant["calibration"].get("calibrator"),
        "heldout_loss": loss, "perplexity": math.exp(loss),
        "perplexity_change_pct": 100 * (math.exp(loss - source_loss) - 1),
        "seconds": {"quantize": round(t1 - t0, 1), "verify": round(t2 - t1, 1)},
    }


def measure_checkpoint(name: str, source: Path, heldout: Path, args) -> dict:
    tokens = heldout_tokens(heldout)[: args.heldout_tokens]
    source_loss = model_loss(source, tokens, args.window)
    ck = nemoconv.open_checkpoint(source)
    row = {"name": name, "path": str(source), "pattern": ck.spec.layer_codes,
           "parameters": sum(math.prod(e.shape) for e in ck.entries.values()),
           "bytes": ck.total_bytes, "heldout_tokens": int(tokens.numel()),
           "heldout_loss": source_loss, "perplexity": math.exp(source_loss), "presets": {}}
    with tempfile.TemporaryDirectory(prefix="nemoconv-fidelity-") as work:
        for preset in args.presets:
            row["presets"][preset] = measure_preset(source, preset, tokens, source_loss, args, Path(work))
    return row


def targets(args) -> list[tuple[str, Path, Path]]:
    if args.checkpoint is None:
        shipped = tiny_trained_checkpoint()
        found = [("tiny-trained (shipped)", shipped, args.heldout or shipped.parent / "heldout_tokens.safetensors")]
    else:
        found = [(args.checkpoint.name, args.checkpoint, args.heldout or find_heldout(args.checkpoint))]
    if args.fixtures and FIXTURES.is_dir():
        for kind in ("dense", "moe"):
            found.append((f"fixture {kind}", FIXTURES / kind, FIXTURES / "heldout_tokens.safetensors"))
    return found


def markdown(rows: list[dict]) -> str:
    lines = ["| model | preset | FP8 linears | verify | cosine mean / min | KL mean | top-1 | greedy | "
             "perplexity | change |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | source (bf16) | 0 | | | | | | {row['perplexity']:.3f} | |")
        for preset, r in row["presets"].items():
            lines.append(
                f"| {row['name']} | {preset} | {r['quantized_linears']} | {'PASS' if r['passed'] else 'FAIL'} | "
                f"{r['cosine_mean']:.5f} / {r['cosine_min']:.5f} | {r['kl_mean']:.5f} | {r['top1_agreement']:.3f} | "
                f"{r['greedy_identical_prompts']}/{r['prompts']} | {r['perplexity']:.3f} | "
                f"{r['perplexity_change_pct']:+.2f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = [measure_checkpoint(name, path, heldout, args) for name, path, heldout in targets(args)]
    result = {"tool": "nemoconv", "version": nemoconv.__version__, "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "heldout", "table")},
              "checkpoints": rows}
    print(json.dumps(result, indent=1, default=str))
    if args.table:
        print()
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
