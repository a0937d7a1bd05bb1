"""`nemoconv quantize SRC OUT` (FP8) and `nemoconv quantize SRC --analyze` (which linears FP8 hurts)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nemoconv.cli.choices import AnalyzeMethod, Calibrator, Device, KVCache, Preset, QuantScheme
from nemoconv.cli.options import CliOptions, options_of
from nemoconv.cli.render import stdout_console
from nemoconv.cli.render_analysis import render_analysis
from nemoconv.errors import NemoconvError
from nemoconv.limits import MAX_CALIB_SAMPLES, MAX_SEQ_LEN

ANALYZE_METHOD_HELP = ("fisher (default): a second-order estimate for every linear from one forward and backward pass, "
                       "then the exact KL for the --analyze-top worst by it; exact: the exact KL for every linear "
                       "(one propagated stream each: slow with many linears, e.g. MoE experts).")
ANALYZE_TOP_HELP = ("With --analyze-method fisher: how many linears, worst by the estimate, to measure exactly "
                    "(default 4; 0: estimates only).")


def quantize(
    ctx: typer.Context,
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
    to: QuantScheme = typer.Option("hf", "--to", help="Naming scheme of the output."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Discard what an interrupted run left and start over."),
    calibrator: Calibrator = typer.Option(Calibrator.auto, "--calibrator",
                                          help="Who observes the input amax: modelopt (nvidia-modelopt 0.47), builtin "
                                               "(nemoconv's hooks, same values), auto (modelopt when it imports, else "
                                               "builtin; the summary says which)."),
    analyze: bool = typer.Option(False, "--analyze", help="Write no checkpoint: measure, for every linear any preset "
                                 "could quantize, its FP8 weight SQNR and the KL / top-1 change of the logits when "
                                 "only it is FP8; a table sorted by harm."),
    analyze_samples: Optional[int] = typer.Option(None, "--analyze-samples", min=1, max=MAX_CALIB_SAMPLES,
                                                  help="Calibration sequences the --analyze probe runs "
                                                       "(default: 1/32 of --calib-samples)."),
    analyze_method: Optional[AnalyzeMethod] = typer.Option(None, "--analyze-method", help=ANALYZE_METHOD_HELP),
    analyze_top: Optional[int] = typer.Option(None, "--analyze-top", min=0, max=10_000, help=ANALYZE_TOP_HELP),
    report: Optional[Path] = typer.Option(None, "--report", help="With --analyze: write the analysis as JSON here."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Quality budget: keep the most harmful mixers in "
                                           "bf16 until KL(ref‖FP8) on held-out prompts is at most this."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Quality budget: top-1 agreement on held-out "
                                             "prompts at least this (with or without --max-kl)."),
    kv_cache: KVCache = typer.Option(KVCache.none, "--kv-cache", help="fp8: also write FP8 KV-cache scales "
                                     "(k_scale/v_scale) for the attention layers, as ModelOpt does (the max "
                                     "scheme drops them)."),
):
    """Per-tensor static FP8 (E4M3) in ModelOpt's format, calibrated by running the built-in model.

    With --analyze, writes no checkpoint (OUT must be omitted) and reports which linears FP8 hurts.
    """
    options = options_of(ctx)
    if analyze:
        _refuse_checkpoint_flags([("OUT", dst is not None), ("--exclude", bool(exclude)),
                                  ("--to", to.value != "hf"), ("--overwrite", overwrite),
                                  ("--max-kl", max_kl is not None), ("--min-top1", min_top1 is not None),
                                  ("--kv-cache", kv_cache != KVCache.none), ("--no-resume", no_resume)])
        _analyze(options, src, preset.value, calib_file, calib_samples, calib_seq_len, analyze_samples,
                 device.value, report, analyze_method, analyze_top)
        return
    if dst is None:
        raise NemoconvError("quantize needs OUT (the output directory), unless --analyze is given")
    if report is not None or analyze_samples is not None or analyze_method is not None or analyze_top is not None:
        raise NemoconvError("--report, --analyze-samples, --analyze-method and --analyze-top go with --analyze")
    _write_fp8(options, src, dst, preset=preset.value, exclude=exclude, calib_file=calib_file,
               calib_samples=calib_samples, calib_seq_len=calib_seq_len, device=device.value, to=to.value,
               overwrite=overwrite, calibrator=calibrator.value, max_kl=max_kl, min_top1=min_top1,
               kv_cache=kv_cache.value, resume=not no_resume)


def _write_fp8(options: CliOptions, src: str, dst: Path, **settings) -> None:
    from nemoconv.cli.render_quantize import render_summary
    from nemoconv.commands.quantize import quantize as do_quantize  # torch: only when the command runs

    result = do_quantize(src, dst, quiet=options.quiet, **settings)
    if not options.quiet:
        render_summary(result, stdout_console(options))


def _refuse_checkpoint_flags(given: list[tuple[str, bool]]) -> None:
    unused = [flag for flag, was_given in given if was_given]
    if unused:
        raise NemoconvError(f"--analyze writes no checkpoint; drop {', '.join(unused)} (use --report FILE for JSON)")


def _analyze(options: CliOptions, src: str, preset: str, calib_file: Optional[Path], calib_samples: int,
             calib_seq_len: int, probe_samples: Optional[int], device: str, report: Optional[Path],
             method: Optional[AnalyzeMethod], top_k: Optional[int]) -> None:
    from nemoconv.quant.analyze import analyze_fp8, write_analysis
    from nemoconv.storage.paths import check_report_path

    if top_k is not None and method == AnalyzeMethod.exact:
        raise NemoconvError("--analyze-top goes with --analyze-method fisher (exact measures every linear)")
    if report is not None:
        check_report_path(report)
    result = analyze_fp8(src, preset=preset, calib_file=calib_file, calib_samples=calib_samples,
                         calib_seq_len=calib_seq_len, probe_samples=probe_samples, device=device,
                         quiet=options.quiet, method=(method or AnalyzeMethod.fisher).value,
                         **({} if top_k is None else {"top_k": top_k}))
    if report is not None:
        write_analysis(result, report)
    if not options.quiet:
        render_analysis(result, stdout_console(options))
