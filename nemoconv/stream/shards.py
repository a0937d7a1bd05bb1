"""Sharded safetensors writing: the shard plan, the shard writer (and its background thread), the index."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.safetensors_io import PlannedTensor, ShardFileWriter
from nemoconv.storage.tensors import plan_shards  # shared with the DCP writer

MAX_SHARD_SIZE = 1 << 46  # 64 TiB: far beyond any shard a file system or a loader handles in one piece
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:E[+-]?\d{1,3})?(KIB|MIB|GIB|TIB|KB|MB|GB|TB|B)?")
_UNITS = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1, None: 1}


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `1.5GiB`, `1000000` → bytes, in [1, MAX_SHARD_SIZE]; anything else (negative, NaN,
    `inf`, `1e400`, absurdly large) is a NemoconvError."""
    invalid = NemoconvError(f"invalid size {str(text)[:40]!r} (use e.g. 5GB, 500MB, 2GiB; at most 64TiB)")
    if isinstance(text, bool):
        raise invalid
    if isinstance(text, int):
        value = text
    elif isinstance(text, str) and len(text) <= 40:
        s = text.strip().upper().replace(" ", "")
        m = _SIZE.fullmatch(s)
        if m is None:
            raise invalid
        number = s[: m.start(2)] if m.group(2) else s
        exact = not any(c in number for c in ".E")  # plain integers stay exact, whatever their size
        value = (int(number) if exact else float(number)) * _UNITS[m.group(2)]
        if not math.isfinite(value):  # 1E400
            raise invalid
    else:
        raise invalid
    if not 1 <= value <= MAX_SHARD_SIZE:
        raise invalid
    return int(value)


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


class ShardedWriter:
    """Writes a planned, ordered stream of tensors into shards, then the index."""

    def __init__(self, directory: Path, planned: list[PlannedTensor], max_shard_size: int, metadata: dict[str, str],
                 start_shard: int = 0, on_shard_done=None):
        """`start_shard`: the shards before it are already on disk (a resumed run), and the first tensor written
        is the first of that shard. `on_shard_done(path)`: called as each shard file is complete and closed."""
        self.directory = directory
        self.shards = plan_shards(planned, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.metadata = metadata
        self._shard = start_shard - 1
        self._writer: ShardFileWriter | None = None
        self._left = 0
        self._on_shard_done = on_shard_done
        self.weight_map: dict[str, str] = {p.name: self.names[k] for k in range(start_shard) for p in self.shards[k]}
        self.total_size = sum(p.nbytes for p in planned)

    def write(self, name: str, tensor, entry=None) -> None:
        while self._left == 0:
            self._open_next()
        self._writer.write(name, tensor, entry)
        self.weight_map[name] = self.names[self._shard]
        self._left -= 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._on_shard_done is not None:
                self._on_shard_done(self.directory / self.names[self._shard])

    def _open_next(self) -> None:
        self._close_shard()
        self._shard += 1
        if self._shard >= len(self.shards):
            raise RuntimeError("internal error: more tensors than planned")
        planned = self.shards[self._shard]
        self._writer = ShardFileWriter(self.directory / self.names[self._shard], planned, self.metadata)
        self._left = len(planned)

    def close(self) -> None:
        self._close_shard()
        if len(self.weight_map) != sum(len(s) for s in self.shards):
            raise RuntimeError("internal error: fewer tensors written than planned")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            write_json(self.directory / "model.safetensors.index.json", index)


class BackgroundWriter:
    """Runs a ShardedWriter on a thread, so the disk writes of one tensor overlap the reading and
    transposing of the next (both release the GIL). Memory stays bounded: tensors wait in the queue only
    while less than `max_queued_bytes` of data (the one being written included) is pending, plus one."""

    def __init__(self, writer: ShardedWriter, max_queued_bytes: int = 128 << 20):
        import threading
        from collections import deque

        self.writer = writer
        self._limit = max_queued_bytes
        self._jobs: deque = deque()
        self._pending = 0  # bytes held by queued jobs
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nemoconv-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs[0]
            if job is None:
                return
            if self._error is None:
                try:
                    self.writer.write(*job[:3])
                except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                    self._error = exc
            with self._cond:
                self._jobs.popleft()
                self._pending -= job[3]
                self._cond.notify_all()

    def write(self, name: str, tensor, entry=None) -> None:
        if self._error is not None:
            self._finish()
        size = 0 if entry is not None else tensor.numel() * tensor.element_size()  # copied file to file: no RAM
        with self._cond:
            while self._jobs and self._pending + size > self._limit and self._error is None:
                self._cond.wait()
            self._jobs.append((name, tensor, entry, size))
            self._pending += size
            self._cond.notify_all()

    def _stop(self) -> None:
        with self._cond:
            self._jobs.append(None)
            self._cond.notify_all()
        self._thread.join()

    def _finish(self) -> None:
        self._stop()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._finish()
        self.writer.close()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._stop()


def json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: Path, data) -> None:
    path.write_bytes(json_bytes(data))
