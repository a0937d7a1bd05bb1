"""Paged decoding state for many requests: KV blocks for attention layers, state slots for Mamba layers.

Unlike `HybridCache` (one contiguous buffer per batch), storage here is shared by requests that come
and go, so that a prompt prefix computed once can be reused by later requests (`prefix_cache`):

  BlockPool   keys/values of every attention layer in fixed-size blocks of `block_size` positions
              k, v  [n_attention_layers, num_blocks, block_size, kv_heads, head_dim]   model dtype
              A request owns a block table (position p lives in block table[p // B] at offset p % B).
              Blocks are reference-counted; a full block of prompt tokens is indexed by the hash of its
              token chain, so a later request with the same prefix can share it instead of filling a
              new one. A block whose count drops to zero stays indexed (evictable, least recently used
              first) until its storage is needed. Behind them, `sink_positions` more positions
              (whole blocks) are never handed out: the keys/values of padding (a bucketed prefill
              tail) are written and read there, never in a request's blocks.
  SlotPool    the conv and SSM state of every Mamba layer for `num_slots` requests (as MAX does)
              conv  [n_mamba_layers, num_slots, conv_dim, conv_kernel - 1]              model dtype
              ssm   [n_mamba_layers, num_slots, heads, head_dim, state]                 float32 default
  PagedBatch  what one forward pass sees as its cache: `attend_kv` and `layer_mamba`, the interface
              the model's layers call, over the rows' block tables and slots.
  PagedStep   the same for a decode step with static shapes (`decode_attend`), which a CUDA graph can
              replay at every position.

Everything is allocated once, in the constructors.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from nemoconv.errors import NemoconvError
from nemoconv.model.cache import resolve_ssm_dtype
from nemoconv.model.cuda import kernels
from nemoconv.model.reference import flat_rows
from nemoconv.storage.config import ATTENTION, MAMBA, ModelSpec


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, copied without waiting for the work already queued there
    (pinned memory, asynchronous copy): a plain copy would make the host wait for the GPU at every
    segment, instead of queueing the next segment's launches while the GPU computes."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def block_table(tables: list[list[int]], width: int) -> torch.Tensor:
    """Each row's first `width` block ids, padded with block 0 → [b, width] int64 (host)."""
    return torch.tensor([row[:width] + [0] * (width - len(row[:width])) for row in tables], dtype=torch.int64)


class BlockPool:
    """Reference-counted KV blocks with a prefix index (block-chain hash → block)."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, device, dtype: torch.dtype,
                 sink_positions: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise NemoconvError(f"a block pool needs ≥ 1 block of ≥ 1 position, got {num_blocks} × {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.layer_slot = {i: j for j, i in enumerate(i for i, c in enumerate(spec.layer_codes) if c == ATTENTION)}
        self.sink = num_blocks                            # the first block kept for padding (see the module docstring)
        self.sink_positions = -(-sink_positions // block_size) * block_size
        blocks = num_blocks + self.sink_positions // block_size
        shape = (len(self.layer_slot), blocks, block_size, spec.num_key_value_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))   # never used, or evicted (pop from the end)
        self.index: dict[bytes, int] = {}                 # chain hash → block holding those tokens
        self.hash_of: dict[int, bytes] = {}               # indexed block → its hash
        self.evictable: OrderedDict[int, None] = OrderedDict()   # indexed, unreferenced; oldest first
        self.peak_in_use = 0

    @property
    def block_bytes(self) -> int:
        """Bytes one block holds over all attention layers (keys and values)."""
        per = self.k[:, 0].numel() * self.k.element_size()
        return 2 * per

    def in_use(self) -> int:
        return self.num_blocks - len(self.free) - len(self.evictable)

    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def lookup(self, chain: bytes) -> int | None:
        return self.index.get(chain)

    def share(self, block: int) -> None:
        """One more request reads this (indexed) block."""
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use())

    def allocate(self) -> int:
        """A block for new tokens (reference count 1): a free one, else the least recently used
        unreferenced indexed block, which leaves the index."""
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.index[self.hash_of.pop(block)]
        else:
            raise NemoconvError(f"the KV block pool is exhausted ({self.num_blocks} blocks of {self.block_size} "
                                "positions, all in use): allow more tokens in flight (max_tokens)")
        self.refs[block] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use())
        return block

    def register(self, chain: bytes, block: int) -> None:
        """Index a block that now holds a full block of prompt tokens (first writer wins)."""
        if chain not in self.index and block not in self.hash_of:
            self.index[chain] = block
            self.hash_of[block] = chain

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None              # kept for later prefix hits until needed
            else:
                self.free.append(block)

    def clear(self) -> None:
        """Forget the index (every block must be unreferenced)."""
        if any(self.refs):
            raise NemoconvError("cannot clear a block pool while requests hold blocks")
        self.index.clear()
        self.hash_of.clear()
        self.evictable.clear()
        self.free = list(range(self.num_blocks - 1, -1, -1))


class SlotPool:
    """Conv and SSM state of every Mamba layer for up to `num_slots` requests at once."""

    def __init__(self, spec: ModelSpec, num_slots: int, device, dtype: torch.dtype, ssm_dtype=None):
        self.layer_slot = {i: j for j, i in enumerate(i for i, c in enumerate(spec.layer_codes) if c == MAMBA)}
        n = len(self.layer_slot)
        ssm_dtype = resolve_ssm_dtype(ssm_dtype if ssm_dtype is not None else spec.mamba_ssm_cache_dtype)
        self.conv = torch.zeros(n, num_slots, spec.conv_dim, spec.conv_kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(n, num_slots, spec.mamba_num_heads, spec.mamba_head_dim, spec.ssm_state_size,
                               dtype=ssm_dtype, device=device)
        self.num_slots = num_slots

    @property
    def state_bytes(self) -> int:
        """Bytes of one request's Mamba state (all layers): what a state checkpoint costs."""
        return (self.conv[:, 0].numel() * self.conv.element_size()
                + self.ssm[:, 0].numel() * self.ssm.element_size())

    def reset(self, slot: int) -> None:
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()

    def snapshot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[:, slot].clone(), self.ssm[:, slot].clone()

    def restore(self, slot: int, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv[:, slot].copy_(state[0])
        self.ssm[:, slot].copy_(state[1])


class _PagedView:
    """Rows `first_slot … first_slot + batch - 1` of the slot pool (a contiguous range, so the Mamba
    layers get views) over a block pool."""

    def __init__(self, pool: BlockPool, slots: SlotPool, first_slot: int, batch: int):
        self.pool, self.slots = pool, slots
        self.batch = batch
        self.rows = slice(first_slot, first_slot + batch)

    def layer_mamba(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.slots.layer_slot[layer_idx]
        return self.slots.conv[j, self.rows], self.slots.ssm[j, self.rows]

    def layer_pool(self, layer_idx: int, hk: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An attention layer's keys and values, flat: [blocks · B, hk, d] each."""
        j = self.pool.layer_slot[layer_idx]
        return self.pool.k[j].view(-1, hk, d), self.pool.v[j].view(-1, hk, d)


class PagedStep(_PagedView):
    """A decode step with static shapes (a CUDA graph can replay it): one new token per row, each row at
    its own position (`pos` [b] on the device, from the model's pass).

    table        [b, W] int64 (device): each row's blocks, padded to a fixed width W (the pool's block
                 count), so that the shapes never change
    write_index  [b] int64 (device): the flat KV row of each row's new token
    """

    def __init__(self, pool: BlockPool, slots: SlotPool, first_slot: int, table: torch.Tensor,
                 write_index: torch.Tensor):
        super().__init__(pool, slots, first_slot, table.shape[0])
        self.table, self.write_index = table, write_index

    @staticmethod
    def host_inputs(pool: BlockPool, tables: list[list[int]], positions: list[int]) -> tuple[torch.Tensor, ...]:
        """(table [b, W], pos [b], write_index [b]) on the host for rows at `positions`."""
        table = block_table(tables, pool.num_blocks)
        pos = torch.tensor(positions, dtype=torch.int64)
        return table, pos, flat_rows(table, pos[:, None], pool.block_size)[:, 0]

    def decode_attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pos: torch.Tensor) -> torch.Tensor:
        """Store each row's new key/value [b, hk, 1, d] and attend q [b, hq, d] over the row's keys up to
        its position → [b, hq, d]."""
        keys, values = self.layer_pool(layer_idx, k.shape[1], k.shape[3])
        keys.index_copy_(0, self.write_index, k[:, :, 0])
        values.index_copy_(0, self.write_index, v[:, :, 0])
        return kernels.paged_decode_attention(q, keys, values, self.table, pos, self.pool.block_size)


class PagedBatch(_PagedView):
    """The cache one forward pass sees: rows `first_slot … first_slot + b - 1` of the slot pool (a
    contiguous range, so the Mamba layers get views) and one block table per row.

    new_positions [b, s] int64 (host): the position of each new token (a decode step has one per row,
    and rows may stand at different positions). Positions below `write_from[r]` lie in shared blocks
    that already hold the same keys/values: they are read, never written again. With `lengths`, only
    the first lengths[r] new tokens of a row are real, the rest right padding: their keys/values are
    written to, and read from, the pool's sink (padding position first + j at sink row j), so that the
    write has the same shape for every real length (a CUDA graph's input), never touches a block a
    request owns, and padding attends to its own keys, not to whatever a block held before: what
    padding computes depends only on the real tokens (routing a MoE layer's experts, it must not
    differ between caching modes).
    `positions` [b, t] (device) is the flat KV index (block · B + offset) of positions 0 … t-1 of each
    row, t = 1 + the largest new position; entries past a shorter row's end point at its own blocks
    or block 0 and must be masked by the caller.
    """

    def __init__(self, pool: BlockPool, slots: SlotPool, first_slot: int, tables: list[list[int]],
                 new_positions: torch.Tensor, write_from: list[int], lengths: list[int] | None = None):
        super().__init__(pool, slots, first_slot, len(tables))
        device = pool.k.device
        B = pool.block_size
        t = int(new_positions.max()) + 1
        width = -(-t // B)
        table = block_table(tables, width)
        positions = flat_rows(table, torch.arange(t).expand(len(tables), t), B)    # [b, t]
        write = new_positions >= torch.tensor(write_from, dtype=torch.int64)[:, None]   # [b, s]
        if lengths is not None:
            positions = self._padding_to_sink(pool, positions, new_positions[:, :1], lengths)
        rows = positions.gather(1, new_positions)                                  # flat KV index per new token
        self.positions = to_device(positions, device)
        self.write_rows = to_device(write.reshape(-1).nonzero()[:, 0], device) if not bool(write.all()) else None
        self.write_index = to_device(rows[write], device)                          # per written token
        self.any_write = bool(write.any())

    @staticmethod
    def _padding_to_sink(pool: BlockPool, positions: torch.Tensor, first: torch.Tensor, lengths: list[int]):
        """positions [b, t] with each row's padding (positions ≥ first + length) moved to sink rows."""
        key_pos = torch.arange(positions.shape[1])[None]
        offset = key_pos - first                                                   # [b, t]
        pad = offset >= torch.tensor(lengths, dtype=torch.int64)[:, None]
        if bool(pad.any()) and int(offset.max()) >= pool.sink_positions:
            raise NemoconvError(f"internal: {int(offset.max()) + 1} padded positions but the pool's sink holds "
                                f"{pool.sink_positions}")
        return torch.where(pad, pool.sink * pool.block_size + offset.clamp(min=0), positions)

    def index_tensors(self) -> tuple:
        """The device tensors that differ between passes of the same shape (a CUDA graph's inputs)."""
        return self.positions, self.write_index, self.write_rows

    def with_index_tensors(self, positions, write_index, write_rows) -> "PagedBatch":
        """This view reading and writing through other (same-shaped) index tensors."""
        view = copy.copy(self)
        view.positions, view.write_index, view.write_rows = positions, write_index, write_rows
        return view

    def attend_kv(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values [b, hk, s, d] (at `new_positions`; `start` is not used, rows may
        differ) and gather every row's keys/values so far: [b, hk, t, d]."""
        b, hk, _, d = k.shape
        keys, values = self.layer_pool(layer_idx, hk, d)                           # [blocks·B, hk, d]
        if self.any_write:
            for store, new in ((keys, k), (values, v)):
                rows = new.transpose(1, 2).reshape(-1, hk, d)                      # [b·s, hk, d]
                if self.write_rows is not None:
                    rows = rows.index_select(0, self.write_rows)
                store.index_copy_(0, self.write_index, rows)
        t = self.positions.shape[1]
        flat = self.positions.reshape(-1)
        return (keys.index_select(0, flat).view(b, t, hk, d).transpose(1, 2),
                values.index_select(0, flat).view(b, t, hk, d).transpose(1, 2))
