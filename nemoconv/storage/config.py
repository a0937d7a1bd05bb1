"""Nemotron-H `config.json` → a validated `ModelSpec` (layer layout and dimensions).

Accepts both layout spellings (DESIGN.md §1): the released `hybrid_override_pattern` string
(`M` Mamba-2, `*` attention, `-` MLP, `E` MoE) and transformers ≥ 5's `layers_block_type` list.
The spec also says which HF tensors a checkpoint must hold and their shapes, so every tensor can be
checked before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.untrusted import load_json, type_name, want_float, want_int, want_str

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_KIND_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}
_BLOCK_TYPE_TO_CODE = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}
_CODE_TO_BLOCK_TYPE = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}

# Ranges of config.json's sizes: generous (several times the largest released models), so that a
# hostile value fails here in one line instead of as a huge allocation later. Every size is also
# checked against the bytes actually stored when a checkpoint is opened (check_stored_sizes).
MAX_LAYERS = 4096
MAX_MTP_LAYERS = 64
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 20       # hidden, intermediate and expert sizes
MAX_HEADS = 1 << 16       # attention and Mamba heads, groups, state size, head dims
MAX_EXPERTS = 1 << 14


def parse_layer_codes(value, field_name: str, max_layers: int = MAX_LAYERS) -> str:
    """A pattern string or a list of block-type names → a string of layer codes; errors on anything else."""
    if isinstance(value, (str, list)) and len(value) > max_layers:
        raise NemoconvError(f"config.json: {field_name} describes {len(value)} layers; at most {max_layers} "
                            f"are supported")
    if isinstance(value, str):
        bad = sorted({c for c in value if c not in LAYER_KIND_NAMES})
        if bad:
            shown = repr(value) if len(value) <= 80 else repr(value[:80]) + "…"
            raise NemoconvError(
                f"config.json: {field_name} {shown} has invalid layer character(s) {''.join(bad)[:20]!r}; "
                f"allowed are M (Mamba-2), * (attention), - (MLP), E (MoE)"
            )
        return value
    if isinstance(value, list):
        codes = []
        for i, name in enumerate(value):
            code = _BLOCK_TYPE_TO_CODE.get(name) if isinstance(name, str) else None
            if code is None:
                raise NemoconvError(
                    f"config.json: {field_name}[{i}] = {str(name)[:40]!r} is not a known layer type "
                    f"(expected one of {sorted(_BLOCK_TYPE_TO_CODE)})"
                )
            codes.append(code)
        return "".join(codes)
    raise NemoconvError(f"config.json: {field_name} must be a string pattern or a list, not {type_name(value)}")


def codes_to_block_types(codes: str, like: list | None = None) -> list[str]:
    """Layer codes → block-type names, spelled like `like` (transformers 5 uses linear/full_attention)."""
    v5 = bool(like) and any(n in ("linear_attention", "full_attention") for n in like)
    names = {MAMBA: "linear_attention" if v5 else "mamba", ATTENTION: "full_attention" if v5 else "attention",
             MLP: "mlp", MOE: "moe"}
    return [names[c] for c in codes]


def _get(cfg: dict, *keys, default=None):
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    return default


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


def _float(value, what: str, allow_infinity: bool = False) -> float:
    """A JSON number, including transformers' spelling of infinity (`{"__float__": "Infinity"}`)."""
    if isinstance(value, dict) and set(value) == {"__float__"} and value["__float__"] in ("Infinity", "-Infinity"):
        value = float(value["__float__"])
    if allow_infinity and isinstance(value, float) and math.isinf(value):
        return value
    return want_float(value, what)


def _int(cfg: dict, *keys, default=None, lo: int = 0, hi: int = MAX_WIDTH) -> int:
    value = _get(cfg, *keys, default=default)
    if value is None:
        raise NemoconvError(f"config.json: missing required field {keys[0]!r}")
    return want_int(value, f"config.json: {keys[0]}", lo, hi)


def _number(cfg: dict, *keys, default: float, lo: float, hi: float) -> float:
    value = _float(_get(cfg, *keys, default=default), f"config.json: {keys[0]}")
    if not lo <= value <= hi:
        raise NemoconvError(f"config.json: {keys[0]} = {value!r} is out of range [{lo}, {hi}]")
    return value


def _bool(cfg: dict, *keys, default: bool) -> bool:
    value = _get(cfg, *keys, default=default)
    if not isinstance(value, bool):
        raise NemoconvError(f"config.json: {keys[0]} must be true or false, not {type_name(value)}")
    return value


def _name(cfg: dict, key: str, default: str) -> str:
    return want_str(_get(cfg, key, default=default), f"config.json: {key}", max_len=64)


def _time_step_limit(cfg: dict) -> tuple[float, float]:
    limit = _get(cfg, "time_step_limit", "mamba_dt_limit", default=[0.0, float("inf")])
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise NemoconvError(f"config.json: time_step_limit must be a list of two numbers, not {type_name(limit)}"
                            + (f" of {len(limit)}" if isinstance(limit, list) else ""))
    low = _float(limit[0], "config.json: time_step_limit[0]")
    high = _float(limit[1], "config.json: time_step_limit[1]", allow_infinity=True)
    if not 0 <= low <= high:
        raise NemoconvError(f"config.json: time_step_limit {[low, high]} must satisfy 0 <= low <= high")
    return low, high


def parse_config(cfg: dict) -> ModelSpec:
    """Validate a Nemotron-H config dict and return its spec; any contradiction is a NemoconvError.
    Every field read is type- and range-checked: a string, list, boolean, NaN or absurd size where a
    number belongs is one clear line, never a TypeError later or an allocation sized by it."""
    if not isinstance(cfg, dict):
        raise NemoconvError(f"config.json must hold a JSON object, not {type_name(cfg)}")
    model_type = cfg.get("model_type")
    if model_type not in (None, "nemotron_h"):
        shown = repr(model_type) if isinstance(model_type, str) and len(model_type) <= 40 else type_name(model_type)
        raise NemoconvError(f"config.json: model_type is {shown}, nemoconv handles 'nemotron_h' only")
    if cfg.get("layers_block_type") is not None:
        codes, pattern_field = parse_layer_codes(cfg["layers_block_type"], "layers_block_type"), "layers_block_type"
    elif cfg.get("hybrid_override_pattern") is not None:
        codes, pattern_field = parse_layer_codes(cfg["hybrid_override_pattern"], "hybrid_override_pattern"), \
            "hybrid_override_pattern"
    else:
        raise NemoconvError("config.json: neither hybrid_override_pattern nor layers_block_type is set")
    if not codes:
        raise NemoconvError("config.json: the layer pattern is empty")
    if cfg.get("num_hidden_layers") is not None:
        declared = _int(cfg, "num_hidden_layers", lo=1, hi=MAX_LAYERS)
        if declared != len(codes):
            raise NemoconvError(
                f"config.json: num_hidden_layers is {declared} but {pattern_field} has {len(codes)} layers"
            )
    num_mtp = _int(cfg, "num_nextn_predict_layers", default=0, hi=MAX_MTP_LAYERS)
    mtp_raw = _get(cfg, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
    mtp_codes = parse_layer_codes(mtp_raw, "mtp_hybrid_override_pattern", MAX_MTP_LAYERS) \
        if (num_mtp and mtp_raw) else ""
    if num_mtp and not mtp_codes:
        mtp_codes = ATTENTION + MOE  # transformers' default MTP layout

    hidden = _int(cfg, "hidden_size", lo=1)
    heads = _int(cfg, "num_attention_heads", default=32, hi=MAX_HEADS)
    latent = _int(cfg, "moe_latent_size", default=0)
    spec = ModelSpec(
        raw=cfg,
        layer_codes=codes,
        pattern_field=pattern_field,
        mtp_codes=mtp_codes,
        num_mtp_layers=num_mtp,
        vocab_size=_int(cfg, "vocab_size", lo=1, hi=MAX_VOCAB),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=_int(cfg, "num_key_value_heads", default=heads, hi=MAX_HEADS),
        head_dim=_int(cfg, "head_dim", "attention_head_dim", default=hidden // max(heads, 1), hi=MAX_HEADS),
        # transformers' NemotronH attention never has biases, whatever attention_bias says
        attention_bias=False,
        intermediate_size=_int(cfg, "intermediate_size", default=0),
        mlp_bias=_bool(cfg, "mlp_bias", default=False),
        mamba_num_heads=_int(cfg, "mamba_num_heads", default=0, hi=MAX_HEADS),
        mamba_head_dim=_int(cfg, "mamba_head_dim", default=0, hi=MAX_HEADS),
        ssm_state_size=_int(cfg, "ssm_state_size", default=128, hi=MAX_HEADS),
        n_groups=_int(cfg, "n_groups", "mamba_n_groups", default=8, hi=MAX_HEADS),
        conv_kernel=_int(cfg, "conv_kernel", "mamba_d_conv", default=4, lo=1, hi=1024),
        use_conv_bias=_bool(cfg, "use_conv_bias", "mamba_conv_bias", default=True),
        # transformers' Mamba mixer reads `use_bias` for in_proj/out_proj (`mamba_proj_bias` is not used)
        mamba_proj_bias=_bool(cfg, "use_bias", default=False),
        chunk_size=_int(cfg, "chunk_size", "mamba_chunk_size", default=128, lo=1, hi=1 << 16),
        time_step_limit=_time_step_limit(cfg),
        time_step_min=_number(cfg, "time_step_min", "mamba_dt_min", default=0.001, lo=0.0, hi=1e4),
        n_routed_experts=_int(cfg, "n_routed_experts", "num_local_experts", default=0, hi=MAX_EXPERTS),
        num_experts_per_tok=_int(cfg, "num_experts_per_tok", default=0, hi=MAX_EXPERTS),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", default=0),
        moe_shared_expert_intermediate_size=_int(cfg, "moe_shared_expert_intermediate_size", default=0),
        moe_latent_size=latent or None,
        n_group=_int(cfg, "n_group", default=1, hi=MAX_EXPERTS),
        topk_group=_int(cfg, "topk_group", default=1, hi=MAX_EXPERTS),
        norm_topk_prob=_bool(cfg, "norm_topk_prob", default=True),
        routed_scaling_factor=_number(cfg, "routed_scaling_factor", default=1.0, lo=0.0, hi=1e6),
        layer_norm_epsilon=_number(cfg, "layer_norm_epsilon", "rms_norm_eps", default=1e-5, lo=0.0, hi=1.0),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", default=False),
        residual_in_fp32=_bool(cfg, "residual_in_fp32", default=False),
        mlp_hidden_act=_name(cfg, "mlp_hidden_act", "relu2"),
        mamba_hidden_act=_name(cfg, "mamba_hidden_act", "silu"),
        mamba_ssm_cache_dtype=_name(cfg, "mamba_ssm_cache_dtype", "float32"),
    )
    _check_consistency(spec)
    return spec


def _check_consistency(spec: ModelSpec) -> None:
    kinds = set(spec.layer_codes + spec.mtp_codes)
    if MAMBA in kinds:
        if not (spec.mamba_num_heads and spec.mamba_head_dim and spec.n_groups and spec.ssm_state_size):
            raise NemoconvError("config.json: Mamba layers need mamba_num_heads, mamba_head_dim, n_groups, ssm_state_size")
        if spec.mamba_num_heads % spec.n_groups:
            raise NemoconvError(
                f"config.json: mamba_num_heads {spec.mamba_num_heads} is not divisible by n_groups {spec.n_groups}"
            )
    if ATTENTION in kinds:
        if not spec.head_dim:
            raise NemoconvError("config.json: attention layers need head_dim (or hidden_size / num_attention_heads) "
                                "of at least 1")
        if not spec.num_attention_heads or not spec.num_key_value_heads or \
                spec.num_attention_heads % spec.num_key_value_heads:
            raise NemoconvError(
                f"config.json: num_attention_heads {spec.num_attention_heads} must be a positive multiple of "
                f"num_key_value_heads {spec.num_key_value_heads}"
            )
    if MLP in kinds and not spec.intermediate_size:
        raise NemoconvError("config.json: MLP layers need intermediate_size")
    if MOE in kinds:
        if not (spec.n_routed_experts and spec.num_experts_per_tok and spec.moe_intermediate_size):
            raise NemoconvError("config.json: MoE layers need n_routed_experts, num_experts_per_tok, moe_intermediate_size")
        if spec.num_experts_per_tok > spec.n_routed_experts:
            raise NemoconvError("config.json: num_experts_per_tok exceeds n_routed_experts")
        if spec.n_group < 1 or spec.n_routed_experts % spec.n_group or spec.topk_group > spec.n_group:
            raise NemoconvError(
                f"config.json: n_group {spec.n_group} / topk_group {spec.topk_group} do not divide "
                f"{spec.n_routed_experts} experts"
            )


def load_config(directory: str | Path) -> tuple[dict, ModelSpec]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise NemoconvError(f"{directory}: no config.json (not a Nemotron-H checkpoint directory)")
    cfg = load_json(path, allow_infinity=True)  # time_step_limit: [0.0, Infinity], as transformers writes it
    return cfg, parse_config(cfg)


def check_stored_sizes(spec: ModelSpec, entries: dict, scheme) -> None:
    """The sizes config.json declares must fit the bytes the checkpoint actually stores; checked when it is
    opened, before anything is allocated from them (model, caches, logits, prompts, calibration data).

    `entries`: stored tensors (with `.shape`) by stored name; `scheme`: their naming scheme (`normalize`,
    `to_hf`). The embedding must be stored as [vocab_size, hidden_size], and the network the config
    describes may not need more than twice the parameters stored (every tensor is checked by name and
    shape later, when it is planned; this only stops sizes that no stored byte backs)."""
    for name, entry in entries.items():
        if scheme.to_hf(scheme.normalize(name)) == "backbone.embeddings.weight":
            if tuple(entry.shape) != (spec.vocab_size, spec.hidden_size):
                raise NemoconvError(f"config.json: vocab_size × hidden_size is [{spec.vocab_size}, "
                                    f"{spec.hidden_size}] but the embedding {name} is stored as "
                                    f"{list(entry.shape)}")
    stored = sum(math.prod(entry.shape) for entry in entries.values())
    implied = spec.parameter_count()
    if implied > 2 * stored:
        raise NemoconvError(f"config.json describes a network of {implied:,} parameters but the checkpoint stores "
                            f"{stored:,}: its sizes do not match its tensors")
