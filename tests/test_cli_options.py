"""The command line's one options object (nemoconv/cli/options.py), filled once from the global flags, and the
renderers that live in nemoconv/cli/ (the command modules compute; the CLI prints)."""

from __future__ import annotations

import dataclasses
import io

import pytest
from helpers import run_cli
from rich.console import Console
from typer.testing import CliRunner

from nemoconv.cli.app import app
from nemoconv.cli.options import CliOptions, split_global_flags
from nemoconv.cli.render import stdout_console
from nemoconv.cli.render_analysis import render_analysis
from nemoconv.cli.render_demo import demo_line
from nemoconv.errors import NemoconvError


def test_global_flags_are_taken_from_anywhere_on_the_line():
    flags, rest = split_global_flags(["convert", "a", "-q", "b", "--to", "nemo", "--debug"])
    assert flags == ["-q", "--debug"] and rest == ["convert", "a", "b", "--to", "nemo"]
    options = CliOptions.from_command_line(flags, stdout=io.StringIO())
    assert (options.quiet, options.debug, options.stdout_is_terminal) == (True, True, False)


def test_the_options_cannot_change_once_filled():
    options = CliOptions.from_command_line(["--quiet"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.quiet = False


def test_quiet_written_after_the_command_silences_its_summary(tiny_dir, tmp_path, capsys):
    code, out, err = run_cli(["convert", tiny_dir("dense"), tmp_path / "a", "--to", "nemo"], capsys)
    assert code == 0 and out.startswith("wrote:"), err
    code, out, err = run_cli(["convert", tiny_dir("dense"), tmp_path / "b", "--to", "nemo", "-q"], capsys)
    assert code == 0 and out == "" and err == ""


def test_debug_written_after_the_command_gives_the_traceback(tmp_path):
    from nemoconv.cli import main

    with pytest.raises(NemoconvError, match="no such checkpoint directory"):
        main(["inspect", str(tmp_path / "nope"), "--debug"])


def test_the_app_driven_without_main_fills_its_options_from_its_own_flags(tiny_dir, tmp_path):
    result = CliRunner().invoke(app, ["--quiet", "convert", str(tiny_dir("dense")), str(tmp_path / "out"),
                                      "--to", "max"])
    assert result.exit_code == 0 and result.stdout == "", result.output
    assert (tmp_path / "out" / "nemoconv-manifest.json").is_file()


def test_a_pipe_gets_lines_that_never_wrap_and_a_terminal_gets_its_width():
    assert stdout_console(CliOptions(stdout_is_terminal=False)).width == 10_000
    assert stdout_console(CliOptions(stdout_is_terminal=True)).width < 10_000


def _analysis(n_modules: int, method: str = "exact") -> dict:
    rows = [{"rank": i + 1, "module": f"backbone.layers.{i}.mixer.in_proj", "kind": "mamba in_proj",
             "in_preset": i % 2 == 0, "sqnr_db": None if i == 0 else 30.0 + i, "kl": 1e-3 / (i + 1),
             "top1_change": 0.01, "est_kl": 2e-3 / (i + 1)} for i in range(n_modules)]
    analysis = {"method": method}
    if method == "fisher":   # only the worst is measured exactly; the others carry the estimate alone
        analysis.update(label_samples=4, exact_top_k=1)
        for row in rows[1:]:
            row["kl"] = row["top1_change"] = None
    return {"calibration": {"tokens": 4096}, "probe": {"tokens": 256, "sweeps": 1, "streams_per_sweep": 8},
            "device": "cpu", "modules": rows, "timings_s": {"calibrate": 1.0, "analyze": 2.0}, "preset": "default",
            "analysis": analysis}


def test_the_analysis_table_shows_the_worst_first_and_says_how_many_more():
    console = Console(file=io.StringIO(), width=200)
    render_analysis(_analysis(3), console, limit=2)
    text = console.file.getvalue()
    assert "layers.0.mixer.in_proj" in text and "layers.1.mixer.in_proj" in text
    assert "layers.2.mixer.in_proj" not in text and "… and 1 more" in text
    assert "—" in text  # a measurement that could not be made is a dash, not a number
    assert "backbone." not in text and "--preset default" in text


def test_the_fisher_table_shows_the_estimate_and_dashes_where_nothing_was_measured():
    console = Console(file=io.StringIO(), width=200)
    render_analysis(_analysis(3, "fisher"), console)
    text = console.file.getvalue()
    assert "est. KL" in text and "2.00e-03" in text and "1.00e-03" in text   # the worst: estimate and exact KL
    assert "6.67e-04" in text and "3.33e-04" not in text                      # the others: estimate only
    assert "measured exactly for the 1 worst" in text


def test_each_demo_step_has_its_line():
    assert demo_line({"event": "round_trip", "path": ["hf", "nemo", "max", "hf"], "bit_exact": True}) == \
        "round trip hf → nemo → max → hf: [green]bit-exact[/green]"
    line = demo_line({"event": "verified", "reference": "hf", "candidate": "max", "passed": False,
                      "profile": "exact", "num_prompts": 2, "seq_len": 32, "max_new_tokens": 8})
    assert line == "verify hf vs max : [red]FAIL[/red] (profile exact, 2 prompts × 32 tokens)"
    with pytest.raises(ValueError, match="unknown demo step"):
        demo_line({"event": "teleported"})
