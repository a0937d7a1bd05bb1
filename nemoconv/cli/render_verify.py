"""`nemoconv verify` on the console: the per-prompt table and the PASS/FAIL line of a `VerifyReport`."""

from __future__ import annotations

import math

from rich import box
from rich.table import Table

from nemoconv.verification.report import VerifyReport, format_number


def render_report(report: VerifyReport, console, fail_line: bool = True) -> None:
    """Per-prompt table and a PASS/FAIL summary line on a rich console (None: print nothing). The CLI passes
    `fail_line=False`: its one FAIL line goes to stderr, and a second copy on stdout would repeat it."""
    if console is None:
        return
    console.print(f"[bold]verify[/bold] {report.reference['path']} → {report.candidate['path']} "
                  f"({report.device}, {report.dtype})")
    console.print(f"profile [cyan]{report.profile}[/cyan]: {report.profile_reason}")
    if report.candidate.get("kv_cache_scales"):
        console.print(f"candidate has an FP8 KV cache ({report.candidate['kv_cache_scales']} k_scale/v_scale tensors): "
                      f"its keys and values pass through FP8, so every number below includes the cache's effect",
                      highlight=False)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False, collapse_padding=True)
    for col in ("prompt", "max|Δ|", "mean|Δ|", "cos", "cos min", "KL", "top-1", "greedy", "cache"):
        table.add_column(col, justify="left" if col == "prompt" else "right", no_wrap=True)
    for i, p in enumerate(report.prompts):
        div = p["greedy_first_divergence"]
        table.add_row(f"#{i}", _short(p["max_abs_diff"]), _short(p["mean_abs_diff"]), f"{p['cosine_mean']:.6f}",
                      f"{p['cosine_min']:.6f}", _short(p["kl_mean"]), f"{p['top1_agreement']:.3f}",
                      "same" if div is None else f"≠@{div}", _short(p["cache_candidate"]["relative"]))
    o = report.overall
    table.add_row("overall", _short(o["max_abs_diff"]), _short(o["mean_abs_diff"]), f"{o['cosine_mean']:.6f}",
                  f"{o['cosine_min']:.6f}", _short(o["kl_mean"]), f"{o['top1_agreement']:.3f}",
                  f"{o['greedy_identical_prompts']}/{o['prompts']}", _short(report.cache["candidate"]["relative_max"]),
                  style="bold")
    console.print(table)
    if report.prefix_cache is not None:
        for mode, m in report.prefix_cache["modes"].items():
            st = m["stats"]
            bits = "bit-identical" if m["logits_bitwise"] else f"within {m['max_abs_diff']:.3g}"
            console.print(f"prefix cache [cyan]{mode}[/cyan]: {'same tokens' if m['identical'] else 'DIFFERENT tokens'}"
                          f" as without caching, logits {bits}; {st['hits']}/{st['requests']} requests hit, "
                          f"{st['kv_blocks_shared']} KV blocks shared ({st['kv_bytes_saved'] / 2**20:.1f} MiB), "
                          f"{st['tokens_skipped']} prompt tokens skipped")
    for note in report.notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    for override in report.overrides:
        console.print(f"[yellow]override[/yellow]: {override}", markup=True, highlight=False)
    if report.passed:
        gated = ", ".join(_describe_pass(c) for c in report.checks if c["metric"] != "nonfinite_candidate_logits")
        console.print(f"[bold green]PASS[/bold green] ({report.profile}): {gated}")
    elif fail_line:
        console.print(f"[bold red]FAIL[/bold red]: {report.failure_line()}")


def _short(x) -> str:
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return f"{x:.4g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
    return format_number(x)


def _describe_pass(c: dict) -> str:
    if c["metric"] == "prefix_cache_identical":
        return "prefix-cached generation identical"
    if c["metric"] == "greedy_divergent_prompts":
        return "greedy tokens identical"
    if c["metric"] == "tokenizer_differences":
        if c["value"]:
            return f"{c['value']} tokenizer difference(s) allowed"
        return "tokenizer and generation ids identical"
    return f"{c['metric']} {_short(c['value'])} {'≥' if c['op'] == '>=' else '≤'} {_short(c['threshold'])}"
