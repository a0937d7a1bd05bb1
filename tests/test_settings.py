"""The NEMOCONV_* switches: read once from the environment into a frozen object, overridable for a block."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nemoconv import settings
from nemoconv.errors import NemoconvError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_an_empty_environment_gives_the_defaults():
    assert settings.Settings.from_environ({}) == settings.Settings()


def test_environment_values_are_parsed_into_typed_fields():
    got = settings.Settings.from_environ({"NEMOCONV_KERNELS": "reference", "NEMOCONV_CUDA_GRAPHS": "0",
                                          "NEMOCONV_SKINNY": "0", "NEMOCONV_PDL": "0", "NEMOCONV_WARMUP": "0",
                                          "NEMOCONV_NO_WRITEBACK": "1", "NEMOCONV_GEMM": "0",
                                          "NEMOCONV_AUTOTUNE": "full", "NEMOCONV_AUTOTUNE_TABLE": "mine.json",
                                          "NEMOCONV_SDPA_MASKED": "auto", "NEMOCONV_CALIBRATOR": "builtin"})
    assert got == settings.Settings(kernels="reference", cuda_graphs=False, skinny=False, pdl=False, warmup=False,
                                    no_writeback=True, gemm=False, autotune="full", autotune_table="mine.json",
                                    sdpa_masked="auto", calibrator="builtin")


def test_a_flag_flips_only_on_its_documented_value():
    env = {"NEMOCONV_CUDA_GRAPHS": "no", "NEMOCONV_NO_WRITEBACK": "0", "NEMOCONV_SKINNY": "false",
           "NEMOCONV_PDL": "off", "NEMOCONV_GEMM": "no"}
    assert settings.Settings.from_environ(env) == settings.Settings()


def test_an_unknown_choice_is_an_error_naming_the_variable():
    with pytest.raises(NemoconvError, match="NEMOCONV_KERNELS='triton'"):
        settings.Settings.from_environ({"NEMOCONV_KERNELS": "triton"})


def test_an_override_is_in_force_only_inside_its_block():
    before = settings.current()
    with settings.override(kernels="reference") as outer:
        assert settings.current() is outer and outer.kernels == "reference"
        with settings.override(cuda_graphs=False):
            assert settings.current().kernels == "reference" and not settings.current().cuda_graphs
        assert settings.current() is outer
    assert settings.current() is before


def test_an_override_of_an_unknown_setting_is_refused():
    with pytest.raises(NemoconvError, match="unknown setting"):
        with settings.override(kernel="reference"):
            pass


def test_the_environment_is_read_once_until_reload(monkeypatch):
    monkeypatch.setattr(settings, "_environment", None)      # restored after the test
    monkeypatch.delenv("NEMOCONV_CALIBRATOR", raising=False)
    first = settings.current()
    monkeypatch.setenv("NEMOCONV_CALIBRATOR", "builtin")
    assert settings.current() is first and first.calibrator == "auto"
    assert settings.reload().calibrator == "builtin" and settings.current().calibrator == "builtin"


def test_every_setting_has_one_row_in_the_readme_table():
    rows = re.findall(r"^\| `(NEMOCONV_\w+)` \|", README.read_text(), flags=re.M)
    assert sorted(rows) == sorted("NEMOCONV_" + f.name.upper() for f in dataclasses.fields(settings.Settings))
