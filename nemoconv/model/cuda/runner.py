"""How the built-in model runs on its device: which path a pass takes, the fused pass, and CUDA graphs.

Every `NemotronHLM` has one `Runner` (`model.runner`). The reference model (`modeling`) decides nothing
about devices; it asks its runner. The serving engine uses the same public interface:

    runner.fused_ok()                      may a pass fuse residual adds into norms (CUDA, Triton, no hooks)
    runner.static_ok()                     may decode run with static shapes (its position a device tensor)
    runner.decode_signature(fused)         the model state a decode graph depends on, or None: run eagerly
    runner.prefill_signature(ids, fused)   the same for a prefill's graph
    runner.graph_pool()                    the CUDA graph memory pool of this model's decode graphs
    runner.fused_hidden(ids, ctx)          `model.run` with the fused structure (ctx.fused)

and the model's own entry points use `static_decode`, `graphed_prefill` and `generation_cache`.

The fused pass runs the same blocks as `model.run`, with each residual add fused into the next block's
pre-norm (one launch), and where the next mixer starts with an FP8 linear, the norm kernel also quantizes
its input. CUDA graphs: see `graphs`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from nemoconv import settings
from nemoconv.model import fp8
from nemoconv.model.cache import HybridCache
from nemoconv.model.common import Pass
from nemoconv.model.cuda import kernels
from nemoconv.model.cuda.graphs import GraphCache
from nemoconv.model.fp8 import Linear
from nemoconv.model.mamba import MambaMixer
from nemoconv.model.mlp import MLP, MoE
from nemoconv.storage.config import ATTENTION, MOE

# Prefills of at most this many rows × positions are captured as CUDA graphs (a graph keeps its
# activations' memory).
PREFILL_GRAPH_MAX_TOKENS = 8192

# Bumped whenever any module anywhere gains or replaces a submodule (torch's global registration hook), so a
# runner's list of its model's modules is rebuilt only then: walking the module tree for every pass cost ~2 ms
# of host time per prefill of the 8B layout, time in which the GPU waited.
_module_trees = [0]


def _tree_changed(module, name, submodule) -> None:
    _module_trees[0] += 1


nn.modules.module.register_module_module_registration_hook(_tree_changed)


class Runner:
    """The device side of one model (see the module docstring). State it keeps, all CUDA-only:

    pool               the memory pool of the model's decode graphs (made on first use)
    generation_caches  generate's caches by batch size (each with its decode graph), at most two
    """

    def __init__(self, model):
        # a weak reference: the model owns its runner, and a cycle would keep every weight alive after the last
        # reference to the model goes (until the cyclic GC runs: verify's second model would load beside it)
        self._model = weakref.ref(model)
        self.pool = None
        self.generation_caches: dict[int, HybridCache] = {}
        self._tree: tuple[int, list[nn.Module]] | None = None      # (_module_trees when listed, the modules)

    @property
    def model(self):
        return self._model()

    # ---- which path ------------------------------------------------------------------------
    def triton(self) -> bool:
        model = self.model
        return model.device.type == "cuda" and kernels.backend(model.backbone.embeddings.weight) == "triton"

    def modules(self) -> list[nn.Module]:
        """The model's modules, listed again only after a submodule was registered somewhere."""
        if self._tree is None or self._tree[0] != _module_trees[0]:
            self._tree = (_module_trees[0], list(self.model.modules()))
        return self._tree[1]

    def hooked(self) -> bool:
        """Any forward hook, global or on a module: then modules must run one by one, as written."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def fused_ok(self) -> bool:
        return self.triton() and not self.hooked()

    def static_ok(self) -> bool:
        """Decode with static shapes (its position a device tensor): CUDA with the Triton kernels."""
        spec = self.model.spec
        d = spec.head_dim
        return self.triton() and (ATTENTION not in spec.layer_codes or (d >= 16 and d & (d - 1) == 0))

    def decode_signature(self, fused: bool) -> tuple | None:
        """The model state a decode graph depends on (every parameter's and buffer's address), or None
        where graphs are off or cannot hold the step (hooks, FP8 or odd experts)."""
        model = self.model
        if not (model.cuda_graphs and fused):
            return None
        probe = model.backbone.embeddings.weight
        if any(isinstance(layer.mixer, MoE) and not layer.mixer.grouped_ok(probe) for layer in model.backbone.layers):
            return None
        # read from each module's own tables at every call: a tensor swapped in place (`.data =`, `.to()`, a buffer
        # set through the dict) changes the signature as well; so do the switches that choose kernels
        now = settings.current()
        addresses = (t.data_ptr() for m in self.modules() for table in (m._parameters, m._buffers)
                     for t in table.values() if t is not None)
        return (now.kernels, now.skinny, now.gemm, *addresses)

    def prefill_signature(self, input_ids: torch.Tensor, fused: bool) -> tuple | None:
        """The model state a prefill's CUDA graph depends on (`decode_signature`), or None where prefills
        run eagerly: graphs off, hooks, too many tokens, MoE layers (their routing reads expert counts
        on the host)."""
        if not self.static_ok() or input_ids.numel() > PREFILL_GRAPH_MAX_TOKENS:
            return None
        if any(layer.code == MOE for layer in self.model.backbone.layers):
            return None
        return self.decode_signature(fused)

    def decode_plan(self) -> tuple[bool, tuple | None]:
        """(fused, decode graph signature): what every decode step of a generate call uses."""
        fused = self.fused_ok()
        return fused, self.decode_signature(fused)

    def graph_pool(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    # ---- the fused pass --------------------------------------------------------------------
    def fused_hidden(self, input_ids: torch.Tensor, ctx: Pass) -> torch.Tensor:
        """`model.run` with each residual add fused into the next block's pre-norm (CUDA)."""
        model = self.model
        layers = model.backbone.layers
        hidden = model.backbone.embeddings(input_ids)                          # [b, s, hidden]
        residual = hidden.float() if model.spec.residual_in_fp32 else hidden
        lin = self._fp8_input(layers[0].mixer, residual, ctx)
        if lin is None:
            normed = kernels.rmsnorm(residual, layers[0].norm.weight, layers[0].norm.eps)
        else:
            normed, x_q = kernels.rmsnorm_fp8(residual, None, layers[0].norm.weight, layers[0].norm.eps,
                                              lin.input_scale, fp8.padded_rows(residual.numel() // residual.shape[-1]))
            ctx.prequant = (normed, x_q)
        for i, layer in enumerate(layers):
            out = layer.mixer(normed, ctx)
            last = i + 1 == len(layers)
            norm = model.backbone.norm_f if last else layers[i + 1].norm
            lin = None if last else self._fp8_input(layers[i + 1].mixer, out, ctx)
            if lin is None:
                residual, normed = kernels.add_rmsnorm(residual, out, norm.weight, norm.eps)
            else:
                residual, normed, x_q = kernels.rmsnorm_fp8(residual, out, norm.weight, norm.eps, lin.input_scale,
                                                            fp8.padded_rows(out.numel() // out.shape[-1]))
                ctx.prequant = (normed, x_q)
        return normed

    @staticmethod
    def _fp8_input(mixer: nn.Module, x: torch.Tensor, ctx: Pass) -> Linear | None:
        """The FP8 linear a mixer applies first to its input, if the norm before it can quantize for it
        (MLP up_proj; Mamba in_proj unless padding must be masked first)."""
        if isinstance(mixer, MLP):
            lin = mixer.up_proj
        elif isinstance(mixer, MambaMixer) and ctx.pad_mask is None:
            lin = mixer.in_proj
        else:
            return None
        return lin if lin.weight.dtype == fp8.FP8_DTYPE and fp8.prequantize_ok(lin, x) else None

    # ---- the model's own decode, prefill and generate --------------------------------------
    def static_decode(self, tokens: torch.Tensor, cache: HybridCache, start: int,
                      plan: tuple | None = None) -> tuple[torch.Tensor, bool]:
        """One decode step whose launches do not depend on the position (tokens [b, 1]), from the cache's
        decode graph where the plan allows → (logits [b, vocab], whether they are the graph's buffer)."""
        model = self.model
        fused, signature = plan if plan is not None else self.decode_plan()
        decoder = cache.static_decoder()
        decoder.load(tokens, start)

        def step(tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            ctx = Pass(cache=cache, start=cache.seq_len, pad_mask=None, attn_mask=None, causal=False, decode=True,
                       pos=pos, fused=fused)
            return model.logits(model.run(tokens, ctx)[:, 0])

        return decoder.step(step, signature, self.graph_pool() if signature is not None else None)

    def graphed_prefill(self, run, input_ids: torch.Tensor, pad: torch.Tensor | None, cache: HybridCache, start: int,
                        causal: bool, last_only: bool, fused: bool) -> torch.Tensor:
        """`run(input_ids, pad)` → logits, from a CUDA graph kept with the cache where one can hold it."""
        key = self._prefill_graph_key(input_ids, pad, cache, start, causal, last_only, fused)
        if key is None:
            return run(input_ids, pad)
        if cache.prefill_graphs is None:
            cache.prefill_graphs = GraphCache()
        logits, static = cache.prefill_graphs.run(key, run, input_ids, pad)
        return logits.clone() if static else logits

    def _prefill_graph_key(self, input_ids, pad, cache: HybridCache, start: int, causal: bool, last_only: bool,
                           fused: bool) -> tuple | None:
        """What a prefill's CUDA graph depends on, or None where it must run eagerly (see
        `prefill_signature`; also: the full logits asked for, whose buffer would be large, or a cache
        whose storage is not known to stay in place)."""
        signature = self.prefill_signature(input_ids, fused) if last_only else None
        storage = tuple(getattr(cache, name, None) for name in ("kv", "conv", "ssm", "valid"))
        if signature is None or any(not isinstance(t, torch.Tensor) for t in storage):
            return None
        return (tuple(input_ids.shape), input_ids.dtype, start, causal, pad is not None,
                tuple(t.data_ptr() for t in storage), signature)

    def generation_cache(self, batch_size: int, length: int) -> HybridCache:
        """A reset cache for generate, kept between calls (with its decode graph) per batch size; its
        length is rounded up to a multiple of 256 so that nearby lengths share it. At most two kept."""
        model, caches = self.model, self.generation_caches
        cache = caches.pop(batch_size, None)
        if cache is None or cache.max_length < length or cache.device != model.device or cache.dtype != model.dtype:
            cache = None
            while len(caches) >= 2:
                caches.pop(next(iter(caches)))
            cache = model.new_cache(batch_size, -(-length // 256) * 256)
        else:
            cache.reset()
        caches[batch_size] = cache
        return cache

