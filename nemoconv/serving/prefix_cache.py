"""Prefix caching for hybrid models: what may be reused, and the bookkeeping that proves it was.

A transformer can skip a cached prefix because its keys and values are all it needs. A hybrid model
cannot: its Mamba layers carry a recurrent state that summarises the whole prefix and is not in any
KV block. Two modes (the engine is in `engine`):

  memory   KV blocks of a matched prefix are shared (reference-counted, no new blocks); every prompt
           token still runs through the model, since the Mamba state must be rebuilt. Saves memory.
  state    Mamba conv/SSM states are also saved at checkpoints; a request whose prefix matches up to
           a saved checkpoint restores that state and skips those tokens entirely. Saves time.

Both are exact by construction, in two senses. A block or a state is found only by the hash of the
*whole* token chain up to its end (`chain_hashes`), so it is reused only after exactly the tokens that
produced it. And it holds the very bits caching off would compute: the engine cuts every prefill, in
every mode, at multiples of its `prefill_chunk`, checkpoints lie only there, and blocks are shared
only in whole chunks, so the segment that produced a reused block or state is the same computation
(same tokens, incoming state, shapes, kernels) as the one caching off runs. One long prefill and one
resumed at a checkpoint would otherwise round their sums differently on a GPU. A prompt's last, shorter
segment is padded to the same bucket (`tail_bucket`) in every mode, for the same reason.

Where states are saved decides the hit rate (then each place moves down to a checkpoint). A state saved at the end of a prompt's last full block
usually lies in tokens unique to that request and is never matched again (vLLM's "align" mode pitfall,
hit rate silently 0%). So a state is saved at a request's *branch point* — the deepest block boundary
it is known to share with another request (one in the same call, or one whose KV blocks are indexed)
— and at its last full block (which a follow-up turn extending the prompt will match). The store is
bounded by a byte budget and evicts the least recently used state; a state larger than the whole
budget is refused, counted, and reported as a warning instead of silently disabling the mode.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from nemoconv.errors import NemoconvError

MODES = ("off", "memory", "state")
DEFAULT_PREFILL_CHUNK = 1024
TAIL_BUCKETS = 8                # a prompt's last segment is padded to one of at most this many lengths


def resolve_prefill_chunk(prefill_chunk: int | None, block_size: int) -> int:
    """The engine's prefill segment length: as given (a positive multiple of block_size), or the default
    rounded up to a multiple of block_size."""
    if prefill_chunk is None:
        return -(-DEFAULT_PREFILL_CHUNK // block_size) * block_size
    if prefill_chunk < 1 or prefill_chunk % block_size:
        raise NemoconvError(f"prefill_chunk ({prefill_chunk}) must be a positive multiple of block_size ({block_size})")
    return prefill_chunk


def tail_bucket(length: int, block_size: int, prefill_chunk: int) -> int:
    """The padded length of a prompt's last segment of `length` (1 … prefill_chunk) tokens: the next
    multiple of a step that is a multiple of block_size and at least prefill_chunk / TAIL_BUCKETS.

    Multiples of block_size (by default the SSM chunk size), so that padding fills scan chunks the
    kernel computes whole anyway and the segment ends on a block boundary; a step of ≥ 1/8 chunk, so
    that a start position has at most 8 tail graphs per state slot while padding costs at most 1/8 of
    a chunk's work (≤ 127 tokens at the defaults: 1024 and 128)."""
    step = max(block_size, prefill_chunk // TAIL_BUCKETS // block_size * block_size)
    return min(prefill_chunk, -(-length // step) * step)


def chain_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """hashes[j] identifies tokens[0 : (j + 1) · block_size] (full blocks only): each block's hash
    covers its tokens and the hash of everything before it."""
    out, parent = [], b""
    for j in range(len(tokens) // block_size):
        block = tokens[j * block_size:(j + 1) * block_size]
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in block))
        parent = h.digest()
        out.append(parent)
    return out


class StateStore:
    """Mamba state checkpoints (conv, ssm of every layer) keyed by chain hash, LRU under a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        self.rejected = 0

    @staticmethod
    def nbytes(state: tuple[torch.Tensor, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in state)

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def get(self, key: bytes):
        state = self.entries.get(key)
        if state is not None:
            self.entries.move_to_end(key)          # recently used: evicted last
        return state

    def put(self, key: bytes, state: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Keep a state (evicting the least recently used ones to fit); False when it cannot fit at all."""
        size = self.nbytes(state)
        if size > self.budget_bytes:
            self.rejected += 1
            return False
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        while self.bytes + size > self.budget_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self.nbytes(old)
            self.evicted += 1
        self.entries[key] = state
        self.bytes += size
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


@dataclass
class PrefixStats:
    """What prefix caching did, summed over requests (see `as_dict` for the derived rates)."""

    mode: str = "off"
    block_size: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    hits: int = 0                     # requests that reused anything (a shared block, or a restored state)
    kv_blocks_shared: int = 0         # block references taken from the index instead of new blocks
    kv_blocks_allocated: int = 0
    kv_bytes_saved: int = 0           # kv_blocks_shared × bytes per block
    tokens_in_shared_blocks: int = 0  # prompt tokens whose keys/values were already there
    tokens_skipped: int = 0           # prompt tokens never run (state mode)
    states_restored: int = 0
    states_saved: int = 0
    states_evicted: int = 0
    states_rejected: int = 0          # larger than the whole budget
    state_bytes_held: int = 0
    state_budget_bytes: int = 0
    peak_kv_blocks_in_use: int = 0
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "warnings"}
        d["request_hit_rate"] = round(self.hits / self.requests, 4) if self.requests else 0.0
        d["token_hit_rate"] = round((self.tokens_skipped if self.mode == "state" else self.tokens_in_shared_blocks)
                                    / self.prompt_tokens, 4) if self.prompt_tokens else 0.0
        d["warnings"] = list(self.warnings)
        return d
