"""The one checkpoint writer of convert and quantize: the planned tensors into shards (safetensors, or a
Megatron DCP checkpoint), the index, the side files, config.json, extra JSON files, the manifest and the
card, all inside an atomic output directory that is published at OUT only when complete (`output`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from nemoconv.checkpoint.local import MANIFEST_NAME
from nemoconv.checkpoint.sidefiles import SideFile, write_side_files
from nemoconv.storage.safetensors_io import PlannedTensor, dtype_name
from nemoconv.stream.card import write_card
from nemoconv.stream.items import Item
from nemoconv.stream.output import atomic_output
from nemoconv.stream.resume import ResumeKey, digest_of, resumable_output
from nemoconv.stream.shards import BackgroundWriter, ShardedWriter, plan_shards, shard_names, write_json

Progress = Callable[[int, int], None]


@dataclass
class Layout:
    """How the tensors are laid out on disk."""

    planned: list[PlannedTensor]  # in write order
    scheme: str  # the output's naming scheme, stamped into every shard's metadata
    shard_limit: int  # bytes
    container: str = "safetensors"  # or "torch_dist" (Megatron DCP)

    sources: list[tuple[str, ...]] = field(default_factory=list)  # the source tensors of each planned one

    def new_writer(self, directory: Path, start_shard: int = 0, shard_done=None):
        if self.container == "torch_dist":
            from nemoconv.storage.megatron.dcp import DcpWriter

            return DcpWriter(directory, self.planned, self.shard_limit)
        metadata = {"format": "pt", "nemoconv_scheme": self.scheme}
        return ShardedWriter(directory, self.planned, self.shard_limit, metadata, start_shard, shard_done)

    def shard_names(self) -> list[str]:
        return shard_names(len(plan_shards(self.planned, self.shard_limit)))

    def digest(self) -> str:
        """What the shards hold, by name, dtype and shape, and how they are cut."""
        return digest_of([self.container, self.scheme, self.shard_limit,
                          [[p.name, dtype_name(p.dtype), list(p.shape)] for p in self.planned]])

    def sources_done(self, shards: int) -> frozenset:
        """The source tensors that feed only the first `shards` shards: a resumed stream need not read them."""
        count = sum(len(s) for s in plan_shards(self.planned, self.shard_limit)[:shards])
        done = {s for sources in self.sources[:count] for s in sources}
        return frozenset(done - {s for sources in self.sources[count:] for s in sources})


@dataclass
class Beside:
    """The files written beside the tensors, once they are all written."""

    config: dict
    carried: list[SideFile]
    manifest: dict  # without "shards": the writer adds the shard names
    card_title: str
    extra_json: dict[str, object] = field(default_factory=dict)  # file name → data (e.g. hf_quant_config.json)


@dataclass
class Resume:
    """How a run resumes (stream.resume): its key, whether to discard a partial first (--no-resume), and the
    command's state journaled with each shard (`state()`, JSON) and given back on resume (`restore(state)`)."""

    key: ResumeKey
    fresh: bool = False
    state: Callable[[], dict] | None = None
    restore: Callable[[dict], None] | None = None


Stream = Callable[[frozenset], Iterable[Item]]  # skip → the planned items; `skip`: sources that may stay unread


def write_checkpoint(out, overwrite: bool, layout: Layout, stream: Stream, beside: Callable[[], Beside],
                     source_dir: Path, progress: Progress | None = None, resume: Resume | None = None) -> dict:
    """Write the stream's tensors, then what `beside()` returns, into OUT atomically; returns the manifest.

    `stream(skip)` yields the planned tensors in order (data, or bytes still on disk to copy file to file);
    the sources in `skip` feed only shards already written, so it may leave them unread (meta tensors).
    `beside()` is called once they are all written (quantize's manifest holds values found while writing).
    `resume`: write into a partial directory that an interrupted run of the same command continues."""
    if resume is None or layout.container != "safetensors":
        with atomic_output(out, overwrite) as tmp:
            shard_files = _write_tensors(tmp, layout, stream(frozenset()), progress)
            return _write_beside(tmp, shard_files, beside(), source_dir)
    key = replace(resume.key, content=digest_of([layout.digest(), resume.key.content]))
    with resumable_output(out, overwrite, key, layout.shard_names(), resume.fresh) as partial:
        if partial.state and resume.restore is not None:
            resume.restore(partial.state)
        start = len(partial.done)
        state = resume.state or dict

        def shard_done(path: Path) -> None:
            partial.shard_done(path, state())

        shard_files = _write_tensors(partial.directory, layout, stream(layout.sources_done(start)), progress,
                                     start, shard_done)
        return _write_beside(partial.directory, shard_files, beside(), source_dir)


def _write_beside(directory: Path, shard_files: list[str], files: Beside, source_dir: Path) -> dict:
    """Side files, config.json, the extra JSON files, the manifest (with the shard names) and the card."""
    write_side_files(directory, files.carried)
    write_json(directory / "config.json", files.config)
    for name, data in files.extra_json.items():
        write_json(directory / name, data)
    manifest = files.manifest
    manifest["shards"] = shard_files
    write_json(directory / MANIFEST_NAME, manifest)
    write_card(directory, source_dir, manifest, title=files.card_title, quantization=manifest.get("quantization"))
    return manifest


def _write_tensors(directory: Path, layout: Layout, items: Iterable[Item], progress: Progress | None,
                   start_shard: int = 0, shard_done=None) -> list[str]:
    """Every planned tensor, in order, through a background writer (from `start_shard` on: the tensors of the
    shards before it are checked against the plan, not written); returns the shard file names."""
    writer = BackgroundWriter(layout.new_writer(directory, start_shard, shard_done))
    total = sum(p.nbytes for p in layout.planned)
    skip = sum(len(s) for s in plan_shards(layout.planned, layout.shard_limit)[:start_shard])
    done = 0
    planned = iter(layout.planned)
    try:
        for n, item in enumerate(items):
            want = next(planned, None)
            if want is None or item.name != want.name:
                raise RuntimeError(f"internal error: wrote {item.name}, planned {want.name if want else 'nothing'}")
            if n >= skip:
                writer.write(item.name, item.tensor, item.entry)
            done += want.nbytes
            if progress:
                progress(done, total)
        writer.close()
    finally:
        writer.abort()
    return writer.writer.names
