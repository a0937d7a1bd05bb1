"""What `nemoconv quantize` did, for people: targets, exclusions and why, calibration, size, notes."""

from __future__ import annotations

from nemoconv.cli.render import human_bytes
from nemoconv.quant.targets import KIND_LABELS, WHY_NEVER


def _calibrator_hint(c: dict) -> str:
    """Say how to get ModelOpt's calibrator when auto fell back to the builtin one."""
    if c.get("calibrator_used") == "builtin" and "nvidia-modelopt" in c["calibrator"]:
        return " — the builtin observers give ModelOpt's amax values; pip install 'nemoconv[modelopt]' for ModelOpt's own"
    return ""


def render_summary(result: dict, console) -> None:
    """What quantize did, for people: targets, exclusions and why, calibration, size, notes."""
    q = result["quantization"]
    console.print(f"[bold]quantized[/bold] {len(q['targets'])} linears to FP8 E4M3 (per-tensor static, ModelOpt "
                  f"format), preset [cyan]{q['preset']}[/cyan], {result['scheme_from']} → {result['scheme_to']} "
                  f"scheme: {human_bytes(result['bytes_in'])} → {human_bytes(result['bytes_out'])}"
                  + (f" in {result['output']}" if result.get("output") else ""), highlight=False)
    kinds: dict[str, int] = {}
    for m in q["modules"].values():
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    console.print("  quantized: " + ", ".join(f"{n} {KIND_LABELS[k]}" for k, n in kinds.items()), highlight=False)
    for line in _exclusion_lines(q):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    _print_calibration(q, console)
    _print_tail(result, console)


def _exclusion_lines(q: dict) -> list[str]:
    """Who stayed unquantized and why: --exclude, pairs, unscalable, the quality budget, the preset."""
    reasons: dict[str, list[dict]] = {}
    for e in q["excluded"]:
        reasons.setdefault(e["reason"], []).append(e)
    lines = []
    user = reasons.get("--exclude", [])
    if user:
        lines.append(f"  excluded by --exclude: {len(user)}")
        lines += [f"    {e['module']}  ({e['detail']})" for e in user[:8]]
        if len(user) > 8:
            lines.append(f"    … and {len(user) - 8} more (see nemoconv-manifest.json)")
    pairs = reasons.get("pair", [])
    if pairs:
        lines.append(f"  excluded with their pair: {len(pairs)} (MAX reads a mixer's projections as FP8 together)")
        by_partner: dict[str, list[str]] = {}
        for e in pairs:
            by_partner.setdefault(e["with"], []).append(e["module"])
        for partner, members in by_partner.items():
            what = ", ".join(members) if len(members) <= 2 else f"{len(members)} projections of its mixer"
            lines.append(f"    {what}: kept with {partner}")
    unscalable = reasons.get("unscalable", [])
    if unscalable:
        lines.append(f"  excluded, no valid FP8 scale: {len(unscalable)}")
        lines += [f"    {e['module']}  ({e['detail']})" for e in unscalable[:8]]
    lines += _budget_lines(q.get("budget"))
    preset = reasons.get("preset", [])
    if preset:
        lines.append(f"  left out by the preset: {len(preset)} ({preset[0]['detail']})")
    return lines


def _budget_lines(budget: dict | None) -> list[str]:
    if not budget:
        return []
    r, p0 = budget["result"], budget["preset_result"]
    held = budget["heldout"]
    lines = [f"  quality budget ({_budget_text(budget)}) on {held['prompts']} held-out prompts × "
             f"{held['seq_len']} tokens: the preset gives KL {p0['kl']:.3g}, top-1 {p0['top1_agreement']:.4f}; "
             f"with {r['kept']} mixer(s) kept in bf16: KL {r['kl']:.3g}, top-1 {r['top1_agreement']:.4f}"]
    for k in budget["kept_in_bf16"]:
        lines.append(f"    {k['mixer']}  (rank {k['rank']}: FP8 in it alone costs KL {k['kl_alone']:.3g})")
    return lines


def _print_calibration(q: dict, console) -> None:
    c = q["calibration"]
    never = ", ".join(f"{n} {WHY_NEVER[k]}{'s' if n > 1 else ''}" for k, n in q["never_quantized"].items())
    console.print(f"  never quantized: {never}; exclude_modules names {q['exclude_modules']} modules", highlight=False)
    console.print(f"  calibration: {c['samples']} × {c['seq_len']} tokens of {c['source']}, on {c['device']} "
                  f"({c['dtype']})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  calibrator: {c['calibrator']}" + _calibrator_hint(c), markup=False, highlight=False,
                  soft_wrap=True)
    filled = [(name, m) for name, m in q["modules"].items() if "input_amax_filled" in m]
    if filled:
        console.print(f"  [yellow]{len(filled)} expert projection(s) got no calibration token[/yellow]; their "
                      f"input_scale is the max of their layer's experts (e.g. {filled[0][0]})", highlight=False)
    for note in q["notes"]:
        if "no calibration token" not in note:
            console.print(f"  [yellow]note[/yellow]: {note}", highlight=False)


def _print_tail(result: dict, console) -> None:
    """The KV-cache scales, the command that checks the budget, and the time each step took."""
    q = result["quantization"]
    kv = q.get("kv_cache")
    if kv and kv["written"]:
        top = max(v["scale"] for v in kv["scales"].values())
        console.print(f"  KV cache: FP8 scales for {len(kv['scales']) // 2} attention layer(s) (k_scale/v_scale = "
                      f"amax / 448, largest {top:.3g}); kv_cache_quant_algo FP8", highlight=False)
    elif kv:
        console.print(f"  [yellow]KV cache[/yellow]: {kv['note']}", highlight=False)
    budget = q.get("budget")
    if budget:
        console.print(f"  check it with the same budget: {budget['verify_command']}", markup=False, highlight=False,
                      soft_wrap=True)
    t = result.get("timings_s")
    if t:
        console.print(f"  time: plan {t['plan']:.1f}s, calibrate {t['calibrate']:.1f}s, write {t['write']:.1f}s",
                      highlight=False)


def _budget_text(budget: dict) -> str:
    return ", ".join(f"{flag} {budget[key]:g}" for flag, key in (("--max-kl", "max_kl"), ("--min-top1", "min_top1"))
                     if budget.get(key) is not None)
