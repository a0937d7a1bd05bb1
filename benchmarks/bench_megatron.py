"""hf → megatron → hf of a multi-GB MoE checkpoint: wall time against `cp -r` and peak RSS, printed as JSON.

    PYTHONPATH=$PWD python benchmarks/bench_megatron.py --size-gb 4 --repeats 3 --dir /tmp/bench-megatron

Each round times `cp -r` of the source, hf → megatron, `cp -r` of that output, megatron → hf, one after the
other, so a conversion and its cp see the same machine load; medians over the rounds are reported, with the
load average before and after, and CPU seconds (user + system) beside wall seconds: on a shared machine the
CPU ratio is the steadier one. `--sync` makes each command pay for writing its output (as bench_convert.py).
The checkpoint is generated (random bf16 values, tiled from one seeded block so generation is fast); each
conversion runs in its own process (`python -m nemoconv.cli convert`), timed, with its peak RSS from wait4.
The children run as an installed nemoconv does: with Python's bytecode caches (pip compiles them at install;
PYTHONDONTWRITEBYTECODE is dropped from their environment, and an untimed `nemoconv --help` writes the CLI's
caches first; the rest are written by the first round), so each run does not recompile the package's modules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(directory: Path, size_gb: float) -> int:
    import torch

    from nemoconv.data.demo_checkpoint import tiny_config
    from nemoconv.storage.config import parse_config
    from nemoconv.storage.safetensors_io import write_single_file

    hidden, experts, inter = 1024, 64, 1024
    per_moe_layer = 2 * experts * inter * hidden * 2  # bf16 up + down experts dominate
    layers = max(1, round(size_gb * 1e9 / per_moe_layer))
    pattern = ("ME" * layers)[: 2 * layers]
    cfg = tiny_config("moe", hybrid_override_pattern=pattern, hidden_size=hidden, n_routed_experts=experts,
                      moe_intermediate_size=inter, moe_shared_expert_intermediate_size=inter, intermediate_size=inter,
                      mamba_num_heads=32, mamba_head_dim=64, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, vocab_size=32768, torch_dtype="bfloat16")
    spec = parse_config(cfg)
    block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tensors = {}
    for name, shape in spec.hf_shapes().items():
        n = 1
        for d in shape:
            n *= d
        dtype = torch.float32 if name.endswith(("A_log", "e_score_correction_bias")) else torch.bfloat16
        tensors[name] = block.repeat(n // block.numel() + 1)[:n].reshape(shape).to(dtype)
    directory.mkdir(parents=True)
    write_single_file(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(cfg))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's name, dtype, shape and a hash of its bytes (the headers' metadata differ by design)."""
    import hashlib

    from nemoconv.storage.safetensors_io import read_header

    entries, _ = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, e in entries.items():
            f.seek(e.start)
            out[name] = (e.dtype_name, e.shape, hashlib.sha256(f.read(e.nbytes)).hexdigest())
    return out


def timed(cmd: list[str], sync: bool = False) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of one child process. `sync`: the disk
    is synced before (untimed) and after (timed), so the command pays for writing its own output."""
    env = _child_env()
    if sync:
        os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if sync:
        os.sync()
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def one_round(work: Path, src: Path, sync: bool) -> dict[str, float]:
    """cp of the source, hf → megatron, cp of the megatron output, megatron → hf: each conversion next to a
    `cp -r` of the bytes it reads, so both see the same machine load (the copies are deleted at once)."""
    cli = [sys.executable, "-m", "nemoconv.cli", "--quiet", "convert"]
    for name in ("mg", "back"):
        shutil.rmtree(work / name, ignore_errors=True)
    row = {}
    mg, back = str(work / "mg"), str(work / "back")
    steps = (("hf", None, src), ("hf_to_megatron", [str(src), mg, "--to", "megatron"], None),
             ("megatron", None, work / "mg"), ("megatron_to_hf", [mg, back, "--to", "hf"], None))
    for key, cmd, copy in steps:
        if copy is not None:
            row[f"cp_{key}_s"], row[f"cp_{key}_cpu_s"], _ = timed(["cp", "-r", str(copy), str(work / "copy")], sync)
            shutil.rmtree(work / "copy")
        else:
            row[f"{key}_s"], row[f"{key}_cpu_s"], row[f"{key}_rss"] = timed([*cli, *cmd], sync)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync", action="store_true", help="sync around each timed command, as bench_convert does")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-megatron"))
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    src = args.dir / "hf"
    if args.make_only:  # in its own process, so the timed children do not inherit its memory high-water mark
        print(make_checkpoint(src, args.size_gb))
        return
    shutil.rmtree(args.dir, ignore_errors=True)
    env = _child_env()
    subprocess.run([sys.executable, "-m", "nemoconv.cli", "--help"], env=env, check=True,
                   capture_output=True)   # imports (and byte-compiles) the CLI's modules once, untimed
    made = subprocess.run([sys.executable, __file__, "--make-only", "--size-gb", str(args.size_gb), "--dir",
                           str(args.dir)], env=env, check=True, capture_output=True, text=True)
    nbytes = int(made.stdout.split()[-1])
    load_before = os.getloadavg()
    rounds = [one_round(args.dir, src, args.sync) for _ in range(args.repeats)]
    load_after = os.getloadavg()
    same = _tensor_bytes(src / "model.safetensors") == _tensor_bytes(args.dir / "back" / "model.safetensors")
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if not k.endswith("_rss")}
    rss = max(r[k] for r in rounds for k in r if k.endswith("_rss"))
    print(json.dumps({
        "tensor_bytes": nbytes, "hf_dir_bytes": _dir_bytes(src), "megatron_dir_bytes": _dir_bytes(args.dir / "mg"),
        "repeats": args.repeats, "sync": args.sync, "loadavg_before": load_before, "loadavg_after": load_after,
        "median": {k: round(v, 2) for k, v in med.items()},
        "hf_to_megatron_vs_cp": round(med["hf_to_megatron_s"] / med["cp_hf_s"], 2),
        "megatron_to_hf_vs_cp": round(med["megatron_to_hf_s"] / med["cp_megatron_s"], 2),
        "hf_to_megatron_vs_cp_cpu": round(med["hf_to_megatron_cpu_s"] / med["cp_hf_cpu_s"], 2),
        "megatron_to_hf_vs_cp_cpu": round(med["megatron_to_hf_cpu_s"] / med["cp_megatron_cpu_s"], 2),
        "rounds": [{k: round(v, 2) for k, v in r.items() if not k.endswith("_rss")} for r in rounds],
        "peak_rss_bytes": rss, "peak_rss_fraction": round(rss / nbytes, 3),
        "round_trip_bytes_identical": same,
    }, indent=2))


if __name__ == "__main__":
    main()
