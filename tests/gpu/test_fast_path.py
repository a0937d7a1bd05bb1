"""The CUDA fast path (fused Triton kernels, static-shape decode, CUDA graphs) against the eager and
reference paths, on small real-shaped models.

Three ways to run the same model on the GPU:
  graph      the default: decode steps captured once per cache and replayed
  eager      model.cuda_graphs = False: the very same kernels launched one by one (the uncompiled path)
  reference  NEMOCONV_KERNELS=reference (settings.override(kernels="reference")): plain torch ops, attention
             included (the CPU reference's code, run on the GPU)
Checked: graph and eager agree bit for bit (tokens, logits, cache state); graph vs reference greedy
tokens are identical in float32 and logits close (fp32 ≤ 1e-4 relative, bf16 cosine ≥ 0.999; for the
bf16 MoE model ≥ 0.99, since bf16 rounding flips near-tie routing choices whatever the kernels);
a cache's graph is captured once and then replayed (per batch size), also across generate calls.
Skips without CUDA or mamba-ssm's Triton kernels. NEMOCONV_FAST_PATH_JSON=file appends each case's numbers.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import cuda_cases as cm
import pytest
import torch
from cuda_cases import DEVICE, PROMPT, build_case, skip_reason

from nemoconv import settings
from nemoconv.model.cuda import kernels
from nemoconv.model.mlp import MoE

NEW = 24
pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
build = build_case


def reference_kernels():
    return settings.override(kernels="reference")


def prompts(b: int, pad: int = 0, seed: int = 0):
    ids = torch.randint(3, 1024, (b, PROMPT), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().cpu(), b.double().cpu()
    diff = (a - b).abs()
    return {"max_abs_diff": diff.max().item(), "rel_max_diff": (diff.max() / b.abs().max()).item(),
            "cosine": torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item()}


def decode_trace(model, ids, mask, steps: int, graphs: bool):
    """Prefill, then `steps` teacher-forced decode steps → (stacked logits [steps, b, V], cache, captures)."""
    model.cuda_graphs = graphs
    b = ids.shape[0]
    cache = model.new_cache(b, PROMPT + steps)
    model.prefill(ids, cache, mask, last_only=True)
    feed = torch.randint(3, 1024, (steps, b), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    logits = torch.stack([model.decode_step(feed[t], cache) for t in range(steps)])
    decoder = cache.static_decoder()
    model.cuda_graphs = True
    return logits, cache, {"captures": decoder.captures, "replays": decoder.replays, "error": decoder.error}


def same_cache(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("kv", "conv", "ssm", "valid"))


def run_case(kind: str, dtype: torch.dtype, fp8: bool = False) -> dict:
    model = build(kind, dtype, fp8)
    out: dict = {"backend": kernels.backend(model.backbone.embeddings.weight)}
    for b, pad in ((2, 0), (3, 17)):            # an unpadded and a left-padded batch
        ids, mask = prompts(b, pad)
        key = f"b{b}" + ("_padded" if pad else "")
        g_logits, g_cache, stats = decode_trace(model, ids, mask, 12, graphs=True)
        e_logits, e_cache, _ = decode_trace(model, ids, mask, 12, graphs=False)
        r = {"graph_stats": stats, "graph_vs_eager_logits_bitwise": bool(torch.equal(g_logits, e_logits)),
             "graph_vs_eager_cache_bitwise": same_cache(g_cache, e_cache),
             "graph_vs_eager_cache_ssm": compare(g_cache.ssm.float(), e_cache.ssm.float())}
        with reference_kernels():
            r_logits, r_cache, _ = decode_trace(model, ids, mask, 12, graphs=True)
            ref_tokens = model.generate(ids, NEW, attention_mask=mask)
        r["graph_vs_reference_logits"] = compare(g_logits, r_logits)
        r["graph_vs_reference_cache_ssm"] = compare(g_cache.ssm.float(), r_cache.ssm.float())
        model.cuda_graphs = True
        fast_tokens = model.generate(ids, NEW, attention_mask=mask)
        model.cuda_graphs = False
        eager_tokens = model.generate(ids, NEW, attention_mask=mask)
        model.cuda_graphs = True
        r["greedy_graph_equals_eager"] = bool(torch.equal(fast_tokens, eager_tokens))
        r["greedy_graph_equals_reference"] = bool(torch.equal(fast_tokens, ref_tokens))
        out[key] = r
    # Graph reuse: per batch size one capture, then replays, also across generate calls.
    ids, _ = prompts(1, seed=3)
    model.runner.generation_caches.clear()
    for _ in range(3):
        model.generate(ids, NEW)
    decoder = model.runner.generation_caches[1].static_decoder()
    ids2, _ = prompts(2, seed=4)
    model.generate(ids2, NEW)
    decoder2 = model.runner.generation_caches[2].static_decoder()
    out["reuse"] = {"b1_captures_after_3_calls": decoder.captures, "b1_replays": decoder.replays,
                    "b2_captures": decoder2.captures, "b1_graph_kept": decoder.graph is not None}
    # Changing a weight's storage invalidates the graph: the next steps recapture.
    lin = model.backbone.layers[0].mixer.out_proj
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
    model.generate(ids, NEW)
    out["reuse"]["b1_captures_after_weight_replaced"] = decoder.captures
    return out


def moe_parity() -> dict:
    """Diagnosis for tests/gpu/test_cuda_model.py's float32 MoE model: the fast CUDA path vs the CPU
    reference, per position, beside each MoE layer's routing (GPU vs CPU) and the CPU's routing margin
    where they differ (a near tie flips on any rounding difference)."""
    ids, mask = cm.inputs()
    real = mask.bool()

    def routed(model):
        seen = {}
        hooks = [layer.mixer.gate.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, (o[1].cpu(), a[0].detach().float().cpu())))
            for i, layer in enumerate(model.backbone.layers) if isinstance(layer.mixer, MoE)]
        logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).cpu()
        for h in hooks:
            h.remove()
        return logits, seen

    cpu = cm.build("cpu", torch.float32)
    gpu = cm.build(DEVICE, torch.float32)
    cpu_logits, cpu_routes = routed(cpu)
    hooked_logits, gpu_routes = routed(gpu)              # hooks: module by module, same kernels
    fast_logits = gpu(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).cpu()
    with reference_kernels():
        ref_logits = gpu(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).cpu()
    out = {"fast_vs_cpu": compare(fast_logits[real], cpu_logits[real]),
           "hooked_vs_cpu": compare(hooked_logits[real], cpu_logits[real]),
           "gpu_reference_kernels_vs_cpu": compare(ref_logits[real], cpu_logits[real])}
    err = ((fast_logits - cpu_logits).abs().amax(-1) * real).flatten()
    top = err.topk(6)
    out["worst_positions_fast_vs_cpu"] = [(int(i) // cm.SEQ, int(i) % cm.SEQ, round(float(v), 5))
                                          for v, i in zip(top.values, top.indices)]
    flips = []
    for layer, (cpu_ids, x) in cpu_routes.items():
        gpu_ids = gpu_routes[layer][0]
        differ = (cpu_ids.sort(-1).values != gpu_ids.sort(-1).values).any(-1)
        gate = cpu.backbone.layers[layer].mixer.gate
        for t in differ.nonzero().flatten().tolist():
            choice = torch.sigmoid(x[t] @ gate.weight.float().t()) + gate.e_score_correction_bias.float()
            vals = choice.sort(descending=True).values
            k = gate.top_k
            flips.append({"layer": layer, "row": t // cm.SEQ, "pos": t % cm.SEQ,
                          "cpu_margin_k_vs_k+1": float(vals[k - 1] - vals[k])})
    out["routing_differences_hooked_gpu_vs_cpu"] = flips
    return out


@lru_cache(maxsize=None)
def _case(kind, dtype, fp8=False):
    r = run_case(kind, dtype, fp8)
    dump = os.environ.get("NEMOCONV_FAST_PATH_JSON")   # numbers for the record, beside pass/fail
    if dump:
        with open(dump, "a") as f:
            f.write(json.dumps({"case": f"{kind}_{str(dtype)[6:]}{'_fp8' if fp8 else ''}", **r}) + "\n")
    return r

CASES = [("dense", torch.float32, False), ("dense", torch.bfloat16, False), ("moe", torch.float32, False),
         ("moe", torch.bfloat16, False), ("dense", torch.bfloat16, True)]

@pytest.mark.parametrize("kind,dtype,fp8", CASES)
def test_graph_decode_is_bitwise_the_eager_decode(kind, dtype, fp8):
    r = _case(kind, dtype, fp8)
    for key in ("b2", "b3_padded"):
        assert r[key]["graph_stats"]["captures"] == 1, r[key]["graph_stats"]
        assert r[key]["graph_vs_eager_logits_bitwise"]
        assert r[key]["graph_vs_eager_cache_bitwise"]
        assert r[key]["greedy_graph_equals_eager"]

@pytest.mark.parametrize("kind,dtype,fp8", [c for c in CASES if not c[2]])
def test_graph_decode_is_close_to_the_reference(kind, dtype, fp8):
    r = _case(kind, dtype, fp8)
    for key in ("b2", "b3_padded"):
        logits = r[key]["graph_vs_reference_logits"]
        if dtype == torch.float32:
            assert logits["rel_max_diff"] <= 1e-4, logits
            assert r[key]["greedy_graph_equals_reference"]
        elif kind == "dense":
            assert logits["cosine"] >= 0.999, logits
        else:
            # bf16 MoE: a rounding difference flips near-tie routing choices on any implementation
            # (see test_cuda_model); an H100 gave cosine 0.9966 with top-1 agreement 1.0 here, and
            # 0.9967 with 8 of 9 after masked attention moved to the memory-efficient kernel.
            assert logits["cosine"] >= 0.99 and logits["top1_agreement"] >= 0.85, logits

@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_graphs_are_captured_once_per_batch_size_and_reused(kind):
    r = _case(kind, torch.float32, False)["reuse"]
    assert r["b1_captures_after_3_calls"] == 1 and r["b1_graph_kept"]
    assert r["b1_replays"] >= 3 * (NEW - 2)
    assert r["b2_captures"] == 1
    assert r["b1_captures_after_weight_replaced"] == 2

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 5])
def test_prefill_graph_replay_is_bitwise_the_eager_prefill(dtype, pad):
    """Three prefills of one shape into one kept cache: eager, captured, replayed (new tokens each
    time); each must equal an eager prefill of the same tokens bit for bit, logits and cache."""
    model = build("dense", dtype)
    graphed, eager = model.new_cache(3, PROMPT + 4), model.new_cache(3, PROMPT + 4)
    for seed in range(3):
        ids, mask = prompts(3, pad=pad, seed=10 + seed)
        graphed.reset()
        eager.reset()
        model.cuda_graphs = True
        got = model.prefill(ids, graphed, mask if pad else None, last_only=True)
        model.cuda_graphs = False
        want = model.prefill(ids, eager, mask if pad else None, last_only=True)
        model.cuda_graphs = True
        assert torch.equal(got, want), (seed, compare(got, want))
        assert same_cache(graphed, eager), seed
    graphs = graphed.prefill_graphs
    assert graphs is not None and graphs.captures == 1 and graphs.replays == 2, graphs and graphs.error
