"""`nemoconv quantize --analyze`'s table: each linear alone in FP8, worst first, and what it means."""

from __future__ import annotations

from rich.console import Console


def render_analysis(result: dict, console: Console, limit: int = 40) -> None:
    from rich.table import Table  # rich's tables only when a table is shown: `nemoconv --version` stays quick

    c, p, a = result["calibration"], result["probe"], result["analysis"]
    fisher = a["method"] == "fisher"
    table = Table(title=f"FP8 sensitivity: each linear alone in FP8 ({p['tokens']} probe tokens, "
                        f"{c['tokens']} calibration tokens, {result['device']})", title_justify="left")
    columns = [("#", "right"), ("module", "left"), ("kind", "left"), ("preset", "center"), ("SQNR dB", "right")]
    columns += [("est. KL", "right")] if fisher else []
    for col, justify in columns + [("KL(ref‖q)", "right"), ("top-1 Δ", "right")]:
        table.add_column(col, justify=justify, no_wrap=col == "module")
    for row in result["modules"][:limit]:
        est = [_num(row["est_kl"], "{:.2e}")] if fisher else []
        table.add_row(str(row["rank"]), row["module"].removeprefix("backbone."), row["kind"],
                      "✓" if row["in_preset"] else "", _num(row["sqnr_db"], "{:.1f}"), *est,
                      _num(row["kl"], "{:.2e}"), _num(row["top1_change"], "{:.2%}"))
    console.print(table)
    if len(result["modules"]) > limit:
        console.print(f"… and {len(result['modules']) - limit} more (all in the JSON report)", highlight=False)
    t = result["timings_s"]
    if fisher:
        console.print(f"est. KL: second-order (Fisher) estimate, {a['label_samples']} label samples per probe "
                      f"sequence; KL and top-1 Δ measured exactly for the {a['exact_top_k']} worst by it (— elsewhere; "
                      f"--analyze-method exact measures all).", highlight=False)
    console.print(f"time: calibrate {t['calibrate']:.1f}s, analyse {t['analyze']:.1f}s "
                  f"({p['sweeps']} sweep(s) of ≤ {p['streams_per_sweep']} streams); "
                  f"preset ✓ = quantized by --preset {result['preset']}. Keep the worst in bf16 with --exclude, "
                  f"or let --max-kl choose.", highlight=False)


def _num(x, fmt: str) -> str:
    return "—" if x is None else fmt.format(x)
