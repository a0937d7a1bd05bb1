"""CUDA graphs: a pass whose launches depend only on a key is captured once, then replayed.

`GraphCache` holds graphs by key — whatever the launches depend on: rows, length, start position,
masking, the model state, the cache storage or state slot. The built-in model uses it for decode steps
(`StaticDecoder`, one per cache) and for prefills into a kept cache; the serving engine for its prefill
chunks and decode steps. Replaying one graph instead of issuing ~600 launches from the host means the
host's speed no longer limits the GPU.

A decode step has the same shapes at every position once its position is a device tensor (the
static-shape attention in `kernels.decode_attention` reads it from there), and the hybrid cache never
moves (it is preallocated), so a whole step — 2 to 20 launches per layer — can be recorded once and
replayed with one launch. Each cache carries its own `StaticDecoder` (a cache has a fixed batch size,
so this is one graph per batch size in use), which holds
    tokens  int64 [b, 1]   static input, copied in before each step (device to device, no sync)
    pos     int64 [1]      static input, the step's position (a fill, no sync)
and whose graph's logits [b, vocab] float32 are a static output, overwritten by every replay. The
first pass of a key runs eagerly (it compiles every Triton kernel for these shapes and builds lazily
made state such as the MoE expert tables); the second captures and replays; later ones only replay. A
graph is valid for the model state it was captured with: `signature` (the address of every parameter
and buffer) is part of every key, so a changed model runs eagerly and captures again.
"""

from __future__ import annotations

import torch


class GraphCache:
    """CUDA graphs by key (see the module docstring).

    As with decode, the first pass of a key runs eagerly unless the caller says these shapes ran before
    (`compiled`); the next one is captured and replayed, later ones replay. Inputs (token ids, padding
    mask, index tensors; None stays None) are copied into static buffers at capture and before each
    replay — unless they are the caller's own static buffers (`static`), used as they are. The output
    is the graph's static logits buffer, which the next replay of any graph in the same pool may
    overwrite (callers copy it). A graph keeps its activations' memory, or shares `pool` with the others
    (they run one at a time). At most `max_graphs` are kept: then the oldest goes, or, with
    `evict=False` (keys that recur in cycles, such as the chunks of long prompts, which would evict each
    other before any replay), new keys run eagerly. A key whose capture failed runs eagerly from then on.
    """

    def __init__(self, max_graphs: int = 2, pool=None, evict: bool = True):
        self.max_graphs, self.evict = max_graphs, evict
        self.pool = pool
        self.entries: dict = {}          # key → [static inputs, graph, logits] (graph None: seen once, eager)
        self.failed: set = set()
        self.captures = 0
        self.replays = 0
        self.error = ""

    def run(self, key: tuple, run, *inputs: torch.Tensor | None, compiled: bool = False,
            static: bool = False) -> tuple[torch.Tensor, bool]:
        """`run(*inputs)` → logits, eagerly or from this key's graph. Returns (logits, whether they are
        the graph's static buffer)."""
        if key in self.failed:
            return run(*inputs), False
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs and not self.evict:
                return run(*inputs), False
            while len(self.entries) >= self.max_graphs:
                self.entries.pop(next(iter(self.entries)))
            entry = self.entries[key] = [None, None, None]
            if not compiled:
                return run(*inputs), False
        if entry[1] is None:
            buffers = inputs if static else tuple(t.clone() if t is not None else None for t in inputs)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = run(*buffers)
            except Exception as exc:       # never try this key again; run it eagerly
                self.failed.add(key)
                self.entries.pop(key, None)
                self.error = f"{type(exc).__name__}: {exc}"
                torch.cuda.synchronize()
                return run(*inputs), False
            entry[:] = [buffers, graph, logits]
            self.captures += 1
        elif not static:
            for buffer, t in zip(entry[0], inputs):
                if t is not None:
                    buffer.copy_(t)
        entry[1].replay()
        self.replays += 1
        return entry[2], True

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The newest captured graph, if any."""
        return next((e[1] for e in reversed(self.entries.values()) if e[1] is not None), None)


class StaticDecoder:
    """Static decode buffers and the captured graph of one cache (see the module docstring)."""

    def __init__(self, batch_size: int, device: torch.device):
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: GraphCache | None = None    # made on the first step with graphs on (it needs their pool)

    def load(self, tokens: torch.Tensor, start: int) -> None:
        self.tokens.copy_(tokens.reshape(self.tokens.shape))
        self.pos.fill_(start)

    def step(self, run, signature: tuple | None, pool) -> tuple[torch.Tensor, bool]:
        """One step: `run(tokens, pos)` → logits. With a signature (the model state), graphs are used:
        replay, or capture after one eager warm-up step, one graph at a time; None runs eagerly (a
        captured graph stays for later). Returns (logits, whether they are the static buffer, which the
        next replay overwrites)."""
        if signature is None:
            return run(self.tokens, self.pos), False
        if self.graphs is None:
            self.graphs = GraphCache(max_graphs=1, pool=pool)
        return self.graphs.run(signature, run, self.tokens, self.pos, static=True)

    # what tests and benchmarks read
    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.graphs.graph if self.graphs else None

    @property
    def captures(self) -> int:
        return self.graphs.captures if self.graphs else 0

    @property
    def replays(self) -> int:
        return self.graphs.replays if self.graphs else 0

    @property
    def error(self) -> str:
        return self.graphs.error if self.graphs else ""
