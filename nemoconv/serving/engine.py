"""A small serving engine over the built-in model: paged KV blocks, Mamba state slots, prefix caching.

    engine = PrefixCachingEngine(model, mode="state")          # or "memory", or "off"
    result = engine.generate([prompt_ids, …], max_new_tokens=32)
    result.tokens            # one list of new token ids per prompt (greedy)
    result.stats.as_dict()   # hit rate, tokens skipped, KV blocks shared, bytes saved, warnings

Requests run in waves of at most `max_batch`: each prompt is prefilled on its own (so it can reuse
what earlier prompts left in the cache), then the wave decodes together, one token per row per step,
rows at their own positions. The block pool and the state store persist between calls, so a later
call reuses prefixes of an earlier one. Modes are explained in `prefix_cache`; with every mode the
logits are bit for bit the ones caching off gives, because every mode cuts its prefill at the same
multiples of `prefill_chunk` and reuses state and keys/values only at those points.

A prompt's last, shorter segment is padded on the right to a bucket (`prefix_cache.tail_bucket`) and
masked so that its real positions compute what the unpadded segment would: logits at the last real
position, Mamba step size 0 and x = B = 0 at the pads (the state passes through) with the conv context
ending at the last real input, the pads' keys/values in a sink behind the block pool (`paged`). The
real length is a device tensor, so one graph per bucket serves every length in it. Every mode pads
alike (on the CPU too), so the modes still agree bit for bit.

On CUDA (dense models), whole chunks and padded tails replay CUDA graphs per (state slot, position,
length) once their shapes ran eagerly: a segment's ~600 kernel launches cost the host ~35 ms on the 8B
layout, about what the GPU needs for 1,500 tokens, so without graphs a short segment (a state hit's
suffix) would leave the GPU waiting. Decode steps have static shapes (paged attention reads positions
and block tables from the device) and replay one graph per wave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nemoconv.errors import NemoconvError
from nemoconv.model.common import Pass, causal_mask
from nemoconv.model.cuda.graphs import GraphCache
from nemoconv.model.modeling import NemotronHLM
from nemoconv.serving.paged import BlockPool, PagedBatch, PagedStep, SlotPool, to_device
from nemoconv.serving.prefix_cache import (MODES, PrefixStats, StateStore, chain_hashes, resolve_prefill_chunk,
                                           tail_bucket)

GRAPHS_PER_SLOT = 16            # prefill chunk graphs per state slot (one memory pool; later chunks run eagerly)


@dataclass
class Generation:
    tokens: list[list[int]]                       # new tokens per prompt
    stats: PrefixStats                            # this call only
    ttft_s: list[float] = field(default_factory=list)      # per prompt: its prefill, to the first token's logits
    logits: list[torch.Tensor] | None = None      # per prompt [new, vocab] float32 (return_logits=True)


@dataclass
class _Request:
    tokens: list[int]
    hashes: list[bytes]
    slot: int
    table: list[int] = field(default_factory=list)
    shared: int = 0                               # leading blocks taken from the index


class PrefixCachingEngine:
    """Greedy generation for many prompts with hybrid-aware prefix caching (see the module docstring).

    block_size   positions per KV block (default: the model's SSM chunk size, so that checkpoints
                 start a scan chunk exactly where a longer prefill would)
    prefill_chunk  every prefill, in every mode, runs in segments that end on multiples of this many
                 tokens (a multiple of block_size; default 1024 rounded up to one); Mamba states are
                 saved only there and KV blocks are shared only in whole chunks. So a restored state
                 and the keys and values beside it are the bits that caching off computes at that
                 point, and the segments after it are the same computations (same tokens, incoming
                 state, shapes and kernels): every mode gives
                 bit-identical logits, on the GPU too, where one long prefill and a short one round
                 their sums differently. The price: a shared prefix is reused (skipped or shared)
                 only up to its last multiple of prefill_chunk (a shorter one is reported in
                 stats.warnings).
    max_tokens   positions the block pool holds over all requests in flight (and cached prefixes)
    max_batch    requests per wave (Mamba state slots)
    state_budget_bytes  memory for saved Mamba states (default: 16 states)
    pad_tails    pad a prompt's last, shorter segment to a bucket and run it like a whole chunk (see the
                 module docstring); False runs it eagerly at its own length (for comparisons)
    """

    def __init__(self, model: NemotronHLM, mode: str = "state", block_size: int | None = None,
                 max_tokens: int = 16384, max_batch: int = 8, state_budget_bytes: int | None = None,
                 prefill_chunk: int | None = None, pad_tails: bool = True):
        if mode not in MODES:
            raise NemoconvError(f"unknown prefix-cache mode {mode!r} (use one of {', '.join(MODES)})")
        spec = model.spec
        self.model, self.mode = model, mode
        self.block_size = B = block_size or max(16, spec.chunk_size)
        self.prefill_chunk = resolve_prefill_chunk(prefill_chunk, B)
        self.pool = BlockPool(spec, -(-max_tokens // self.block_size), self.block_size, model.device, model.dtype,
                              sink_positions=self.prefill_chunk if pad_tails else 0)
        self.slots = SlotPool(spec, max_batch, model.device, model.dtype)
        budget = state_budget_bytes if state_budget_bytes is not None else 16 * self.slots.state_bytes
        self.states = StateStore(budget if mode == "state" else 0)
        self.max_batch = max_batch
        self.pad_tails = pad_tails
        self._graphs = None                       # CUDA graphs of prefill chunks (graphs.GraphCache)
        self._graphs_signature = None             # the model state they were captured with
        self._step_graphs = None                  # CUDA graphs of decode steps, one per wave shape
        self._pool_handle = None
        self._shapes_run: set = set()             # segment shapes run once (their kernels are compiled)

    # ---- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 16, eos_token_id: int | list[int] | None = None,
                 return_logits: bool = False) -> Generation:
        """Greedy continuation of each prompt (lists or 1-D tensors of token ids). Rows that produce an
        EOS token stop there (their lists end with it)."""
        prompts = [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise NemoconvError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise NemoconvError("max_new_tokens must be ≥ 1")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        stats = PrefixStats(mode=self.mode, block_size=self.block_size, state_budget_bytes=self.states.budget_bytes)
        evicted0, rejected0 = self.states.evicted, self.states.rejected
        hashes = [chain_hashes(p, self.block_size) for p in prompts]
        seen: dict[bytes, int] = {}
        for hs in hashes:
            for h in set(hs):
                seen[h] = seen.get(h, 0) + 1
        if self.mode != "off" and not any(hashes):
            stats.warn(f"no prompt fills one block of {self.block_size} tokens: nothing can be shared "
                       "(use a smaller block_size)")
        if self.mode == "state" and self.slots.state_bytes > self.states.budget_bytes:
            stats.warn(f"one Mamba state checkpoint takes {self.slots.state_bytes} bytes but the state budget "
                       f"is {self.states.budget_bytes}: state mode cannot skip any token")

        tokens, ttft, logits = [], [], []
        for first in range(0, len(prompts), self.max_batch):
            wave = range(first, min(first + self.max_batch, len(prompts)))
            requests = [_Request(prompts[i], hashes[i], slot) for slot, i in enumerate(wave)]
            try:
                out = self._run_wave(requests, seen, max_new_tokens, eos, stats, return_logits)
            finally:
                for r in requests:
                    for block in r.table:
                        self.pool.release(block)
            for new, t, lg in zip(*out):
                tokens.append(new)
                ttft.append(t)
                logits.append(lg)
        stats.states_evicted = self.states.evicted - evicted0
        stats.states_rejected = self.states.rejected - rejected0
        stats.state_bytes_held = self.states.bytes
        stats.peak_kv_blocks_in_use = self.pool.peak_in_use
        return Generation(tokens, stats, ttft, logits if return_logits else None)

    def clear(self) -> None:
        """Forget every cached prefix (blocks and states), e.g. after the model's weights changed.
        Captured prefill graphs stay (they hold no tokens, and are keyed by the model's state)."""
        self.pool.clear()
        self.states.clear()

    def graph_counts(self) -> dict:
        """Prefill chunks and decode steps captured as CUDA graphs and replayed so far (and why a capture
        failed)."""
        out = {}
        for name, g in (("prefill", self._graphs), ("decode", self._step_graphs)):
            out[name] = {"captures": g.captures, "replays": g.replays, "kept": len(g.entries), "error": g.error} \
                if g else {"captures": 0, "replays": 0, "kept": 0, "error": ""}
        return out

    # ---- one wave ----------------------------------------------------------------------------
    def _run_wave(self, requests: list[_Request], seen: dict[bytes, int], max_new: int, eos: set[int],
                  stats: PrefixStats, return_logits: bool):
        first_logits, ttft = [], []
        for r in requests:
            t0 = time.perf_counter()
            first_logits.append(self._prefill(r, seen, max_new, stats))
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            ttft.append(time.perf_counter() - t0)
        last = torch.stack(first_logits)                                           # [b, vocab]
        steps = [last] if return_logits else None
        new = [[] for _ in requests]
        done = [False] * len(requests)
        lengths = [len(r.tokens) for r in requests]
        for i in range(max_new):
            picked = last.argmax(dim=-1).tolist()
            for row, tok in enumerate(picked):
                if not done[row]:
                    new[row].append(tok)
                    done[row] = tok in eos
            if i + 1 == max_new or all(done):
                break
            fed = to_device(torch.tensor([[row[-1]] for row in new], dtype=torch.long), self.model.device)
            positions = torch.tensor([[n + i] for n in lengths], dtype=torch.int64)   # each row's own position
            last = self._forward(requests, fed, positions, decode=True)
            if return_logits:
                steps.append(last)
        per_row = [torch.stack([s[row] for s in steps]) for row in range(len(requests))] if return_logits else \
            [None] * len(requests)
        return new, ttft, per_row

    def _prefill(self, r: _Request, seen: dict[bytes, int], max_new: int, stats: PrefixStats) -> torch.Tensor:
        """Fill one request's blocks and slot from its prompt (reusing what the mode allows) → the last
        position's logits [vocab]."""
        matched = self._take_blocks(r, max_new, stats)
        skip = self._restore_state(r, stats)
        saves = self._state_saves(r, seen, matched, skip, stats)
        logits = self._run_segments(r, skip, saves, stats)
        # Index this prompt's full blocks for later requests (those it shared are indexed already).
        for j in range(r.shared, len(r.hashes)):
            self.pool.register(r.hashes[j], r.table[j])
        return logits[0].clone()                  # a graph's buffer is overwritten by the next replay

    def _take_blocks(self, r: _Request, max_new: int, stats: PrefixStats) -> int:
        """Share the indexed prefix, allocate the rest (prompt and the decode steps to come) → how many
        leading blocks the index matched.

        Only whole prefill chunks are shared: keys and values in a chunk come out of one segment, whose
        other rows (the tokens after the match) may change their rounding, so a partly matched chunk
        is computed again, as caching off would."""
        B, L, n = self.block_size, len(r.tokens), len(r.hashes)
        per = self.prefill_chunk // B                                              # blocks per chunk
        found = []                                                                 # indexed blocks of the prefix
        if self.mode != "off":
            while len(found) < n and (block := self.pool.lookup(r.hashes[len(found)])) is not None:
                found.append(block)
            for block in found[:len(found) // per * per]:
                self.pool.share(block)
                r.table.append(block)
            r.shared = len(r.table)
        need = -(-(L + max_new - 1) // B)
        while len(r.table) < need:
            r.table.append(self.pool.allocate())
        stats.requests += 1
        stats.prompt_tokens += L
        stats.kv_blocks_shared += r.shared
        stats.kv_blocks_allocated += need - r.shared
        stats.kv_bytes_saved += r.shared * self.pool.block_bytes
        stats.tokens_in_shared_blocks += r.shared * B
        return len(found)

    def _restore_state(self, r: _Request, stats: PrefixStats) -> int:
        """Restore the deepest saved checkpoint (a multiple of prefill_chunk) inside the shared blocks,
        leaving ≥ 1 token to run, or reset the slot → the prompt tokens skipped."""
        B, per = self.block_size, self.prefill_chunk // self.block_size
        skip = 0
        if self.mode == "state":
            for j in range(min(r.shared, (len(r.tokens) - 1) // B) // per * per, 0, -per):
                state = self.states.get(r.hashes[j - 1])
                if state is not None:
                    self.slots.restore(r.slot, state)
                    skip = j * B
                    stats.states_restored += 1
                    stats.tokens_skipped += skip
                    break
        if skip == 0:
            self.slots.reset(r.slot)
        if r.shared or skip:
            stats.hits += 1
        return skip

    def _state_saves(self, r: _Request, seen: dict[bytes, int], matched: int, skip: int,
                     stats: PrefixStats) -> set[int]:
        """The block boundaries after which to save the Mamba state (state mode).

        At branch points, boundaries known to be shared: those after which fewer prompts of this call
        share the chain (some diverge in the next block), and the depth matched in the index. One of them
        at the very end of the prompt moves back a block (a repeat must run ≥ 1 token). And at the last
        full block, for a follow-up turn that extends the prompt. Each moves down to a checkpoint (a
        multiple of prefill_chunk), where the prefill cuts anyway. A match (or, in state mode, a branch
        point) shorter than one chunk cannot be reused: say so."""
        B, L, n = self.block_size, len(r.tokens), len(r.hashes)
        per = self.prefill_chunk // B
        short = 0 < matched < per
        saves = set()
        if self.mode == "state":
            counts = [seen.get(h, 0) for h in r.hashes] + [0]
            branches = {j + 1 for j in range(n) if counts[j] > 1 and counts[j + 1] < counts[j]} | {matched}
            branches = {j - 1 if j * B == L else j for j in branches}
            short = short or any(0 < j < per for j in branches)
            saves = {j // per * per for j in branches | {n}}
            saves = {j for j in saves if j * B > skip and r.hashes[j - 1] not in self.states}
        if short:
            stats.warn(f"prompts share prefixes shorter than prefill_chunk ({self.prefill_chunk} tokens): "
                       "only whole chunks are shared or skipped (use a smaller prefill_chunk)")
        return saves

    def _run_segments(self, r: _Request, skip: int, saves: set[int], stats: PrefixStats) -> torch.Tensor:
        """Run the prompt from `skip` in segments ending on multiples of prefill_chunk, saving states at
        `saves` → the last segment's logits [1, vocab]."""
        B, L = self.block_size, len(r.tokens)
        ends = list(range(skip + self.prefill_chunk, L, self.prefill_chunk)) + [L]
        start, logits = skip, None
        for end in ends:
            # a whole chunk has the same shapes in every request that reaches it: worth a CUDA graph; a
            # prompt's last, shorter segment is padded to a bucket, whose graph serves every length in it
            whole = end - start == self.prefill_chunk
            padded = not whole and self.pad_tails
            width = tail_bucket(end - start, B, self.prefill_chunk) if padded else end - start
            tokens = r.tokens[start:end] + [0] * (width - (end - start))
            ids = to_device(torch.tensor([tokens], dtype=torch.long), self.model.device)
            positions = torch.arange(start, start + width, dtype=torch.int64)[None]
            logits = self._forward([r], ids, positions, decode=False, write_from=r.shared * B,
                                   graph=whole or padded, length=end - start if padded else None)
            if end % B == 0 and end // B in saves:
                if self.states.put(r.hashes[end // B - 1], self.slots.snapshot(r.slot)):
                    stats.states_saved += 1
            start = end
        return logits

    def _forward(self, requests: list[_Request], ids: torch.Tensor, positions: torch.Tensor, decode: bool,
                 write_from: int = 0, graph: bool = False, length: int | None = None) -> torch.Tensor:
        """Run ids [b, s] at positions [b, s] (host) through the model on the requests' blocks and slots
        → logits of each row's last new position [b, vocab] float32. A prefill with `graph` runs from
        a CUDA graph where it can (then the logits are its buffer: valid until the next forward). With
        `length`, a prefill's rows hold that many real tokens, then right padding: the length reaches the
        pass as a device tensor (a graph input), so one graph serves every length of the padded shape."""
        model, runner = self.model, self.model.runner
        first_slot = requests[0].slot
        if [r.slot for r in requests] != list(range(first_slot, first_slot + len(requests))):
            raise NemoconvError("internal: a forward pass needs consecutive state slots")
        fused = runner.fused_ok()
        if decode and runner.static_ok():
            return self._static_step(requests, ids, positions[:, -1].tolist(), fused)
        view = PagedBatch(self.pool, self.slots, first_slot, [r.table for r in requests], positions,
                          [write_from] * len(requests), None if length is None else [length] * len(requests))
        start = int(positions[0, 0])
        b, s = ids.shape
        t = view.positions.shape[1]
        if decode:
            # each row sees its own positions 0 … p (rows stand at different lengths)
            key_pos = torch.arange(t)[None]
            attn = to_device((key_pos <= positions[:, -1:])[:, None, None], model.device)   # [b, 1, 1, t]
            ctx = Pass(cache=view, start=start, pad_mask=None, attn_mask=attn, causal=False, decode=True,
                       fused=fused)
            return model.logits(model.run(ids, ctx)[:, -1])

        def prefill(ids, positions, write_index, write_rows, lengths):
            # built here from its inputs, so that a captured graph reads the next segment's at each replay.
            # Right padding needs no attention mask: it follows every real token, so causality hides it.
            attn = None if start == 0 else causal_mask(torch.ones(b, t, dtype=torch.bool, device=model.device),
                                                        start, s)                  # [b, 1, s, t]
            ctx = Pass(cache=view.with_index_tensors(positions, write_index, write_rows), start=start,
                       pad_mask=None, attn_mask=attn, causal=start == 0, decode=False, fused=fused, lengths=lengths)
            hidden = model.run(ids, ctx)
            if lengths is None:
                return model.logits(hidden[:, -1])
            last = (lengths - 1)[:, None, None].expand(b, 1, hidden.shape[-1])  # each row's last real position
            return model.logits(hidden.gather(1, last)[:, 0])

        lengths = None if length is None else to_device(torch.full((b,), length, dtype=torch.int64), model.device)
        shape = (b, start, s, t, view.any_write, view.write_rows is None, view.write_index.numel(), length is None)
        key = self._graph_key(ids, fused) if graph else None
        if key is None:
            return prefill(ids, *view.index_tensors(), lengths)
        logits, _ = self._graphs.run((first_slot, shape, key), prefill, ids, *view.index_tensors(), lengths,
                                     compiled=shape in self._shapes_run)
        self._shapes_run.add(shape)
        return logits

    def _static_step(self, requests: list[_Request], ids: torch.Tensor, positions: list[int], fused: bool):
        """A decode step with static shapes (CUDA, Triton kernels): paged attention reads each row's
        position from the device, so one CUDA graph per wave serves every step (the first step runs
        eagerly, the second is captured). → logits [b, vocab] float32."""
        model = self.model
        first_slot = requests[0].slot
        table, pos, write = PagedStep.host_inputs(self.pool, [r.table for r in requests], positions)
        inputs = [ids] + [to_device(t, model.device) for t in (table, pos, write)]

        def step(ids, table, pos, write):
            ctx = Pass(cache=PagedStep(self.pool, self.slots, first_slot, table, write), start=0, pad_mask=None,
                       attn_mask=None, causal=False, decode=True, pos=pos, fused=fused)
            return model.logits(model.run(ids, ctx)[:, 0])

        signature = model.runner.decode_signature(fused)
        if signature is None:
            return step(*inputs)
        if self._step_graphs is None:
            self._step_graphs = GraphCache(max_graphs=4, pool=self._graph_pool())
        logits, _ = self._step_graphs.run((first_slot, len(requests), signature), step, *inputs)
        return logits.clone()                     # the graph's buffer: the next step overwrites it

    def _graph_key(self, ids: torch.Tensor, fused: bool) -> tuple | None:
        """The model state a prefill segment's CUDA graph depends on, or None where it runs eagerly (as
        for the model's own prefill graphs). Graphs of an earlier model state are dropped: they would
        only fill the (non-evicting) store."""
        signature = self.model.runner.prefill_signature(ids, fused)
        if signature is not None and self._graphs is not None and signature != self._graphs_signature:
            self._graphs = None
        if signature is not None and self._graphs is None:
            self._graphs_signature = signature
            self._graphs = GraphCache(max_graphs=GRAPHS_PER_SLOT * self.max_batch, pool=self._graph_pool(),
                                         evict=False)
        return signature

    def _graph_pool(self):
        """One memory pool for all of this engine's graphs (they run one at a time; outputs are copied)."""
        if self._pool_handle is None:
            self._pool_handle = torch.cuda.graph_pool_handle()
        return self._pool_handle
