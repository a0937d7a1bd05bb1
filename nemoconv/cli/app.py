"""The `nemoconv` command line (DESIGN.md §3). Exit codes: 0 ok, 1 verification failed, 2 bad input."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from nemoconv.errors import Interrupted, NemoconvError, VerificationFailed
from nemoconv.limits import MAX_CALIB_SAMPLES, MAX_NEW_TOKENS, MAX_PROMPTS, MAX_SEQ_LEN
from nemoconv.progress import Progress
from nemoconv.version import __version__

app = typer.Typer(
    name="nemoconv",
    help="Convert, quantize, verify and publish NVIDIA Nemotron-H hybrid checkpoints "
    "(Hugging Face, NeMo AutoModel and MAX naming schemes).",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's layout at its width; a pipe or a file gets lines that never wrap in the middle of
    a value (rich would otherwise wrap at 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=10_000, soft_wrap=True)


out = _console()
err = _console(stderr=True)
_state = {"quiet": False, "debug": False}


class Scheme(str, Enum):
    hf = "hf"
    nemo = "nemo"
    max = "max"
    megatron = "megatron"


class FromScheme(str, Enum):
    auto = "auto"
    hf = "hf"
    nemo = "nemo"
    max = "max"
    megatron = "megatron"


class DType(str, Enum):
    keep = "keep"
    bfloat16 = "bfloat16"
    float32 = "float32"


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries (errors still print)."),
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
):
    if version:
        out.print(f"nemoconv {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(0)
    _state["quiet"] = quiet
    _state["debug"] = debug


def progress_bar(description: str) -> Progress:
    """A byte-progress bar as a `(done, total)` callback; nothing when quiet or when stderr is not a terminal."""
    return Progress(description, quiet=_state["quiet"], unit="bytes")


# ---- inspect -----------------------------------------------------------------------------------------


@app.command()
def inspect(
    src: str = typer.Argument(..., help="Checkpoint directory or Hub repo id (org/name[@revision])."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    from_: FromScheme = typer.Option(FromScheme.auto, "--from", help="Naming scheme of SRC (auto-detected)."),
):
    """Show a checkpoint's scheme, layer layout, dimensions, parameters, dtypes, quantization and shards, and
    check every tensor against config.json (exit 2 naming the first problem, as convert and verify would)."""
    from nemoconv.commands.inspect import inspect_checkpoint

    info = inspect_checkpoint(src, scheme=from_.value)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        _render_inspect(info)
    for warning in info["warnings"]:
        if as_json:
            print(f"warning: {warning}", file=sys.stderr)
        else:
            out.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if not info["check"]["ok"]:  # shown, then exit 2: the checkpoint cannot be converted or verified as it is
        raise NemoconvError(f"{info['path']}: {info['check']['error']}")


def _render_inspect(info: dict) -> None:
    from rich.table import Table

    from nemoconv.commands.inspect import human_bytes, human_count

    m = info["model"]
    out.print(f"[bold]{info['path']}[/bold]  scheme [cyan]{info['scheme']}[/cyan]")
    layers = Table(title="Layers", show_edge=False)
    for col in ("total", "mamba", "attention", "mlp", "moe", "mtp depth"):
        layers.add_column(col, justify="right")
    c = m["counts"]
    layers.add_row(str(m["layers"]), str(c["mamba"]), str(c["attention"]), str(c["mlp"]), str(c["moe"]),
                   str(m["mtp_depth"]))
    out.print(layers)
    out.print(f"pattern  {m['pattern']}" + (f"   mtp pattern {m['mtp_pattern']}" if m["mtp_depth"] else ""))
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
    out.print(dims)
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


# ---- convert -----------------------------------------------------------------------------------------


@app.command()
def convert(
    src: str = typer.Argument(..., help="Source checkpoint directory or Hub repo id."),
    dst: Path = typer.Argument(..., metavar="OUT", help="Output directory (written atomically)."),
    to: Scheme = typer.Option(..., "--to", help="Target naming scheme."),
    from_: FromScheme = typer.Option(FromScheme.auto, "--from", help="Source scheme (auto-detected)."),
    dtype: DType = typer.Option(DType.keep, "--dtype", help="Cast floating-point weights (FP8 and scales kept)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard, e.g. 5GB, 500MB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT (only once complete)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, write nothing."),
    iteration: Optional[int] = typer.Option(None, "--iteration", min=0,
                                            help="Megatron source: which iter_* checkpoint (default: the latest)."),
    config_file: Optional[Path] = typer.Option(None, "--config",
                                               help="Megatron source: its HF config.json (when it carries none)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Discard what an interrupted run left and start over."),
):
    """Convert a checkpoint between the hf, nemo, max and megatron naming schemes, bit-exactly where lossless.

    Every tensor is checked against config.json before anything is written; every source tensor is
    written or reported as dropped; lossy steps are listed in the summary and nemoconv-manifest.json.
    """
    from nemoconv.commands.convert import convert as do_convert
    from nemoconv.commands.inspect import human_bytes

    with progress_bar(f"convert → {to.value}") as progress:
        manifest = do_convert(src, dst, to=to.value, from_=from_.value, dtype=dtype.value,
                              max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run,
                              progress=progress, iteration=iteration, config_file=config_file,
                              resume=not no_resume)
    if _state["quiet"] and not dry_run:
        return
    verb = "plan" if dry_run else "wrote"
    out.print(f"{verb}: {manifest['scheme_from']} → {manifest['scheme_to']}: {manifest['tensors_in']} tensors "
              f"({human_bytes(manifest['bytes_in'])}) → {manifest['tensors_out']} tensors "
              f"({human_bytes(manifest['bytes_out'])})" + ("" if dry_run else f" in {dst}"))
    if manifest["lossless"]:
        out.print("[green]lossless[/green]: round trips are bit-exact")
    else:
        out.print(f"[yellow]{len(manifest['lossy_steps'])} lossy step(s)[/yellow]:")
        for step in manifest["lossy_steps"]:
            out.print(f"  {step['step']:<5} {step['tensor']}: {step['detail']}", markup=False, highlight=False,
                      soft_wrap=True)
    for warning in manifest.get("warnings", []):
        out.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    if manifest["files_not_carried"]:
        from rich.markup import escape

        out.print("[yellow]not carried[/yellow]: " + escape("; ".join(
            f"{name} ({why})" for name, why in manifest["files_not_carried"].items())), highlight=False, soft_wrap=True)
    if dry_run:
        out.print("dry run: nothing written")


# ---- quantize ----------------------------------------------------------------------------------------


class Preset(str, Enum):
    default = "default"
    conservative = "conservative"
    aggressive = "aggressive"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Calibrator(str, Enum):
    auto = "auto"
    modelopt = "modelopt"
    builtin = "builtin"


class QuantScheme(str, Enum):
    hf = "hf"
    max = "max"


class KVCache(str, Enum):
    none = "none"
    fp8 = "fp8"


@app.command()
def quantize(
    src: str = typer.Argument(..., help="bf16/fp32 source checkpoint (any scheme) or Hub repo id."),
    dst: Optional[Path] = typer.Argument(None, metavar="[OUT]", help="Output directory for the FP8 checkpoint "
                                         "(not with --analyze, which writes no checkpoint)."),
    preset: Preset = typer.Option(Preset.default, "--preset",
                                  help="default: Mamba in/out + MLP up/down; conservative: MLP only; "
                                       "aggressive: default + MoE routed and shared experts."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob of module names to keep unquantized (repeatable)."),
    calib_file: Optional[Path] = typer.Option(None, "--calib-file", help="Text lines, or JSONL with text/input_ids."),
    calib_samples: int = typer.Option(128, "--calib-samples", min=1, max=MAX_CALIB_SAMPLES,
                                       help="Calibration sequences."),
    calib_seq_len: int = typer.Option(512, "--calib-seq-len", min=1, max=MAX_SEQ_LEN,
                                       help="Tokens per calibration sequence."),
    device: Device = typer.Option(Device.auto, "--device", help="Where calibration runs."),
    to: QuantScheme = typer.Option(QuantScheme.hf, "--to", help="Naming scheme of the output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    calibrator: Calibrator = typer.Option(Calibrator.auto, "--calibrator",
                                          help="Who observes the input amax: modelopt (nvidia-modelopt 0.47), builtin "
                                               "(nemoconv's hooks, same values), auto (modelopt when it imports, else "
                                               "builtin; the summary says which)."),
    analyze: bool = typer.Option(False, "--analyze", help="Write no checkpoint: measure, for every linear any preset "
                                 "could quantize, its FP8 weight SQNR and the KL / top-1 change of the logits when "
                                 "only it is FP8; a table sorted by harm."),
    analyze_samples: Optional[int] = typer.Option(None, "--analyze-samples", min=1, max=MAX_CALIB_SAMPLES,
                                                  help="Calibration sequences the --analyze probe runs "
                                                       "(default: 1/16 of --calib-samples)."),
    report: Optional[Path] = typer.Option(None, "--report", help="With --analyze: write the analysis as JSON here."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Quality budget: keep the most harmful mixers in "
                                           "bf16 until KL(ref‖FP8) on held-out prompts is at most this."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Quality budget: top-1 agreement on held-out "
                                             "prompts at least this (with or without --max-kl)."),
    kv_cache: KVCache = typer.Option(KVCache.none, "--kv-cache", help="fp8: also write FP8 KV-cache scales "
                                     "(k_scale/v_scale) for the attention layers, as ModelOpt does (the max "
                                     "scheme drops them)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Discard what an interrupted run left and start over."),
):
    """Per-tensor static FP8 (E4M3) in ModelOpt's format, calibrated by running the built-in model.

    With --analyze, writes no checkpoint (OUT must be omitted) and reports which linears FP8 hurts.
    """
    from nemoconv.commands.quantize import quantize as do_quantize
    from nemoconv.cli.render_quantize import render_summary

    if analyze:
        _analyze(src, dst, preset, exclude, calib_file, calib_samples, calib_seq_len, device, to, overwrite,
                 analyze_samples, report, max_kl, min_top1, kv_cache)
        return
    if dst is None:
        raise NemoconvError("quantize needs OUT (the output directory), unless --analyze is given")
    if report is not None or analyze_samples is not None:
        raise NemoconvError("--report and --analyze-samples go with --analyze")
    result = do_quantize(src, dst, preset=preset.value, exclude=exclude, calib_file=calib_file,
                         calib_samples=calib_samples, calib_seq_len=calib_seq_len, device=device.value,
                         to=to.value, overwrite=overwrite, quiet=_state["quiet"], calibrator=calibrator.value,
                         max_kl=max_kl, min_top1=min_top1, kv_cache=kv_cache.value, resume=not no_resume)
    if not _state["quiet"]:
        render_summary(result, out)


def _analyze(src, dst, preset, exclude, calib_file, calib_samples, calib_seq_len, device, to, overwrite,
             analyze_samples, report, max_kl, min_top1, kv_cache) -> None:
    from nemoconv.commands.verify import _check_report_path
    from nemoconv.quant.analyze import analyze_fp8, render_analysis, write_analysis

    unused = [flag for flag, given in (("OUT", dst is not None), ("--exclude", bool(exclude)),
                                       ("--to", to != QuantScheme.hf), ("--overwrite", overwrite),
                                       ("--max-kl", max_kl is not None), ("--min-top1", min_top1 is not None),
                                       ("--kv-cache", kv_cache != KVCache.none)) if given]
    if unused:
        raise NemoconvError(f"--analyze writes no checkpoint; drop {', '.join(unused)} (use --report FILE for JSON)")
    if report is not None:
        _check_report_path(report)
    result = analyze_fp8(src, preset=preset.value, calib_file=calib_file, calib_samples=calib_samples,
                         calib_seq_len=calib_seq_len, probe_samples=analyze_samples, device=device.value,
                         quiet=_state["quiet"])
    if report is not None:
        write_analysis(result, report)
    if not _state["quiet"]:
        render_analysis(result, out)


# ---- verify ------------------------------------------------------------------------------------------


class Profile(str, Enum):
    auto = "auto"
    exact = "exact"
    bf16 = "bf16"
    fp8 = "fp8"


class VDType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


@app.command()
def verify(
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
    from nemoconv.commands.verify import render_report
    from nemoconv.commands.verify import verify as do_verify

    result = do_verify(reference, candidate, prompts=prompts, num_prompts=num_prompts, seq_len=seq_len,
                       max_new_tokens=max_new_tokens, device=device.value, dtype=dtype.value,
                       profile=profile.value, report_path=report,
                       overrides={"min_cosine": min_cosine, "min_top1": min_top1, "max_kl": max_kl,
                                  "max_abs": max_abs},
                       quiet=_state["quiet"], prefix_cache=prefix_cache, allow_tokenizer_diff=allow_tokenizer_diff)
    render_report(result, out if not _state["quiet"] else None, fail_line=False)
    if not result.passed:
        raise VerificationFailed(result.failure_line())


# ---- upload ------------------------------------------------------------------------------------------


@app.command()
def upload(
    directory: Path = typer.Argument(..., metavar="DIR", help="Checkpoint directory to publish."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repo ORG/NAME (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if needed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and the commit message."),
    force: bool = typer.Option(False, "--force", help="Upload even without a passing verify report."),
):
    """Publish a checkpoint to the Hugging Face Hub (HF_TOKEN or `hf auth login` is honoured).

    Refuses a checkpoint whose nemoconv-verify.json does not bind a PASS to the files on disk, unless --force.
    Up to 2 GB: one commit. Larger: huggingface_hub's resumable folder upload (run the same command again after
    an interruption; what was committed is skipped), with its progress bars.
    """
    from nemoconv.checkpoint.hub import upload as do_upload
    from nemoconv.commands.inspect import human_bytes

    plan = do_upload(directory, repo_id, private=private, revision=revision, dry_run=dry_run, force=force,
                     quiet=_state["quiet"])
    if _state["quiet"]:
        return
    target = plan["repo_id"] + (f"@{plan['revision']}" if plan["revision"] else "")
    out.print(f"{'would upload' if dry_run else 'uploaded'} {len(plan['files'])} files "
              f"({human_bytes(sum(f['bytes'] for f in plan['files']))}) to {target}")
    for f in plan["files"]:
        out.print(f"  {f['path']}  {human_bytes(f['bytes'])}", markup=False, highlight=False)
    out.print(f"commit message: {plan['commit_message']}", markup=False, highlight=False)
    out.print(f"method: {plan['method']}", markup=False, highlight=False)
    if plan.get("commit_url"):
        out.print(plan["commit_url"])


# ---- demo --------------------------------------------------------------------------------------------


@app.command()
def demo(
    directory: Optional[Path] = typer.Argument(None, metavar="[DIR]", help="Work directory (default: a temp dir)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse a non-empty DIR: the demo's own outputs in it "
                                   "are replaced; nothing else in it is touched."),
):
    """Run the whole workflow on the small trained Nemotron-H that ships with nemoconv (no download)."""
    from nemoconv.commands.demo import run_demo

    run_demo(directory, console=None if _state["quiet"] else out, overwrite=overwrite)


# ---- entry point -------------------------------------------------------------------------------------


_GLOBAL_FLAGS = ("--quiet", "-q", "--debug")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --quiet and --debug may be written anywhere on the line: move them before the command
    flags = [a for a in argv if a in _GLOBAL_FLAGS]
    argv = flags + [a for a in argv if a not in _GLOBAL_FLAGS]
    _SIGNALLED.clear()
    try:
        with _signals_unwind():
            return _run(argv, debug="--debug" in argv)
    except Interrupted as exc:  # arrived between installing the handlers and _run's own try
        _one_line(INTERRUPTED_LINE)
        return exc.exit_code


def _run(argv: list[str], debug: bool) -> int:
    click = _click()
    command = typer.main.get_command(app)
    try:
        # without standalone mode Typer returns the exit code of a typer.Exit instead of raising it
        code = command.main(args=argv, prog_name="nemoconv", standalone_mode=False)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except Interrupted as exc:
        _one_line(INTERRUPTED_LINE)
        return exc.exit_code
    except BaseException as exc:
        if _SIGNALLED and not debug:
            # the signal surfaced as another error (it broke an import, or library code wrapped it): an interrupt
            _one_line(INTERRUPTED_LINE)
            return 128 + _SIGNALLED[0]
        return _report(exc, click, debug)


def _report(exc: BaseException, click, debug: bool) -> int:
    """The exit code and one line for an exception that ended a command."""
    try:
        raise exc
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _one_line("aborted")
        return 2
    except click.exceptions.NoArgsIsHelpError as exc:
        out.print(exc.format_message() if hasattr(exc, "format_message") else "", markup=False, highlight=False)
        return 0
    except click.ClickException as exc:  # usage errors: one line
        _one_line(f"error: {exc.format_message()}")
        return 2
    except VerificationFailed as exc:
        if debug:
            raise
        _one_line(f"FAIL: {exc}")
        return 1
    except NemoconvError as exc:
        if debug:
            raise
        _one_line(f"error: {exc}")
        return 2
    except KeyboardInterrupt:  # raised before our handler was installed, or by code that raises it itself
        _one_line(INTERRUPTED_LINE)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback unless --debug
        if debug:
            raise
        _one_line(f"error: {type(exc).__name__}: {exc} (run with --debug for a traceback)")
        return 2


# Outputs are written into a temporary directory that is removed on the way out, and verify writes its
# record only after a complete run: an interrupt leaves nothing behind.
INTERRUPTED_LINE = "interrupted: nothing written"
INTERRUPTED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
_SIGNALLED: list[int] = []  # the signals this process received while a command ran


@contextmanager
def _signals_unwind():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so the command unwinds through its
    `finally` blocks and atomic outputs (temporary directory removed) and main returns 130/143. A second
    signal during that cleanup is ignored, so the cleanup finishes. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        _SIGNALLED.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _click():
    """The click that Typer runs on (recent Typer versions vendor their own copy)."""
    try:
        from typer import _click as vendored

        return vendored
    except ImportError:
        import click

        return click


def _one_line(message: str) -> None:
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()


def run() -> None:
    code = main()
    if code in INTERRUPTED_CODES:
        # Cleanup is done; a worker thread still finishing a read or a hash must not hold the exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

