"""Trains the small Nemotron-H that ships with nemoconv (nemoconv/data/tiny-trained/).

One hybrid with every layer kind the built-in model implements (Mamba-2, GQA attention, relu2 MLP,
MoE with sigmoid routing, correction bias and a shared expert), trained with transformers'
NemotronHForCausalLM on the Python standard library found on this machine (sources, docstrings and
the reference docs in pydoc_data), with its own byte-level BPE tokenizer. Nothing is downloaded.

    python tools/train_tiny_model.py OUT SECONDS [--steps N] [--seed S] [TEXT_ROOT ...]

Training stops after SECONDS or N steps, whichever comes first; the learning rate follows whichever
is further along. OUT receives:
    model/                       the checkpoint (HF layout, bf16 model.safetensors, config, tokenizer)
    heldout_tokens.safetensors   `tokens`, int32: ids of files kept out of training (and out of the
                                 tokenizer's training), for perplexity checks
    train_results.json           steps, tokens, losses, seconds, seed, versions

Runs on CPU (slowly: pass --steps for a fixed amount of work) or CUDA; on CUDA put mamba-ssm's wheel
(../shared/tools/build-mamba-wheel.sh, or `pip install mamba-ssm` with MAMBA_SKIP_CUDA_BUILD=TRUE) on the
path and transformers uses its Triton kernels, about 15x faster. Same seed, same corpus (the Python
version decides the standard library) and same device give the same weights up to kernel nondeterminism.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".py", ".rst", ".txt", ".md")
MAX_CORPUS_CHARS = 40_000_000
HELDOUT_TOKENS = 20_000
SEQ_LEN, BATCH = 256, 64
PEAK_LR = 2e-3

# Every layer kind the demo needs, in a published order's spirit: Mamba first, attention in the middle,
# MLP and MoE after Mamba layers. ~3.4 M parameters, ~7 MB in bf16.
MODEL = dict(
    hybrid_override_pattern="M-ME*M-ME",
    vocab_size=3072, hidden_size=192, tie_word_embeddings=False,
    num_attention_heads=4, num_key_value_heads=2, head_dim=48,
    mamba_num_heads=6, mamba_head_dim=64, n_groups=2, ssm_state_size=64, conv_kernel=4, chunk_size=128,
    intermediate_size=384, mlp_hidden_act="relu2",
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
    moe_shared_expert_intermediate_size=192, n_group=1, topk_group=1, routed_scaling_factor=2.5,
    norm_topk_prob=True,
    layer_norm_epsilon=1e-5, max_position_embeddings=4096,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("seconds", type=float, help="training time budget")
    p.add_argument("roots", nargs="*", type=Path, help="text roots (default: this Python's standard library)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: time only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (linear)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this tokenizer.json (made by this script from the same corpus and seed) "
                        "instead of training one")
    return p.parse_intermixed_args()


def standard_library_roots() -> list[Path]:
    return [Path(os.__file__).parent]


def corpus_files(roots: list[Path]) -> list[Path]:
    # site-packages sits inside the standard library's folder; installed packages are not the corpus.
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for r in roots for p in r.rglob("*")
                  if p.suffix in TEXT_SUFFIXES and p.is_file() and not skip & set(p.parts))


def read_texts(files: list[Path], seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) texts; the held-out files (one in fifty, by a seeded shuffle) are never trained on."""
    files = list(files)
    random.Random(seed).shuffle(files)
    texts, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if 200 < len(text) < 400_000:
            texts.append(text)
            size += len(text)
        if size > MAX_CORPUS_CHARS:
            break
    held = max(1, len(texts) // 50)
    return texts[held:], texts[:held]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_all(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    return torch.tensor([i for e in tok.encode_batch(texts) for i in e.ids + [eos]], dtype=torch.int32)


def build_model(eos_id: int, device: str):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(**MODEL, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return NemotronHForCausalLM(config).to(device)


def random_batch(ids: torch.Tensor, g: torch.Generator, device: str) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - SEQ_LEN - 1, (BATCH,), generator=g)
    return torch.stack([ids[s:s + SEQ_LEN + 1] for s in starts.tolist()]).long().to(device)


def learning_rate(step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine from PEAK_LR down to a tenth of it."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return PEAK_LR * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, device: str) -> float:
    """Mean next-token loss over consecutive SEQ_LEN windows of the held-out ids, in float32."""
    windows = tokens[: tokens.numel() // SEQ_LEN * SEQ_LEN].long().view(-1, SEQ_LEN)
    total, count = 0.0, 0
    for chunk in windows.split(16):
        x = chunk.to(device)
        logits = model(x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def expose_mamba_triton_kernels() -> None:
    """Let `import mamba_ssm.ops.triton.*` work when the package root cannot be imported.

    A mamba-ssm built without its CUDA extension (MAMBA_SKIP_CUDA_BUILD) fails at `import mamba_ssm`
    (the root imports the Mamba-1 extension), yet its Triton kernels, which transformers uses, need only
    triton, torch and einops. Registering the bare package lets transformers reach them.
    """
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or "mamba_ssm" in sys.modules:
        return
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__version__ = importlib.metadata.version("mamba_ssm")
        sys.modules["mamba_ssm"] = package


def mamba_kernels_loaded() -> bool:
    import sys

    return "mamba_ssm.ops.triton.ssd_combined" in sys.modules  # the chunked scan that training runs


def train(model, ids: torch.Tensor, args, device: str) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    model.train()
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < args.seconds and (args.steps is None or step < args.steps):
        progress = max((time.time() - t0) / args.seconds, step / args.steps if args.steps else 0.0)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, progress, args.warmup)
        x = random_batch(ids, g, device)
        with autocast:
            loss = model(x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0 or step == 1:
            recent = losses[-100:]
            print(f"step {step} loss {sum(recent) / len(recent):.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return {"steps": step, "seconds": round(time.time() - t0, 1), "tokens_seen": step * BATCH * SEQ_LEN,
            "first_loss": losses[0], "train_loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])),
            "loss_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4)
                               for i in range(0, len(losses), 100)]}


def save(out: Path, model, tok: Tokenizer, heldout: torch.Tensor, results: dict) -> None:
    model_dir = out / "model"
    model.save_pretrained(model_dir)  # one model.safetensors: the model is far below the shard size
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
         "model_max_length": MODEL["max_position_embeddings"]}, indent=1) + "\n")
    save_file({"tokens": heldout.contiguous()}, str(out / "heldout_tokens.safetensors"))
    (out / "train_results.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    import transformers

    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        expose_mamba_triton_kernels()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    roots = args.roots or standard_library_roots()
    train_texts, held_texts = read_texts(corpus_files(roots), args.seed)
    print(f"corpus: {len(train_texts)} train files, {len(held_texts)} held-out files, "
          f"{sum(map(len, train_texts)) / 1e6:.1f} M chars", flush=True)

    if args.tokenizer:
        tok = Tokenizer.from_file(str(args.tokenizer))
    else:
        tok = train_tokenizer(train_texts, MODEL["vocab_size"])
    ids, heldout = encode_all(tok, train_texts), encode_all(tok, held_texts)[:HELDOUT_TOKENS]
    print(f"tokens: train {ids.numel() / 1e6:.2f} M, held-out {heldout.numel()}", flush=True)

    torch.manual_seed(args.seed)
    model = build_model(tok.token_to_id(EOS), device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters, pattern {MODEL['hybrid_override_pattern']}", flush=True)
    run = train(model, ids, args, device)

    # Measure the weights that ship: bf16, computed in float32.
    model.to(torch.bfloat16)
    shipped_loss = heldout_loss(model.float(), heldout, device)
    model.to(torch.bfloat16)
    results = {
        "params": params, "pattern": MODEL["hybrid_override_pattern"], "seed": args.seed, "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "mamba_kernels": mamba_kernels_loaded(), "seq_len": SEQ_LEN, "batch": BATCH, "peak_lr": PEAK_LR,
        "warmup_steps": args.warmup, "step_limit": args.steps, "seconds_limit": args.seconds,
        "tokenizer": str(args.tokenizer) if args.tokenizer else "trained by this run",
        **run,
        "train_tokens_available": ids.numel(), "heldout_tokens": heldout.numel(),
        "heldout_loss": shipped_loss, "heldout_perplexity": math.exp(shipped_loss),
        "uniform_loss": math.log(MODEL["vocab_size"]),
        "corpus": {"roots": [str(r) for r in roots], "train_files": len(train_texts),
                   "heldout_files": len(held_texts), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": __import__("tokenizers").__version__},
    }
    save(args.out, model, tok, heldout, results)
    print(json.dumps({k: v for k, v in results.items() if k != "loss_every_100"}), flush=True)


if __name__ == "__main__":
    main()
