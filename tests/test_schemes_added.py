"""Adding a scheme is adding a TOML file: a made-up scheme dropped into a copy of the package's mappings/ is a
command-line choice, a conversion target and a source, round trip bit-exact; a broken file there is one line
and exit 2 from the command line. The copy (nemoconv/ and mappings/ side by side, as in a checkout) is run
in a subprocess with PYTHONPATH pointing at it, so nothing in nemoconv needs a back door to be redirected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, load_all, read_json

REPO = Path(__file__).resolve().parents[1]

# A copy of nemo.toml under another prefix (`mine.` instead of `model.`), detected by its own embedding name.
MYSCHEME = ((REPO / "mappings" / "nemo.toml").read_text()
            .replace('scheme = "nemo"', 'scheme = "myscheme"')
            .replace('description = "NeMo', 'description = "Made up for a test: NeMo')
            .replace('"model.', '"mine.')
            .replace("detect = ['^model\\.embed_tokens\\.weight$', '\\._fp32_params\\.', "
                     "'\\.experts\\.gate_and_up_projs$']", "detect = ['^mine\\.embed_tokens\\.weight$']"))


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """nemoconv/ and mappings/ copied side by side (mappings_dir() finds mappings/ beside the package)."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "nemoconv", root / "nemoconv", ignore=shutil.ignore_patterns("__pycache__", "tiny-trained"))
    shutil.copytree(REPO / "mappings", root / "mappings")
    return root


def _cli(root: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    # run from the copy: `python -m` puts the working directory first on sys.path
    return subprocess.run([sys.executable, "-m", "nemoconv.cli", *map(str, args)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_a_new_toml_file_is_a_new_scheme_that_round_trips_bit_exactly(package_copy, tiny_dir, tmp_path):
    assert "detect = ['^mine\\.embed_tokens\\.weight$']" in MYSCHEME  # the copy really changed the detect rule
    (package_copy / "mappings" / "myscheme.toml").write_text(MYSCHEME)
    src = tiny_dir("moe", torch.bfloat16)  # merged experts, fp32 Mamba parameters: nemo's rules all exercised
    help_text = _cli(package_copy, "convert", "--help")
    assert help_text.returncode == 0 and "myscheme" in help_text.stdout

    mine = _cli(package_copy, "convert", src, tmp_path / "mine", "--to", "myscheme")
    assert mine.returncode == 0, mine.stderr
    names = set(load_all(tmp_path / "mine"))
    assert "mine.embed_tokens.weight" in names and not any(n.startswith(("model.", "backbone.")) for n in names)
    assert read_json(tmp_path / "mine" / "nemoconv-manifest.json")["scheme_to"] == "myscheme"

    back = _cli(package_copy, "convert", tmp_path / "mine", tmp_path / "back", "--from", "myscheme", "--to", "hf")
    assert back.returncode == 0, back.stderr
    assert_same_tensors(load_all(src), load_all(tmp_path / "back"))


@pytest.mark.parametrize("text, expected", [
    (MYSCHEME.replace("transpose = true", "tranpose = true", 1),
     f"myscheme.toml:{MYSCHEME.splitlines().index('transpose = true') + 1}: merge_experts[0].tranpose: unknown key"),
    ("scheme = myscheme\n", "myscheme.toml:1: not valid TOML: Invalid value"),
])
def test_a_broken_mapping_file_is_one_line_and_exit_2(package_copy, tiny_dir, tmp_path, text, expected):
    (package_copy / "mappings" / "myscheme.toml").write_text(text)
    result = _cli(package_copy, "convert", tiny_dir("dense"), tmp_path / "out", "--to", "nemo")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {package_copy / 'mappings'}/") and expected in result.stderr
    assert not (tmp_path / "out").exists()
