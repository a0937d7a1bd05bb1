"""The hybrid decoding cache: KV for attention layers, conv and SSM state for Mamba layers, nothing else.

Everything is allocated once, for a fixed batch size and maximum length, so decoding never grows
or reallocates a tensor (unlike a KV cache grown with torch.cat each step). MLP and MoE layers keep
no state and get no storage.
"""

from __future__ import annotations

import torch

from nemoconv.errors import NemoconvError
from nemoconv.model.cuda import kernels
from nemoconv.model.cuda.graphs import GraphCache, StaticDecoder
from nemoconv.storage.config import ATTENTION, MAMBA, ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_ssm_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise NemoconvError(f"unsupported SSM cache dtype {value!r} (use one of {sorted(_DTYPES)})")


class HybridCache:
    """Decoding state of a batch: `seq_len` positions consumed so far, at most `max_length`.

    Memory layout (allocated here, once):
      kv     [n_attention_layers, 2, batch, kv_heads, max_length, head_dim]  model dtype
             kv[i, 0] / kv[i, 1] are the keys / values of the i-th attention layer; position j of a
             row lives at [..., j, :], so a step writes one slice and attention reads the prefix.
      conv   [n_mamba_layers, batch, conv_dim, conv_kernel - 1]              model dtype
             the last k-1 inputs (x, B, C channels before the conv) of each Mamba layer.
      ssm    [n_mamba_layers, batch, mamba_heads, mamba_head_dim, ssm_state] float32 by default
             the recurrent state of each Mamba layer (accumulates over the whole sequence, hence fp32).
      valid  [batch, max_length] bool
             which key positions hold real tokens (False for left padding), used to mask attention.
    Layer index → slot in kv / conv+ssm is `attention_slot` / `mamba_slot`.
    """

    def __init__(self, spec: ModelSpec, batch_size: int, max_length: int, device="cpu",
                 dtype: torch.dtype = torch.float32, ssm_dtype=None):
        if batch_size < 1 or max_length < 1:
            raise NemoconvError(f"cache needs batch_size ≥ 1 and max_length ≥ 1, got {batch_size}, {max_length}")
        self.spec = spec
        self.batch_size, self.max_length = batch_size, max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.ssm_dtype = resolve_ssm_dtype(ssm_dtype if ssm_dtype is not None else spec.mamba_ssm_cache_dtype)
        codes = spec.layer_codes
        self.attention_slot = {i: j for j, i in enumerate(i for i, c in enumerate(codes) if c == ATTENTION)}
        self.mamba_slot = {i: j for j, i in enumerate(i for i, c in enumerate(codes) if c == MAMBA)}
        kw = {"device": self.device}
        self.kv = torch.zeros(len(self.attention_slot), 2, batch_size, spec.num_key_value_heads, max_length,
                              spec.head_dim, dtype=dtype, **kw)
        self.conv = torch.zeros(len(self.mamba_slot), batch_size, spec.conv_dim, spec.conv_kernel - 1,
                                dtype=dtype, **kw)
        self.ssm = torch.zeros(len(self.mamba_slot), batch_size, spec.mamba_num_heads, spec.mamba_head_dim,
                               spec.ssm_state_size, dtype=self.ssm_dtype, **kw)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, **kw)
        self.seq_len = 0
        self.has_padding = False  # any False in `valid` so far (tracked on the host: no device sync)
        self._decoder = None      # graphs.StaticDecoder: static decode buffers and CUDA graph (CUDA only)
        self.prefill_graphs: GraphCache | None = None   # CUDA graphs of prefills into this cache (cuda.runner)

    # ---- positions -------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        """Number of positions (padding included) already consumed."""
        return self.seq_len

    def reserve(self, new_tokens: int, valid: torch.Tensor | None = None) -> int:
        """Mark the next `new_tokens` positions (valid [b, new_tokens] bool, default all real); returns their start."""
        start = self.seq_len
        if start + new_tokens > self.max_length:
            raise NemoconvError(f"cache holds at most {self.max_length} positions; "
                                f"{start} used, {new_tokens} more requested")
        self.valid[:, start:start + new_tokens] = True if valid is None else valid
        self.has_padding = self.has_padding or valid is not None
        return start

    def advance(self, new_tokens: int) -> None:
        self.seq_len += new_tokens

    def reset(self) -> None:
        for t in (self.kv, self.conv, self.ssm, self.valid):
            t.zero_()
        self.seq_len = 0
        self.has_padding = False

    def static_decoder(self):
        """The static decode buffers and CUDA graph of this cache (made on first use; see `graphs`).
        They stay valid through `reset` and `reorder_cache`, which work in place."""
        if self._decoder is None:
            self._decoder = StaticDecoder(self.batch_size, self.device)
        return self._decoder

    # ---- per-layer views -------------------------------------------------------------------
    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of an attention layer: two [b, kv_heads, max_length, head_dim] views."""
        slot = self.attention_slot[layer_idx]
        return self.kv[slot, 0], self.kv[slot, 1]

    def attend_kv(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store keys/values [b, hk, s, d] of positions start… and return all so far: [b, hk, start + s, d]."""
        keys, values = self.layer_kv(layer_idx)
        end = start + k.shape[2]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def decode_attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pos: torch.Tensor) -> torch.Tensor:
        """A static-shape decode step's attention: store the new key/value [b, hk, 1, d] at position
        pos (int64 [1] on the device) and attend q [b, hq, d] over the valid keys up to it → [b, hq, d]."""
        keys, values = self.layer_kv(layer_idx)
        return kernels.decode_attention(q, keys, values, self.valid, pos, new_kv=(k[:, :, 0], v[:, :, 0]))

    def layer_mamba(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv state [b, conv_dim, k-1] and SSM state [b, h, p, n] of a Mamba layer (views)."""
        slot = self.mamba_slot[layer_idx]
        return self.conv[slot], self.ssm[slot]

    # ---- beam search -----------------------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row i becomes old row beam_idx[i], in place (the storage stays where it is)."""
        beam_idx = beam_idx.to(self.device)
        self.kv.copy_(self.kv.index_select(2, beam_idx))
        self.conv.copy_(self.conv.index_select(1, beam_idx))
        self.ssm.copy_(self.ssm.index_select(1, beam_idx))
        self.valid.copy_(self.valid.index_select(0, beam_idx))

    # ---- memory ----------------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, per kind: kv (attention), conv and ssm (Mamba), mask, and total."""
        sizes = {"kv": self.kv, "conv": self.conv, "ssm": self.ssm, "mask": self.valid}
        out = {k: t.numel() * t.element_size() for k, t in sizes.items()}
        out["total"] = sum(out.values())
        return out

    def layer_memory_bytes(self) -> dict[int, dict[str, int]]:
        """Bytes held per layer that holds any: {layer: {"kv": …}} or {layer: {"conv": …, "ssm": …}}."""
        out: dict[int, dict[str, int]] = {}
        for i in self.attention_slot:
            k, v = self.layer_kv(i)
            out[i] = {"kv": (k.numel() + v.numel()) * k.element_size()}
        for i in self.mamba_slot:
            conv, ssm = self.layer_mamba(i)
            out[i] = {"conv": conv.numel() * conv.element_size(), "ssm": ssm.numel() * ssm.element_size()}
        return dict(sorted(out.items()))

    def __repr__(self) -> str:
        mib = self.memory_bytes()["total"] / 2**20
        return (f"HybridCache(batch={self.batch_size}, max_length={self.max_length}, seq_len={self.seq_len}, "
                f"attention_layers={len(self.attention_slot)}, mamba_layers={len(self.mamba_slot)}, {mib:.2f} MiB)")
