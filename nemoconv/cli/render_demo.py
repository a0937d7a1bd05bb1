"""`nemoconv demo`'s lines, one per step as it completes (the steps: nemoconv.commands.demo)."""

from __future__ import annotations

from rich.console import Console


def demo_line(step: dict) -> str:
    """The rich-markup line for one step of the demo."""
    event = step["event"]
    if event == "copied":
        return (f"[bold]copied[/bold] the shipped trained Nemotron-H (bf16, pattern {step['pattern']}, its own "
                f"tokenizer) to {step['path']}")
    if event == "converted":
        return (f"convert {step['from']} → {step['to']:<4}: {step['tensors_in']} → {step['tensors_out']} tensors, "
                f"{'lossless' if step['lossless'] else 'lossy'}")
    if event == "chained":
        return f"convert {step['from']} → {step['to']}: {step['tensors_out']} tensors"
    if event == "round_trip":
        return f"round trip {' → '.join(step['path'])}: {_bit_exact(step['bit_exact'])}"
    if event == "verified":
        return (f"verify {step['reference']} vs {step['candidate']:<4}: {_verdict(step['passed'])} "
                f"(profile {step['profile']}, {step['num_prompts']} prompts × {step['seq_len']} tokens)")
    if event == "quantized":
        return (f"quantize FP8 ({step['preset']} preset, {step['linears']} linears) + verify at the CLI defaults: "
                f"{_verdict(step['passed'])} (profile {step['profile']}: cosine {step['cosine_mean']:.5f}, "
                f"KL {step['kl_mean']:.5f}, top-1 {step['top1_agreement']:.3f}; calibrated by {step['calibrator']})")
    if event == "complete":
        return f"[bold green]demo complete[/bold green]: outputs in {step['directory']}"
    raise ValueError(f"unknown demo step {event!r}")


def printer(out: Console):
    """An `on_step` callback that prints each step's line on `out`."""
    return lambda step: out.print(demo_line(step))


def _verdict(passed: bool) -> str:
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def _bit_exact(same: bool) -> str:
    return "[green]bit-exact[/green]" if same else "[red]DIFFERS[/red]"
