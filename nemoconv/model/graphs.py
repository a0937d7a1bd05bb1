"""CUDA graphs for the decode step: one graph per (cache, model state), captured lazily, then replayed.

A decode step has the same shapes at every position once its position is a device tensor (the
static-shape attention in `kernels.decode_attention` reads it from there), and the hybrid cache never
moves (it is preallocated), so a whole step — 2 to 20 launches per layer — can be recorded once and
replayed with one launch. Each cache carries its own `StaticDecoder` (a cache has a fixed batch size,
so this is one graph per batch size in use), which holds
    tokens  int64 [b, 1]   static input, copied in before each step (device to device, no sync)
    pos     int64 [1]      static input, the step's position (a fill, no sync)
    logits  float32 [b, vocab]  static output of the graph, overwritten by every replay
The first step of a cache runs eagerly (it compiles every Triton kernel for these shapes and builds
lazily made state such as the MoE expert tables); the second captures and replays; later ones only
replay. A graph is valid for the model state it was captured with: `signature` (the address of every
parameter and buffer) must be unchanged, else the step runs eagerly and captures again.
"""

from __future__ import annotations

import torch


class StaticDecoder:
    """Static decode buffers and the captured graph of one cache (see the module docstring)."""

    def __init__(self, batch_size: int, device: torch.device):
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.signature: tuple | None = None       # model state the graph was captured with
        self.eager_steps = 0                      # eager steps since the last (re)capture
        self.captures = 0
        self.replays = 0
        self.failed: tuple | None = None          # a state whose capture failed: stays eager
        self.error = ""

    def load(self, tokens: torch.Tensor, start: int) -> None:
        self.tokens.copy_(tokens.reshape(self.tokens.shape))
        self.pos.fill_(start)

    def step(self, run, signature: tuple | None, pool) -> tuple[torch.Tensor, bool]:
        """One step: `run(tokens, pos)` → logits. With a signature, graphs are used (replay, or capture
        after one eager warm-up step); None runs eagerly. Returns (logits, whether they are the static
        buffer, which the next replay overwrites)."""
        if signature is None or signature == self.failed:
            return run(self.tokens, self.pos), False      # graphs off (the captured one stays valid)
        if self.graph is not None and signature == self.signature:
            self.graph.replay()
            self.replays += 1
            return self.logits, True
        if self.eager_steps == 0 or signature != self.signature:
            self.graph, self.logits = None, None
            self.signature = signature
            self.eager_steps = 1
            return run(self.tokens, self.pos), False
        # Second step with this state: record it (nothing executes while capturing), then replay.
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=pool):
                logits = run(self.tokens, self.pos)
        except Exception as exc:                  # never try this state again; run it eagerly
            self.failed, self.error = signature, f"{type(exc).__name__}: {exc}"
            self.graph, self.logits = None, None
            torch.cuda.synchronize()
            return run(self.tokens, self.pos), False
        self.graph, self.logits = graph, logits
        self.captures += 1
        self.graph.replay()
        self.replays += 1
        return self.logits, True


class PrefillGraphs:
    """CUDA graphs of whole prefills (or prefill segments), one per key: whatever the launches depend on
    (rows, length, start position, masking, the model state, the cache storage or slot).

    A prefill's launches depend only on its key, so the same prompt length into the same cache — a
    benchmark, a server's length buckets, `generate` called again with its kept cache, the engine's
    fixed-size prefill chunks — can replay one graph instead of issuing ~600 launches from the host,
    whose speed then no longer limits the GPU. As with decode, the first prefill of a key runs eagerly
    (it compiles and autotunes the Triton kernels) unless the caller says these shapes ran before
    (`compiled`); the next one is captured and replayed, later ones replay. Inputs (token ids, padding
    mask, index tensors; None stays None) are copied into static buffers; the output is the graph's
    static logits buffer, which the next replay of any graph in the same pool may overwrite (callers
    copy it). Only prefills of at most MAX_TOKENS rows × positions are captured (a graph keeps its
    activations' memory, or shares `pool` with the others), at most `max_graphs`: then the oldest goes,
    or, with `evict=False` (keys that recur in cycles, such as the chunks of long prompts, which would
    evict each other before any replay), new keys run eagerly.
    """

    MAX_TOKENS = 8192

    def __init__(self, max_graphs: int = 2, pool=None, evict: bool = True):
        self.max_graphs, self.evict = max_graphs, evict
        self.pool = pool                 # a graph memory pool shared by these graphs (replayed one at a time)
        self.entries: dict = {}          # key → [static inputs, graph, logits] (graph None: seen once, eager)
        self.failed: set = set()
        self.captures = 0
        self.replays = 0
        self.error = ""

    def run(self, key: tuple, run, *inputs: torch.Tensor | None, compiled: bool = False) -> tuple[torch.Tensor, bool]:
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
            static = tuple(t.clone() if t is not None else None for t in inputs)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = run(*static)
            except Exception as exc:       # never try this key again; run it eagerly
                self.failed.add(key)
                self.entries.pop(key, None)
                self.error = f"{type(exc).__name__}: {exc}"
                torch.cuda.synchronize()
                return run(*inputs), False
            entry[:] = [static, graph, logits]
            self.captures += 1
        else:
            for buffer, t in zip(entry[0], inputs):
                if t is not None:
                    buffer.copy_(t)
        entry[1].replay()
        self.replays += 1
        return entry[2], True
