"""`nemoconv inspect`'s report for people: layers, dimensions, parameters, dtypes, quantization, shards, check."""

from __future__ import annotations

from rich.console import Console

from nemoconv.cli.render import human_bytes, human_count


def render_inspect(info: dict, out: Console) -> None:
    m = info["model"]
    out.print(f"[bold]{info['path']}[/bold]  scheme [cyan]{info['scheme']}[/cyan]")
    out.print(_layers_table(m))
    out.print(f"pattern  {m['pattern']}" + (f"   mtp pattern {m['mtp_pattern']}" if m["mtp_depth"] else ""))
    out.print(_dimensions_table(m))
    out.print(f"parameters {human_count(info['parameters'])} ({info['parameters']:,})"
              + (f", MTP {human_count(info['mtp_parameters'])}" if info["mtp_parameters"] else ""))
    out.print("dtypes     " + ", ".join(f"{k} ×{v}" for k, v in info["dtypes"].items()))
    q = info["quantization"]
    out.print("quantized  " + ("no" if not q else
                               f"{q['algo'] or 'FP8'} ({q['method'] or 'unknown format'}): {q['fp8_weights']} FP8 "
                               f"weights, {q['scales']} scales, {q['excluded_modules']} excluded modules"))
    s = info["shards"]
    out.print(f"shards     {s['count']} file(s), {human_bytes(s['bytes'])} of tensors")
    check = info["check"]
    out.print("check      " + ("[green]every tensor matches config.json[/green]" if check["ok"] else
                               "[red]FAILED[/red] (see the error line)"), highlight=False)


def _layers_table(m: dict):
    from rich.table import Table  # rich's tables only when a table is shown: `nemoconv --version` stays quick

    layers = Table(title="Layers", show_edge=False)
    for col in ("total", "mamba", "attention", "mlp", "moe", "mtp depth"):
        layers.add_column(col, justify="right")
    c = m["counts"]
    layers.add_row(str(m["layers"]), str(c["mamba"]), str(c["attention"]), str(c["mlp"]), str(c["moe"]),
                   str(m["mtp_depth"]))
    return layers


def _dimensions_table(m: dict):
    from rich.table import Table

    dims = Table(title="Dimensions", show_header=False, show_edge=False)
    dims.add_row("hidden / vocab", f"{m['hidden_size']} / {m['vocab_size']}")
    a = m["attention"]
    dims.add_row("attention", f"{a['heads']} heads, {a['kv_heads']} kv heads of {a['head_dim']}")
    mb = m["mamba"]
    dims.add_row("mamba", f"{mb['heads']} heads of {mb['head_dim']}, {mb['groups']} groups, state {mb['state']}")
    dims.add_row("mlp", str(m["mlp_intermediate_size"]))
    if m["moe"]:
        e = m["moe"]
        latent = f", latent {e['latent_size']}" if e["latent_size"] else ""
        dims.add_row("moe", f"{e['experts']} experts, top-{e['top_k']}, inter {e['intermediate_size']}, "
                            f"shared {e['shared_intermediate_size']}{latent}")
    return dims
