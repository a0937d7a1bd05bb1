"""`nemoconv verify REFERENCE CANDIDATE`: the parity gate (exit 1 when it fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nemoconv.cli.choices import Device, Profile, StreamLayers, VDType
from nemoconv.cli.options import options_of
from nemoconv.cli.render import stdout_console
from nemoconv.errors import VerificationFailed
from nemoconv.limits import MAX_NEW_TOKENS, MAX_PROMPTS, MAX_SEQ_LEN


def verify(
    ctx: typer.Context,
    reference: str = typer.Argument(..., help="Reference checkpoint (the source of a conversion)."),
    candidate: str = typer.Argument(..., help="Candidate checkpoint (converted or quantized)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="One prompt per line, or JSONL with text/input_ids."),
    num_prompts: int = typer.Option(4, "--num-prompts", min=1, max=MAX_PROMPTS,
                                    help="Built-in prompts to use without --prompts."),
    seq_len: int = typer.Option(64, "--seq-len", min=2, max=MAX_SEQ_LEN,
                                help="Tokens per prompt (truncated or generated to this)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=0, max=MAX_NEW_TOKENS,
                                       help="Greedy continuation length."),
    device: Device = typer.Option(Device.auto, "--device", help="auto: CUDA when available, else CPU."),
    dtype: VDType = typer.Option(VDType.auto, "--dtype", help="auto: float32 on CPU, bfloat16 on CUDA."),
    profile: Profile = typer.Option(Profile.auto, "--profile", help="Thresholds; auto: from the tensors' dtypes."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full result as JSON here."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Override the profile's cosine threshold."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Override the top-1 agreement threshold."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Override the KL(ref‖cand) threshold."),
    max_abs: Optional[float] = typer.Option(None, "--max-abs", help="Override the max abs logit diff threshold."),
    prefix_cache: bool = typer.Option(False, "--prefix-cache", help="Also generate prompts sharing a long prefix "
                                      "with prefix caching (memory and state modes); the tokens and logits "
                                      "must equal those without caching."),
    allow_tokenizer_diff: bool = typer.Option(False, "--allow-tokenizer-diff", help="Accept a different tokenizer or "
                                              "generation ids (recorded as an override)."),
    stream_layers: StreamLayers = typer.Option(StreamLayers.auto, "--stream-layers", help="Run the models one layer "
                                               "at a time; auto: when the whole model does not fit the device "
                                               "(or --max-gpu-memory)."),
    max_gpu_memory: Optional[str] = typer.Option(None, "--max-gpu-memory", help="Device memory a streamed run may "
                                                 "use, e.g. 6GB, 512MiB (on --device cpu: host memory)."),
    max_host_memory: Optional[str] = typer.Option(None, "--max-host-memory", help="Host memory a streamed run may "
                                                  "use for spilled states and weights kept between passes."),
):
    """Parity gate: run both checkpoints with the built-in model and compare logits and generations.

    Exit 0 on pass, 1 on fail, 2 on bad input.

    Table columns, per prompt and overall: max|Δ| and mean|Δ| are the largest and the mean absolute logit
    difference; cos and cos min the cosine similarity of the logit vectors (mean, and worst position); KL the
    mean KL(reference‖candidate) of the next-token distributions; top-1 the share of positions where both
    pick the same token; greedy is "same", or "≠@k" when the candidate's greedy continuation first differs at
    new token k; cache is the candidate's cached decode against its own full forward (largest difference,
    relative to the largest logit).

    Profiles: exact (lossless conversions: logits identical, same greedy tokens); bf16 (cos ≥ 0.999, top-1 ≥
    0.99); fp8 (cos ≥ 0.99, top-1 ≥ 0.90, KL ≤ 0.05). auto picks one from the two checkpoints' tensors: FP8
    on one side only → fp8, a narrowing cast → bf16, otherwise exact.
    """
    from nemoconv.cli.render_verify import render_report  # torch: only when the command runs
    from nemoconv.commands.verify import verify as do_verify

    options = options_of(ctx)
    result = do_verify(reference, candidate, prompts=prompts, num_prompts=num_prompts, seq_len=seq_len,
                       max_new_tokens=max_new_tokens, device=device.value, dtype=dtype.value,
                       profile=profile.value, report_path=report,
                       overrides={"min_cosine": min_cosine, "min_top1": min_top1, "max_kl": max_kl,
                                  "max_abs": max_abs},
                       quiet=options.quiet, prefix_cache=prefix_cache, allow_tokenizer_diff=allow_tokenizer_diff,
                       stream_layers=stream_layers.value, max_gpu_memory=max_gpu_memory,
                       max_host_memory=max_host_memory)
    render_report(result, stdout_console(options) if not options.quiet else None, fail_line=False)
    if not result.passed:
        raise VerificationFailed(result.failure_line())
