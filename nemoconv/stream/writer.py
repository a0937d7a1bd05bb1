"""The one checkpoint writer of convert and quantize: the planned tensors into shards (safetensors, or a
Megatron DCP checkpoint), the index, the side files, config.json, extra JSON files, the manifest and the
card, all inside an atomic output directory that is published at OUT only when complete (`output`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from nemoconv.checkpoint.local import MANIFEST_NAME
from nemoconv.checkpoint.sidefiles import SideFile, write_side_files
from nemoconv.storage.safetensors_io import PlannedTensor
from nemoconv.stream.card import write_card
from nemoconv.stream.items import Item
from nemoconv.stream.output import atomic_output
from nemoconv.stream.shards import BackgroundWriter, ShardedWriter, write_json

Progress = Callable[[int, int], None]


@dataclass
class Layout:
    """How the tensors are laid out on disk."""

    planned: list[PlannedTensor]  # in write order
    scheme: str  # the output's naming scheme, stamped into every shard's metadata
    shard_limit: int  # bytes
    container: str = "safetensors"  # or "torch_dist" (Megatron DCP)

    def new_writer(self, directory: Path):
        if self.container == "torch_dist":
            from nemoconv.storage.megatron.dcp import DcpWriter

            return DcpWriter(directory, self.planned, self.shard_limit)
        return ShardedWriter(directory, self.planned, self.shard_limit, {"format": "pt", "nemoconv_scheme": self.scheme})


@dataclass
class Beside:
    """The files written beside the tensors, once they are all written."""

    config: dict
    carried: list[SideFile]
    manifest: dict  # without "shards": the writer adds the shard names
    card_title: str
    extra_json: dict[str, object] = field(default_factory=dict)  # file name → data (e.g. hf_quant_config.json)


def write_checkpoint(out, overwrite: bool, layout: Layout, stream: Callable[[], Iterable[Item]],
                     beside: Callable[[], Beside], source_dir: Path, progress: Progress | None = None) -> dict:
    """Write the stream's tensors, then what `beside()` returns, into OUT atomically; returns the manifest.

    `stream()` yields the planned tensors in order (data, or bytes still on disk to copy file to file);
    `beside()` is called once they are all written (quantize's manifest holds values found while writing)."""
    with atomic_output(out, overwrite) as tmp:
        shard_files = _write_tensors(tmp, layout, stream(), progress)
        files = beside()
        write_side_files(tmp, files.carried)
        write_json(tmp / "config.json", files.config)
        for name, data in files.extra_json.items():
            write_json(tmp / name, data)
        manifest = files.manifest
        manifest["shards"] = shard_files
        write_json(tmp / MANIFEST_NAME, manifest)
        write_card(tmp, source_dir, manifest, title=files.card_title, quantization=manifest.get("quantization"))
    return manifest


def _write_tensors(directory: Path, layout: Layout, items: Iterable[Item], progress: Progress | None) -> list[str]:
    """Every planned tensor, in order, through a background writer; returns the shard file names."""
    writer = BackgroundWriter(layout.new_writer(directory))
    total = sum(p.nbytes for p in layout.planned)
    done = 0
    planned = iter(layout.planned)
    try:
        for item in items:
            want = next(planned, None)
            if want is None or item.name != want.name:
                raise RuntimeError(f"internal error: wrote {item.name}, planned {want.name if want else 'nothing'}")
            writer.write(item.name, item.tensor, item.entry)
            done += want.nbytes
            if progress:
                progress(done, total)
        writer.close()
    finally:
        writer.abort()
    return writer.writer.names
