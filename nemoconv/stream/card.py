"""The model card (`README.md`) that convert and quantize write and verify updates.

Sections are delimited by HTML comments so verify can replace its table without touching the rest; the
source's own card, when there is one, is kept below ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nemoconv.storage.paths import read_owned
from nemoconv.version import __version__

CARD_NAME = "README.md"
_VERIFY_START, _VERIFY_END = "<!-- nemoconv:verify:start -->", "<!-- nemoconv:verify:end -->"
_HEADER = re.compile(r"\A---\n(.*?)\n---\n?", re.S)


def _split_front_matter(text: str) -> tuple[dict, str]:
    """YAML front matter (only the simple `key: value` / `key: [..]` forms the Hub uses) and the body."""
    m = _HEADER.match(text)
    if not m:
        return {}, text
    meta: dict = {}
    key = None
    for line in m.group(1).splitlines():
        if re.match(r"^\s*-\s+", line) and key:
            meta.setdefault(key, [])
            if isinstance(meta[key], list):
                meta[key].append(line.split("-", 1)[1].strip().strip("'\""))
        elif ":" in line:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            meta[key] = value.strip("'\"") if value else []
    return meta, text[m.end():]


def _front_matter(meta: dict) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {v}" for v in value)
        else:
            lines.append(f"{key}: {value}")
    lines.append("---")
    return "\n".join(lines) + "\n"


_WHERE_FP8_RUNS = [
    "## Where this FP8 checkpoint runs",
    "",
    "Per-tensor static FP8 (E4M3) in nvidia-modelopt's HF format, written by nemoconv "
    "(`hf_quant_config.json`, `config.json` `quantization_config` with `quant_method: modelopt`):",
    "",
    "| engine | loads it | hardware for native FP8 matmuls |",
    "|---|---|---|",
    "| vLLM | `vllm serve THIS_DIR` (quantization detected as `modelopt`), hf scheme | NVIDIA Ada / Hopper / Blackwell "
    "(compute capability ≥ 8.9) |",
    "| TensorRT-LLM | PyTorch backend, reads `hf_quant_config.json`, hf scheme | Ada / Hopper / Blackwell |",
    "| MAX | Nemotron-H architecture, `max` scheme (`nemoconv quantize --to max`) | NVIDIA GPUs with FP8 |",
    "| nemoconv | `nemoconv verify`, `nemoconv.load_model` (reference; any scheme, CPU too) | any |",
    "",
    "**Not transformers**: `AutoModelForCausalLM.from_pretrained` does not apply this ModelOpt FP8 config — it "
    "loads the FP8 weights without their scales and, silently, gives garbage (a cosine of 0.16 to the source's "
    "logits, measured on a small Nemotron-H).",
]


def write_card(out_dir: Path, source_dir: Path, manifest: dict, title: str, quantization: dict | None = None) -> None:
    """Write OUT/README.md: metadata header, what nemoconv did, and the source's card below."""
    source_card = source_dir / CARD_NAME
    source_text = read_owned(source_dir, CARD_NAME, 16 << 20).decode("utf-8", "replace") \
        if source_card.is_file() else ""  # a link leaving the checkpoint is refused, never copied into ours
    source_meta, source_body = _split_front_matter(source_text)
    if "nemoconv:card" in source_body:  # the source was itself written by nemoconv: keep only its original card
        source_body = source_body.split("<!-- nemoconv:original -->", 1)[-1] if "<!-- nemoconv:original -->" \
            in source_body else ""
    base_model = source_meta.get("base_model") or _repo_id(str(manifest.get("source", "")))
    tags = [t for t in (source_meta.get("tags") or []) if isinstance(t, str)]
    for tag in ("nemotron_h", "nemoconv", manifest["scheme_to"] + "-scheme"):
        if tag not in tags:
            tags.append(tag)
    if quantization and "fp8" not in tags:
        tags.append("fp8")
    meta = {k: v for k, v in source_meta.items() if k not in ("base_model", "tags", "library_name")}
    # transformers loads an FP8 output without error but ignores its ModelOpt config: never claim it for FP8
    library = "transformers" if manifest["scheme_to"] == "hf" and not quantization else "nemoconv"
    meta = {**({"base_model": base_model} if base_model else {}),
            "library_name": library, "tags": tags, **meta}
    lines = [
        "<!-- nemoconv:card -->",
        f"# {title}",
        "",
        f"Nemotron-H checkpoint in the **{manifest['scheme_to']}** naming scheme, produced by "
        f"nemoconv {__version__} from `{base_model or Path(manifest['source']).name}` "
        f"({manifest['scheme_from']} scheme).",
        "",
        "| | |",
        "|---|---|",
        f"| tensors | {manifest['tensors_in']} in → {manifest['tensors_out']} out |",
        f"| lossless | {'yes' if manifest['lossless'] else 'no (' + str(len(manifest['lossy_steps'])) + ' lossy steps in nemoconv-manifest.json)'} |",
    ]
    if quantization:
        excluded = quantization.get("excluded", [])
        lines += [
            f"| quantization | FP8 E4M3 per-tensor static (ModelOpt format), preset `{quantization.get('preset')}` |",
            f"| quantized modules | {len(quantization.get('targets', []))} |",
            f"| excluded modules | {len(excluded)} |",
            f"| calibration | {quantization.get('calibration', {}).get('source', '')}, "
            f"{quantization.get('calibration', {}).get('samples', '')} × {quantization.get('calibration', {}).get('seq_len', '')} tokens |",
        ]
        lines += ["", *_WHERE_FP8_RUNS]
        if excluded:
            lines += ["", "<details><summary>Excluded modules</summary>", ""]
            lines += [f"- `{e['module'] if isinstance(e, dict) else e}`" for e in excluded]
            lines += ["", "</details>"]
    lines += ["", _VERIFY_START, "Not verified yet: run `nemoconv verify SOURCE THIS_DIR`.", _VERIFY_END, ""]
    if source_body.strip():
        lines += ["<!-- nemoconv:original -->", "## Original model card", "", source_body.strip(), ""]
    (out_dir / CARD_NAME).write_text(_front_matter(meta) + "\n".join(lines))


def update_card_with_verify(directory: Path, report: dict) -> bool:
    """Replace the verify section of DIR/README.md with the report's metrics; False if DIR has no nemoconv card."""
    card = Path(directory) / CARD_NAME
    if not card.is_file() or _VERIFY_START not in card.read_text():
        return False
    text = card.read_text()
    summary = report.get("summary", {})
    verdict = "PASS" if report.get("passed") else "FAIL"
    rows = [f"**verify: {verdict}** (profile `{report.get('profile')}`, {report.get('device')}, "
            f"{report.get('dtype')}, nemoconv {__version__})", "", "| metric | value |", "|---|---|"]
    reference = (report.get("record") or {}).get("reference")
    if reference:  # what it was compared with, by identity and content hash
        rows[1:1] = ["", f"verified against `{reference['identity']}` (sha256 `{reference['digest'][:16]}…`)"]
    if report.get("overrides"):
        rows[1:1] = ["", "overrides: " + "; ".join(f"`{o}`" for o in report["overrides"])]
    for key, value in summary.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            rows.append(f"| {key} | {_fmt(value)} |")
    thresholds = report.get("thresholds")
    if thresholds:
        rows += ["", f"thresholds: `{json.dumps(thresholds, sort_keys=True)}`"]
    start, end = text.index(_VERIFY_START), text.index(_VERIFY_END)
    text = text[: start + len(_VERIFY_START)] + "\n" + "\n".join(rows) + "\n" + text[end:]
    card.write_text(text)
    return True


def _repo_id(source: str) -> str | None:
    """The Hub repo a source came from (`org/name[@rev]` that is not a local path), for `base_model`."""
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", source) and not Path(source).exists():
        return source.split("@", 1)[0]
    return None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
