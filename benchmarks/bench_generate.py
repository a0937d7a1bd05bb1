"""Built-in model vs transformers on one GPU: prefill, greedy decode (batch 1, 8 and 64), FP8 decode, and floors.

Builds a random bf16 model with the Nemotron-H-8B layout (52 layers M-M-M-M*-…, hidden 4096, 32 heads /
8 KV heads of 128, MLP 21504, Mamba 128 heads of 64, 8 groups, state 128, vocab 131072) directly on the
device (no disk), as nemoconv's NemotronHLM and as transformers' NemotronHForCausalLM over the SAME
weight tensors (transformers' module parameters are the built-in model's tensors, so one 16 GB copy
serves both; only A_log, D and dt_bias, float32 in ours, get bfloat16 copies, as transformers would
load them). Then, each after a warm-up, timed with CUDA synchronisation, median of repeats:
  prefill      tokens/s of one 2048-token prompt into the cache, last position's logits only
               (transformers: forward(use_cache=True, logits_to_keep=1)). Ours prefills into a kept cache,
               so from the third run on it replays the prefill's CUDA graph (all its kernels, none of
               the host's launches); prefill_eager_tok_s is the same with graphs off
  decode       greedy tokens/s after a 128-token prompt, batch 1, 8 and 64: (generate(128 new) −
               generate(1 new)) / 127 steps (transformers: generate(do_sample=False), batch 1 and 8)
  floors       measured in the same run: the weight-streaming floor of a decode step for the model's own
               shapes (every weight matrix multiplied once per step by a [b, in] activation, in one CUDA
               graph, by the kernel the model uses: the skinny Triton product up to 16 rows unless
               NEMOCONV_SKINNY=0; FP8 as FP8 products), per batch size and for FP8 b1, and with state also
               on cuBLAS's products; for prefill, the prompt's matrix products alone (every Linear on
               [2048, in], one graph, by the kernel the model uses: our Hopper GEMM unless NEMOCONV_GEMM=0),
               and the bf16 matmul rate of `ceilings`; `percent_of_floor` gives
               every row as % of its floor
  gpu          the SM clock and board power over each section (nvidia-smi, sampled every 50 ms): at its
               power limit the card slows its clock under long runs of large matrix products
  fp8 decode   batch 1, after quantizing the built-in model's Mamba in/out_proj and MLP up/down_proj
               in place (per-tensor static FP8: weight_scale = amax/448, input_scale = amax/448 of one
               calibration forward); transformers is freed first
  identity     greedy tokens of the CUDA-graph path vs the same model with graphs off (uncompiled)
It also reports whether transformers really called mamba-ssm's kernels (call counters wrapped around
them before transformers binds them), the two hardware ceilings, a torch.profiler table of one decode
step (written to --profile-dir), and prints one JSON object.

    python benchmarks/bench_generate.py [--out result.json] [--profile-dir DIR] [--skip-hf]
    NEMOCONV_SKINNY=0 python benchmarks/bench_generate.py --skip-hf    # decode products on cuBLAS
    NEMOCONV_GEMM=0 python benchmarks/bench_generate.py --skip-hf      # prefill products on cuBLAS
    python benchmarks/bench_generate.py --small      # tiny shapes on the CPU: a smoke run of every step
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from nemoconv import settings
from nemoconv.data.demo_checkpoint import tiny_config
from nemoconv.model import build_model, fp8
from nemoconv.model.cuda import kernels
from nemoconv.model.fp8 import FP8_MAX, Linear, quantize_fp8
from nemoconv.storage.config import parse_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PATTERN_8B, SHAPE_8B, SHAPE_SMALL, GpuMonitor, random_tensor, sync, timed  # noqa: E402

# issue 18's targets on an H200
TARGETS = {"prefill_tok_s": 45_000, "prefill_eager_tok_s": 42_000, "decode_b1_tok_s": 235, "decode_b8_tok_s": 1_800,
           "decode_b64_tok_s": 12_000, "fp8_decode_b1_tok_s": 350, "fp8_over_bf16_b1": 1.5}
DECODE_BATCHES = (1, 8, 64)


def config(small: bool) -> dict:
    pattern = "M-M*-M-" if small else PATTERN_8B
    cfg = tiny_config("dense", hybrid_override_pattern=pattern, **(SHAPE_SMALL if small else SHAPE_8B))
    cfg.update(torch_dtype="bfloat16", residual_in_fp32=False, use_bias=False, mlp_bias=False,
               attention_bias=False, layer_norm_epsilon=1e-5)
    return cfg


def build_ours(spec, device):
    g = torch.Generator(device=device).manual_seed(0)
    tensors = ((n, random_tensor(n, s, g, device).to(torch.bfloat16)) for n, s in spec.hf_shapes().items())
    return build_model(spec, tensors, device=device, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# transformers, with counters around the mamba-ssm kernels it may bind
# ---------------------------------------------------------------------------------------------
CALLS: dict[str, int] = {}


def _count(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS[name] = CALLS.get(name, 0) + 1
        return fn(*args, **kwargs)
    return wrapper


def instrument_mamba_ssm(device) -> dict:
    """Make mamba-ssm's Triton kernels importable (nemoconv registers them even where the package root
    fails to import) and wrap the ones transformers binds, before transformers imports NemotronH."""
    info = {"mamba_ssm_triton_importable": kernels.triton_kernels() is not None}
    if info["mamba_ssm_triton_importable"]:
        import mamba_ssm.ops.triton.selective_state_update as ssu
        import mamba_ssm.ops.triton.ssd_combined as ssd
        ssu.selective_state_update = _count("selective_state_update", ssu.selective_state_update)
        ssd.mamba_chunk_scan_combined = _count("mamba_chunk_scan_combined", ssd.mamba_chunk_scan_combined)
    try:
        import causal_conv1d  # noqa: F401
        info["causal_conv1d_importable"] = True
    except Exception as exc:  # noqa: BLE001
        info["causal_conv1d_importable"] = f"no ({type(exc).__name__})"
    return info


def build_hf(cfg: dict, ours):
    import transformers
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = NemotronHForCausalLM(config)
    state = {}
    for name, p in ours.named_parameters():
        t = p.detach()
        if t.dtype != torch.bfloat16:
            t = t.to(torch.bfloat16)                  # A_log, D, dt_bias: bf16 copies, as transformers loads them
        state[name.replace("backbone.", "model.", 1)] = t
    if ours.spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embeddings.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    on_meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if on_meta or unexpected:
        raise RuntimeError(f"transformers model incomplete: meta={on_meta[:5]} unexpected={unexpected[:5]}")
    hf.eval()
    return hf, transformers.__version__


def _bound_kernel(fn, depth: int = 0) -> str | None:
    """The mamba-ssm / causal-conv1d function a transformers wrapper closes over, if any."""
    for cell in (getattr(fn, "__closure__", None) or ()):
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if callable(v) and str(getattr(v, "__module__", "")).startswith(("mamba_ssm", "causal_conv1d")):
            return f"{v.__module__}.{v.__name__}"
        if callable(v) and depth < 3:
            found = _bound_kernel(v, depth + 1)
            if found:
                return found
    return None


def hf_kernel_report(hf) -> dict:
    mod = sys.modules[type(hf).__module__]
    out = {name: _bound_kernel(getattr(mod, name, None)) or "torch fallback"
           for name in ("causal_conv1d_update", "causal_conv1d_fn", "mamba2_selective_state_update",
                        "mamba2_chunk_scan")}
    out["calls"] = dict(CALLS)
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def ceilings(device) -> dict:
    if device.type != "cuda":
        return {}
    a = torch.empty(2 ** 30 // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t, _ = timed(lambda: [b.copy_(a) for _ in range(10)], device, 3)
    copy_tb_s = 2 * a.numel() * 2 * 10 / t / 1e12
    del a, b
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    t, _ = timed(lambda: [x @ y for _ in range(10)], device, 3)
    del x, y
    return {"d2d_copy_TB_s_read_plus_write": round(copy_tb_s, 3), "bf16_matmul_8192_TFLOP_s": round(2 * 8192 ** 3 * 10 / t / 1e12, 1)}


def bytes_per_decode_step(model) -> int:
    """Weight bytes a decode step must read (all linears, lm_head; one embedding row is negligible)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def graph_seconds(step, device, repeat: int, replays: int) -> float:
    """Seconds of one `step()`: on CUDA captured once as a graph and timed as the median over `repeat` runs of
    `replays` back-to-back replays (no launch overhead); eagerly elsewhere."""
    with torch.no_grad():
        step()
        run, per = step, 1
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                step()
            run, per = (lambda: [graph.replay() for _ in range(replays)]), replays
            run()
        t, _ = timed(run, device, repeat)
    return t / per


def weight_streaming_floor(model, batch: int, device, repeat: int, with_state: bool = False) -> dict:
    """The decode step no implementation can beat on this device: every weight matrix of the model (each
    Linear, lm_head included; FP8 ones as FP8 GEMMs on an activation already quantized) multiplied once by
    a [batch, in] activation, nothing else. `with_state`: also read and write every Mamba layer's SSM state
    and conv window once (an in-place scale of the cache's own tensors), which a decode step cannot avoid
    either. On CUDA the whole step is one CUDA graph (no launch overhead), timed as the median over `repeat`
    runs of 10 replays. → {step_ms, tok_s, weight_bytes, state_bytes}."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    dtype = model.dtype
    inputs = []
    for lin in linears:
        x = torch.randn(batch, lin.weight.shape[1], device=device, dtype=dtype)
        if lin.quantized and fp8.prequantize_ok(lin, x):
            inputs.append((lin, fp8.quantize_fp8(F.pad(x, (0, 0, 0, fp8.padded_rows(batch) - batch)),
                                                 lin.input_scale)))
        else:
            inputs.append((lin, x))
    cache = model.new_cache(batch, 1) if with_state else None
    states = [cache.ssm, cache.conv] if cache is not None else []   # SSM state (float32 by the config), conv window

    def step():
        for lin, x in inputs:
            if x.dtype == fp8.FP8_DTYPE:
                fp8.fp8_matmul_quantized(x, batch, (batch,), lin.weight, lin.weight_scale, lin.input_scale, None,
                                         dtype)
            else:
                lin(x)
        for t in states:
            t.mul_(1.0)

    step_s = graph_seconds(step, device, repeat, replays=10)
    return {"step_ms": round(step_s * 1e3, 3), "tok_s": round(batch / step_s, 1),
            "weight_bytes": bytes_per_decode_step(model),
            "state_bytes": 2 * sum(t.numel() * t.element_size() for t in states)}   # each read and written once


def cublas_floor(model, batch: int, device, repeat: int) -> dict:
    """`weight_streaming_floor` with state, its products on cuBLAS (as before the skinny kernel): what that kernel
    gains on the same card."""
    with settings.override(skinny=False):
        return weight_streaming_floor(model, batch, device, repeat, with_state=True)


def prefill_gemm_floor(model, tokens: int, device, repeat: int) -> dict:
    """What the prefill's matrix products alone take on this device: every Linear of the model multiplied by a
    [tokens, in] activation (lm_head by one row, as a prefill that keeps the last logits), in one CUDA graph,
    timed as the median over `repeat` runs of 3 replays. The card's clock under this load (GpuMonitor) is
    what the prefill itself runs at; a matrix-product rate measured cold is not. → {ms, tok_s, tflop_s}."""
    head = model.lm_head
    linears = [m for m in model.modules() if isinstance(m, Linear) and m is not head]
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    flops = 0
    work = []
    for lin in linears + [head]:
        rows = 1 if lin is head else tokens
        key = (rows, lin.weight.shape[1])
        if key not in inputs:
            inputs[key] = torch.randn(*key, device=device, dtype=model.dtype)
        work.append((lin, inputs[key]))
        flops += 2 * rows * lin.weight.shape[0] * lin.weight.shape[1]

    def step():
        for lin, x in work:
            lin(x)

    s = graph_seconds(step, device, repeat, replays=3)
    return {"ms": round(s * 1e3, 3), "tok_s": round(tokens / s, 1), "tflop_s": round(flops / s / 1e12, 1)}


def percent_of_floor(ours: dict, floors: dict) -> dict:
    """Every measured row as a share of its floor (100 = the floor itself)."""
    pairs = {"decode_b1_tok_s": "decode_b1_tok_s", "decode_b8_tok_s": "decode_b8_tok_s",
             "decode_b64_tok_s": "decode_b64_tok_s", "fp8_decode_b1_tok_s": "fp8_decode_b1_tok_s",
             "prefill_tok_s": "prefill_tok_s_gemms_only", "prefill_eager_tok_s": "prefill_tok_s_gemms_only"}
    return {key: round(100 * ours[key] / floors[f], 1) for key, f in pairs.items()
            if ours.get(key) and floors.get(f)}


def ours_prefill(model, ids, device, repeat, graphs: bool = True) -> float:
    """Prefill into a kept cache, as generate does. With graphs (the default), the first run is eager,
    the second is captured as a CUDA graph, and the timed ones replay it (every kernel of the prefill
    runs; only the host's launches are saved); graphs=False times the eager path."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    saved = model.cuda_graphs
    model.cuda_graphs = graphs and saved

    def run():
        cache.reset()
        return model.prefill(ids, cache, last_only=True)
    try:
        run()
        run()
        t, _ = timed(run, device, repeat)
    finally:
        model.cuda_graphs = saved
    graphs = cache.prefill_graphs
    if graphs is not None:
        PREFILL_GRAPHS.update(captures=graphs.captures, replays=graphs.replays, error=graphs.error)
    return ids.numel() / t


PREFILL_GRAPHS: dict = {}


def hf_prefill(hf, ids, device, repeat) -> float:
    run = lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        run()
        t, _ = timed(run, device, repeat)
    return ids.numel() / t


def decode_rate(generate, ids, new: int, device, repeat: int) -> tuple[float, torch.Tensor]:
    generate(ids, new)                                  # warm-up (compiles, captures the graph)
    t_one, _ = timed(lambda: generate(ids, 1), device, repeat)
    t_all, out = timed(lambda: generate(ids, new), device, repeat)
    return ids.shape[0] * (new - 1) / max(t_all - t_one, 1e-9), out


def ours_generate(model):
    return lambda ids, new: model.generate(ids, max_new_tokens=new)


def hf_generate(hf):
    hf.generation_config.eos_token_id = None            # never stop early: exactly `new` tokens, like ours

    def run(ids, new):
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        if out.shape[1] != ids.shape[1] + new:
            raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, not {new}")
        return out
    return run


def first_divergence(a: torch.Tensor, b: torch.Tensor, s: int):
    diff = (a[:, s:] != b[:, s:]).nonzero()
    return None if len(diff) == 0 else int(diff[:, 1].min())


def greedy_identity(model, ids, new) -> dict:
    """Greedy tokens of the CUDA-graph path vs the same kernels with graphs off."""
    saved = model.cuda_graphs
    try:
        model.cuda_graphs = True
        fast = model.generate(ids, max_new_tokens=new)
        model.cuda_graphs = False
        slow = model.generate(ids, max_new_tokens=new)
    finally:
        model.cuda_graphs = saved
    return {"identical": bool(torch.equal(fast, slow)), "first_divergence": first_divergence(fast, slow, ids.shape[1])}


def quantize_default_preset(model, calib_ids) -> int:
    """Per-tensor static FP8 for Mamba in/out_proj and MLP up/down_proj, in place (ModelOpt-style scales)."""
    targets = {}
    for i, layer in enumerate(model.backbone.layers):
        mixer = layer.mixer
        names = {"M": ("in_proj", "out_proj"), "-": ("up_proj", "down_proj")}.get(layer.code, ())
        for leaf in names:
            targets[f"backbone.layers.{i}.mixer.{leaf}"] = getattr(mixer, leaf)
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return fn
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    model(calib_ids)                                    # one calibration forward (hooks: module by module)
    for h in handles:
        h.remove()
    for name, lin in targets.items():
        w = lin.weight.detach()
        w_scale = (w.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
        lin.weight = torch.nn.Parameter(quantize_fp8(w, w_scale), requires_grad=False)
        lin.weight_scale = w_scale
        lin.input_scale = (amax[name] / FP8_MAX).clamp(min=1e-12)
    return len(targets)


def kernel_events(prof, path: Path, title: str) -> list:
    """Append the profile's table (by device time) to `path` under `title`; → its CUDA kernel events, longest first."""
    avg = prof.key_averages()
    with open(path, "a") as f:
        f.write(f"==== {title} ====\n{avg.table(sort_by='self_device_time_total', row_limit=40)}\n")
    events = [e for e in avg if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(events, key=lambda e: -e.self_device_time_total)


def profile_prefill(model, ids, device, path: Path | None) -> dict:
    """torch.profiler over one prefill, eager (one row per kernel launch; the host's own time shows as Self
    CPU) and replayed from its CUDA graph: where the time of a long prompt goes, by kernel, and how much of
    the wall time no kernel covers (`idle_us`: wall minus the kernels' summed device time)."""
    if device.type != "cuda" or path is None:
        return {}
    from torch.profiler import ProfilerActivity, profile

    out = {}
    saved = model.cuda_graphs
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    try:
        for mode in ("eager", "graph"):
            model.cuda_graphs = mode == "graph"
            for _ in range(3):                       # compile; capture the graph; replay it once
                cache.reset()
                model.prefill(ids, cache, last_only=True)
            sync(device)
            cache.reset()
            sync(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                model.prefill(ids, cache, last_only=True)
                sync(device)
                wall_us = (time.perf_counter() - t0) * 1e6
            events = kernel_events(prof, path / "profile_prefill.txt",
                                   f"prefill of {ids.shape[1]} tokens, b{ids.shape[0]}, {mode}")
            total = sum(e.self_device_time_total for e in events)
            out[mode] = {"device_us": round(total, 1), "wall_us": round(wall_us, 1),
                         "idle_us": round(wall_us - total, 1), "kernels": sum(e.count for e in events),
                         "host_cpu_us": round(sum(e.self_cpu_time_total for e in prof.key_averages()), 1),
                         "top": [(e.key[:60], round(e.self_device_time_total, 1), e.count) for e in events[:15]]}
    finally:
        model.cuda_graphs = saved
    return out


def profile_decode(model, ids, device, path: Path | None, modes=("eager", "graph")) -> dict:
    """torch.profiler over decode steps: eager (graphs off: one row per kernel launch) and graph replays."""
    if device.type != "cuda" or path is None:
        return {}
    from torch.profiler import ProfilerActivity, profile

    out = {}
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 16)
    model.prefill(ids, cache, last_only=True)
    token = ids[:, -1]
    for mode in modes:
        model.cuda_graphs = mode == "graph"
        for _ in range(3):
            model.decode_step(token, cache)
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model.decode_step(token, cache)
            sync(device)
        events = kernel_events(prof, path / "profile_decode.txt",
                               f"{model.backbone.layers[0].mixer.in_proj!r} decode b{ids.shape[0]}, {mode}, 3 steps")
        total = sum(e.self_device_time_total for e in events) / 3
        out[mode] = {"device_us_per_step": round(total, 1), "kernels_per_step": sum(e.count for e in events) / 3,
                     "top": [(e.key[:60], round(e.self_device_time_total / 3, 1), e.count // 3) for e in events[:12]]}
    model.cuda_graphs = True
    return out


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="Tiny shapes on the CPU (smoke run).")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    ap.add_argument("--profile-dir", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda"))
    if args.small:
        args.prefill, args.prompt, args.new, args.repeat = min(args.prefill, 64), min(args.prompt, 16), \
            min(args.new, 8), 1
    logging.getLogger("transformers").setLevel(logging.ERROR)

    skinny = settings.current().skinny                # off: the floors are cuBLAS's already (not measured twice)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "small": args.small, "errors": {},
                 "skinny_products": skinny}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None

    def section(name, fn):
        try:
            t0 = time.perf_counter()
            with GpuMonitor() as gpu:
                value = fn()
            res.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            if gpu.summary:
                res.setdefault("gpu_clock_power", {})[name] = gpu.summary
            return value
        except Exception:  # one failing section must not hide the others' numbers
            res["errors"][name] = traceback.format_exc()[-2500:]
            print(f"[{name}] failed:\n{res['errors'][name]}", file=sys.stderr)
            return None
        finally:
            if args.out:
                args.out.write_text(json.dumps(res, indent=1))

    cfg = config(args.small)
    spec = parse_config(cfg)
    res["shapes"] = {k: cfg[k] for k in ("hybrid_override_pattern", "hidden_size", "num_attention_heads",
                                        "num_key_value_heads", "head_dim", "intermediate_size", "mamba_num_heads",
                                        "mamba_head_dim", "n_groups", "ssm_state_size", "vocab_size")}
    res["runs"] = {"prefill_tokens": args.prefill, "prompt": args.prompt, "new_tokens": args.new,
                   "repeat": args.repeat}
    res["ceilings"] = section("ceilings", lambda: ceilings(device))
    res["hf_kernels"] = section("instrument", lambda: instrument_mamba_ssm(device))
    model = section("build_ours", lambda: build_ours(spec, device))
    if model is None:
        print(json.dumps(res, indent=1))
        return
    res["backend"] = kernels.backend(model.backbone.embeddings.weight)
    res["weight_bytes_per_decode_step"] = bytes_per_decode_step(model)
    g = torch.Generator().manual_seed(1)
    ids_prefill = torch.randint(3, spec.vocab_size, (1, args.prefill), generator=g).to(device)
    ids = {b: torch.randint(3, spec.vocab_size, (b, args.prompt), generator=g).to(device) for b in DECODE_BATCHES}

    ours: dict = {}
    res["nemoconv"] = ours
    ours["prefill_tok_s"] = section("ours_prefill", lambda: ours_prefill(model, ids_prefill, device, args.repeat))
    ours["prefill_eager_tok_s"] = section("ours_prefill_eager", lambda: ours_prefill(model, ids_prefill, device,
                                                                                     args.repeat, graphs=False))
    outs_ours = {}
    floors: dict = {}
    floor = section("floor_prefill_gemms", lambda: prefill_gemm_floor(model, args.prefill, device, args.repeat))
    if floor:
        floors["prefill_tok_s_gemms_only"], floors["prefill_gemms_ms"] = floor["tok_s"], floor["ms"]
        floors["prefill_gemms_tflop_s"] = floor["tflop_s"]
    floors_state: dict = {}   # the same floors plus the SSM state and conv window read and written once per step
    floors_cublas: dict = {}  # floors_state with cuBLAS's products instead of the skinny kernel (NEMOCONV_SKINNY=0)
    for b in DECODE_BATCHES:
        floor = section(f"floor_b{b}", lambda b=b: weight_streaming_floor(model, b, device, args.repeat))
        if floor:
            floors[f"decode_b{b}_tok_s"], floors[f"decode_b{b}_step_ms"] = floor["tok_s"], floor["step_ms"]
        floor = section(f"floor_state_b{b}", lambda b=b: weight_streaming_floor(model, b, device, args.repeat,
                                                                               with_state=True))
        if floor:
            floors_state[f"decode_b{b}_tok_s"], floors_state[f"decode_b{b}_step_ms"] = floor["tok_s"], floor["step_ms"]
            floors_state[f"decode_b{b}_state_bytes"] = floor["state_bytes"]
        floor = section(f"floor_state_cublas_b{b}", lambda b=b: cublas_floor(model, b, device, args.repeat)) \
            if skinny else None
        if floor:
            floors_cublas.update({f"decode_b{b}_tok_s": floor["tok_s"], f"decode_b{b}_step_ms": floor["step_ms"]})
        r = section(f"ours_decode_b{b}", lambda b=b: decode_rate(ours_generate(model), ids[b], args.new, device,
                                                                 args.repeat))
        if r:
            ours[f"decode_b{b}_tok_s"], outs_ours[b] = r
    res["greedy_identity_graph_vs_eager"] = {
        f"b{b}": section(f"identity_b{b}", lambda b=b: greedy_identity(model, ids[b], args.new)) for b in (1, 8)}
    decoder = model.runner.generation_caches.get(1)
    if decoder is not None:
        d = decoder.static_decoder()
        res["graph_stats_b1"] = {"captures": d.captures, "replays": d.replays, "error": d.error}
    res["prefill_graph_stats"] = dict(PREFILL_GRAPHS) or None
    res["profile_bf16"] = section("profile_bf16", lambda: profile_decode(model, ids[1], device, args.profile_dir))
    for b in (8, 64):
        res[f"profile_bf16_b{b}"] = section(f"profile_bf16_b{b}", lambda b=b: profile_decode(
            model, ids[b], device, args.profile_dir, modes=("graph",)))
    res["profile_prefill"] = section("profile_prefill",
                                     lambda: profile_prefill(model, ids_prefill, device, args.profile_dir))

    theirs: dict = {}
    if not args.skip_hf:
        built = section("build_hf", lambda: build_hf(cfg, model))
        if built:
            hf, res["transformers"] = built
            res["hf"] = theirs
            theirs["prefill_tok_s"] = section("hf_prefill", lambda: hf_prefill(hf, ids_prefill, device, args.repeat))
            for b in (1, 8):
                r = section(f"hf_decode_b{b}", lambda b=b: decode_rate(hf_generate(hf), ids[b], args.new, device,
                                                                       max(1, args.repeat - 1)))
                if r:
                    theirs[f"decode_b{b}_tok_s"], out = r
                    if b in outs_ours:
                        res.setdefault("greedy_agreement_ours_vs_hf", {})[f"b{b}"] = {
                            "identical": bool(torch.equal(out.to(device), outs_ours[b])),
                            "first_divergence": first_divergence(out.to(device), outs_ours[b], args.prompt)}
            res["hf_kernels"].update(section("hf_kernel_report", lambda: hf_kernel_report(hf)) or {})
            del hf, built
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # FP8 (default preset) on the built-in model.
    model.runner.generation_caches.clear()
    n = section("fp8_quantize", lambda: quantize_default_preset(model, ids[1]))
    if n:
        res["fp8_linears"] = n
        res["weight_bytes_per_decode_step_fp8"] = bytes_per_decode_step(model)
        r = section("ours_fp8_decode_b1", lambda: decode_rate(ours_generate(model), ids[1], args.new, device,
                                                             args.repeat))
        if r:
            ours["fp8_decode_b1_tok_s"] = r[0]
        floor = section("floor_fp8_b1", lambda: weight_streaming_floor(model, 1, device, args.repeat))
        if floor:
            floors["fp8_decode_b1_tok_s"], floors["fp8_decode_b1_step_ms"] = floor["tok_s"], floor["step_ms"]
        floor = section("floor_state_fp8_b1", lambda: weight_streaming_floor(model, 1, device, args.repeat,
                                                                            with_state=True))
        if floor:
            floors_state["fp8_decode_b1_tok_s"] = floor["tok_s"]
            floors_state["fp8_decode_b1_step_ms"] = floor["step_ms"]
        floor = section("floor_state_cublas_fp8_b1", lambda: cublas_floor(model, 1, device, args.repeat)) \
            if skinny else None
        if floor:
            floors_cublas.update(fp8_decode_b1_tok_s=floor["tok_s"], fp8_decode_b1_step_ms=floor["step_ms"])
        res["greedy_identity_graph_vs_eager"]["fp8_b1"] = section(
            "identity_fp8", lambda: greedy_identity(model, ids[1], args.new))
        res["profile_fp8"] = section("profile_fp8", lambda: profile_decode(model, ids[1], device, args.profile_dir))

    # Ratios, floors and targets.
    ratios, met = {}, {}
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"):
        if ours.get(key) and theirs.get(key):
            ratios[f"{key}_ours_over_hf"] = round(ours[key] / theirs[key], 2)
    for key in TARGETS:
        if ours.get(key) is not None and not args.small:
            met[key] = ours[key] >= TARGETS[key]
    if ours.get("fp8_decode_b1_tok_s") and ours.get("decode_b1_tok_s"):
        ratios["fp8_over_bf16_b1"] = round(ours["fp8_decode_b1_tok_s"] / ours["decode_b1_tok_s"], 2)
        if not args.small:
            met["fp8_over_bf16_b1"] = ratios["fp8_over_bf16_b1"] >= TARGETS["fp8_over_bf16_b1"]
    idt = res["greedy_identity_graph_vs_eager"]
    met["greedy_identity"] = all(v and v.get("identical") for v in idt.values())
    c = res.get("ceilings") or {}
    if c:
        bw = c["d2d_copy_TB_s_read_plus_write"] * 1e12    # bytes moved per second by a copy: ~ what a pure read gets
        floors["decode_b1_tok_s_at_copy_bandwidth"] = round(bw / res["weight_bytes_per_decode_step"], 1)
        if res.get("weight_bytes_per_decode_step_fp8"):
            floors["fp8_decode_b1_tok_s_at_copy_bandwidth"] = round(bw / res["weight_bytes_per_decode_step_fp8"], 1)
        # prefill: every linear's 2·in·out FLOPs per token at the measured bf16 matmul rate (attention not counted)
        flops_per_token = res["weight_bytes_per_decode_step"]    # bf16: bytes = 2 · parameters = FLOPs per token
        floors["prefill_tok_s_at_matmul_ceiling"] = round(c["bf16_matmul_8192_TFLOP_s"] * 1e12 / flops_per_token, 1)
    res["floors"] = floors
    res["floors_with_state"] = floors_state
    # NEMOCONV_SKINNY=0: floors_with_state are the cuBLAS floors (the same measurement)
    res["floors_with_state_cublas_products"] = floors_cublas if skinny else {
        k: v for k, v in floors_state.items() if k.endswith(("_tok_s", "_step_ms"))}
    res["percent_of_floor"] = percent_of_floor(ours, floors)
    res["percent_of_floor_with_state"] = percent_of_floor(ours, {**floors, **floors_state})
    res["ratios"], res["targets"], res["targets_met"] = ratios, TARGETS, met
    for d in (ours, theirs):
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 1)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
