"""`ModelSpec`: a Nemotron-H network's layer layout and dimensions, the one source of expected tensor shapes.

Layer codes (docs/DESIGN.md §1): `M` Mamba-2, `*` attention, `-` MLP, `E` MoE. The spec says which HF tensors a
checkpoint must hold and their shapes, so that every tensor can be checked before anything is written. It is
built from config.json by `storage.config.parse_config`, which validates every field it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_KIND_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a Nemotron-H network that tensor shapes and the model depend on."""

    raw: dict = field(repr=False, compare=False)
    layer_codes: str
    pattern_field: str  # "hybrid_override_pattern" or "layers_block_type": written back as found
    mtp_codes: str
    num_mtp_layers: int
    vocab_size: int
    hidden_size: int
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    # dense MLP
    intermediate_size: int
    mlp_bias: bool
    # Mamba-2
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    use_conv_bias: bool
    mamba_proj_bias: bool
    chunk_size: int
    time_step_limit: tuple[float, float]
    time_step_min: float
    # MoE
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    moe_latent_size: int | None
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # misc
    layer_norm_epsilon: float
    tie_word_embeddings: bool
    residual_in_fp32: bool
    # activations and cache precision (read by the built-in model; defaults are the released configs')
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    mamba_ssm_cache_dtype: str = "float32"

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_codes)

    @property
    def mamba_intermediate(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_size(self) -> int:
        return self.mamba_intermediate + self.conv_dim + self.mamba_num_heads

    @property
    def expert_input_size(self) -> int:
        return self.moe_latent_size or self.hidden_size

    def counts(self) -> dict[str, int]:
        return {LAYER_KIND_NAMES[c]: self.layer_codes.count(c) for c in LAYER_KIND_NAMES}

    # ---- expected tensors ----------------------------------------------------------------
    def mixer_shapes(self, code: str) -> dict[str, tuple[int, ...]]:
        """Shapes of one layer's mixer tensors in HF names (relative to `...mixer.`)."""
        h = self.hidden_size
        if code == MAMBA:
            shapes = {
                "in_proj.weight": (self.in_proj_size, h),
                "conv1d.weight": (self.conv_dim, 1, self.conv_kernel),
                "A_log": (self.mamba_num_heads,),
                "D": (self.mamba_num_heads,),
                "dt_bias": (self.mamba_num_heads,),
                "norm.weight": (self.mamba_intermediate,),
                "out_proj.weight": (h, self.mamba_intermediate),
            }
            if self.use_conv_bias:
                shapes["conv1d.bias"] = (self.conv_dim,)
            if self.mamba_proj_bias:
                shapes["in_proj.bias"] = (self.in_proj_size,)
                shapes["out_proj.bias"] = (h,)
            return shapes
        if code == ATTENTION:
            q = self.num_attention_heads * self.head_dim
            kv = self.num_key_value_heads * self.head_dim
            shapes = {"q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                      "o_proj.weight": (h, q)}
            if self.attention_bias:
                shapes.update({"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.bias": (h,)})
            return shapes
        if code == MLP:
            shapes = {"up_proj.weight": (self.intermediate_size, h), "down_proj.weight": (h, self.intermediate_size)}
            if self.mlp_bias:
                shapes.update({"up_proj.bias": (self.intermediate_size,), "down_proj.bias": (h,)})
            return shapes
        if code == MOE:
            e, x, inter = self.n_routed_experts, self.expert_input_size, self.moe_intermediate_size
            shared = self.moe_shared_expert_intermediate_size
            shapes = {"gate.weight": (e, h), "gate.e_score_correction_bias": (e,)}
            for j in range(e):
                shapes[f"experts.{j}.up_proj.weight"] = (inter, x)
                shapes[f"experts.{j}.down_proj.weight"] = (x, inter)
            shapes["shared_experts.up_proj.weight"] = (shared, h)
            shapes["shared_experts.down_proj.weight"] = (h, shared)
            if self.mlp_bias:  # routed experts have no biases; the shared expert and latent projections do
                shapes["shared_experts.up_proj.bias"] = (shared,)
                shapes["shared_experts.down_proj.bias"] = (h,)
            if self.moe_latent_size:
                shapes["fc1_latent_proj.weight"] = (self.moe_latent_size, h)
                shapes["fc2_latent_proj.weight"] = (h, self.moe_latent_size)
                if self.mlp_bias:
                    shapes["fc1_latent_proj.bias"] = (self.moe_latent_size,)
                    shapes["fc2_latent_proj.bias"] = (h,)
            return shapes
        raise ValueError(code)

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the main network in canonical HF names, with its shape (MTP not included)."""
        shapes = {"backbone.embeddings.weight": (self.vocab_size, self.hidden_size)}
        for i, code in enumerate(self.layer_codes):
            shapes[f"backbone.layers.{i}.norm.weight"] = (self.hidden_size,)
            for name, shape in self.mixer_shapes(code).items():
                shapes[f"backbone.layers.{i}.mixer.{name}"] = shape
        shapes["backbone.norm_f.weight"] = (self.hidden_size,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def parameter_count(self) -> int:
        """The parameters of hf_shapes(), computed per layer kind, without listing every tensor (a hostile
        config's sizes are checked against the stored bytes with this before anything is built from them)."""
        per_kind = {code: self.hidden_size + sum(math.prod(s) for s in self.mixer_shapes(code).values())
                    for code in set(self.layer_codes)}
        heads = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size
        return heads + self.hidden_size + sum(per_kind[code] for code in self.layer_codes)

    def mtp_shapes(self) -> dict[str, tuple[int, ...]]:
        """MTP heads in HF names: `mtp.layers.{depth * len(pattern) + k}`, each a norm and a mixer; each depth's
        first layer also fuses the token embedding with the hidden state, its last has the final norm."""
        h = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {}
        per_depth = len(self.mtp_codes)
        for k in range(self.num_mtp_layers * per_depth):
            shapes[f"mtp.layers.{k}.norm.weight"] = (h,)
            for name, shape in self.mixer_shapes(self.mtp_layer_code(k)).items():
                shapes[f"mtp.layers.{k}.mixer.{name}"] = shape
            if k % per_depth == 0:
                shapes[f"mtp.layers.{k}.enorm.weight"] = (h,)
                shapes[f"mtp.layers.{k}.hnorm.weight"] = (h,)
                shapes[f"mtp.layers.{k}.eh_proj.weight"] = (h, 2 * h)
            if k % per_depth == per_depth - 1:
                shapes[f"mtp.layers.{k}.final_layernorm.weight"] = (h,)
        return shapes

    def mtp_layer_code(self, index: int) -> str | None:
        """Layer code of MTP layer `index` (layers repeat the MTP pattern once per predicted token)."""
        if not self.mtp_codes:
            return None
        return self.mtp_codes[index % len(self.mtp_codes)]

    def to_dict(self) -> dict:
        return {
            "pattern": self.layer_codes,
            "layers": self.num_layers,
            "counts": self.counts(),
            "mtp_pattern": self.mtp_codes if self.num_mtp_layers else "",
            "mtp_depth": self.num_mtp_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "attention": {"heads": self.num_attention_heads, "kv_heads": self.num_key_value_heads,
                          "head_dim": self.head_dim},
            "mlp_intermediate_size": self.intermediate_size,
            "mamba": {"heads": self.mamba_num_heads, "head_dim": self.mamba_head_dim, "groups": self.n_groups,
                      "state": self.ssm_state_size, "conv_kernel": self.conv_kernel},
            "moe": {"experts": self.n_routed_experts, "top_k": self.num_experts_per_tok,
                    "intermediate_size": self.moe_intermediate_size,
                    "shared_intermediate_size": self.moe_shared_expert_intermediate_size,
                    "latent_size": self.moe_latent_size} if MOE in self.layer_codes + self.mtp_codes else None,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
