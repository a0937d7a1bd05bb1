"""Nemotron-H `config.json` → a validated `ModelSpec` (storage.model_spec: layer layout and dimensions).

Accepts both layout spellings (docs/DESIGN.md §1): the released `hybrid_override_pattern` string
(`M` Mamba-2, `*` attention, `-` MLP, `E` MoE) and transformers ≥ 5's `layers_block_type` list.
Every field read is type- and range-checked, so a hostile config fails here in one line.
"""

from __future__ import annotations

import math
from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.storage.model_spec import ATTENTION, LAYER_KIND_NAMES, MAMBA, MLP, MOE, ModelSpec
from nemoconv.untrusted import load_json, type_name, want_float, want_int, want_str

__all__ = ["ATTENTION", "LAYER_KIND_NAMES", "MAMBA", "MLP", "MOE", "ModelSpec", "check_stored_sizes", "load_config",
           "parse_config", "parse_layer_codes"]

_BLOCK_TYPE_TO_CODE = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}

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


def _get(cfg: dict, *keys, default=None):
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    return default


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
    codes, pattern_field = _layer_layout(cfg)
    num_mtp, mtp_codes = _mtp_layout(cfg)
    hidden = _int(cfg, "hidden_size", lo=1)
    heads = _int(cfg, "num_attention_heads", default=32, hi=MAX_HEADS)
    latent = _int(cfg, "moe_latent_size", default=0)
    # keyword arguments are read left to right: the first bad field (in this order) is the one reported
    spec = ModelSpec(raw=cfg, layer_codes=codes, pattern_field=pattern_field, mtp_codes=mtp_codes,
                     num_mtp_layers=num_mtp, vocab_size=_int(cfg, "vocab_size", lo=1, hi=MAX_VOCAB), hidden_size=hidden,
                     **_attention_fields(cfg, hidden, heads), **_mlp_fields(cfg), **_mamba_fields(cfg),
                     **_moe_fields(cfg, latent), **_other_fields(cfg))
    _check_consistency(spec)
    return spec


def _layer_layout(cfg: dict) -> tuple[str, str]:
    """The main stack's layer codes and the field they were read from (written back as found)."""
    for pattern_field in ("layers_block_type", "hybrid_override_pattern"):
        if cfg.get(pattern_field) is not None:
            codes = parse_layer_codes(cfg[pattern_field], pattern_field)
            break
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
    return codes, pattern_field


def _mtp_layout(cfg: dict) -> tuple[int, str]:
    """MTP depth and the layer codes of one depth (transformers' default `*E` when the depth is set alone)."""
    num_mtp = _int(cfg, "num_nextn_predict_layers", default=0, hi=MAX_MTP_LAYERS)
    mtp_raw = _get(cfg, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
    mtp_codes = parse_layer_codes(mtp_raw, "mtp_hybrid_override_pattern", MAX_MTP_LAYERS) \
        if (num_mtp and mtp_raw) else ""
    if num_mtp and not mtp_codes:
        mtp_codes = ATTENTION + MOE  # transformers' default MTP layout
    return num_mtp, mtp_codes


def _attention_fields(cfg: dict, hidden: int, heads: int) -> dict:
    return dict(
        num_attention_heads=heads,
        num_key_value_heads=_int(cfg, "num_key_value_heads", default=heads, hi=MAX_HEADS),
        head_dim=_int(cfg, "head_dim", "attention_head_dim", default=hidden // max(heads, 1), hi=MAX_HEADS),
        attention_bias=False,  # transformers' NemotronH attention never has biases, whatever attention_bias says
    )


def _mlp_fields(cfg: dict) -> dict:
    return dict(intermediate_size=_int(cfg, "intermediate_size", default=0),
                mlp_bias=_bool(cfg, "mlp_bias", default=False))


def _mamba_fields(cfg: dict) -> dict:
    return dict(
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
    )


def _moe_fields(cfg: dict, latent: int) -> dict:
    return dict(
        n_routed_experts=_int(cfg, "n_routed_experts", "num_local_experts", default=0, hi=MAX_EXPERTS),
        num_experts_per_tok=_int(cfg, "num_experts_per_tok", default=0, hi=MAX_EXPERTS),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", default=0),
        moe_shared_expert_intermediate_size=_int(cfg, "moe_shared_expert_intermediate_size", default=0),
        moe_latent_size=latent or None,
        n_group=_int(cfg, "n_group", default=1, hi=MAX_EXPERTS),
        topk_group=_int(cfg, "topk_group", default=1, hi=MAX_EXPERTS),
        norm_topk_prob=_bool(cfg, "norm_topk_prob", default=True),
        routed_scaling_factor=_number(cfg, "routed_scaling_factor", default=1.0, lo=0.0, hi=1e6),
    )


def _other_fields(cfg: dict) -> dict:
    return dict(
        layer_norm_epsilon=_number(cfg, "layer_norm_epsilon", "rms_norm_eps", default=1e-5, lo=0.0, hi=1.0),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", default=False),
        residual_in_fp32=_bool(cfg, "residual_in_fp32", default=False),
        mlp_hidden_act=_name(cfg, "mlp_hidden_act", "relu2"),
        mamba_hidden_act=_name(cfg, "mamba_hidden_act", "silu"),
        mamba_ssm_cache_dtype=_name(cfg, "mamba_ssm_cache_dtype", "float32"),
    )


def _check_consistency(spec: ModelSpec) -> None:
    kinds = set(spec.layer_codes + spec.mtp_codes)
    if MAMBA in kinds:
        if not (spec.mamba_num_heads and spec.mamba_head_dim and spec.n_groups and spec.ssm_state_size):
            raise NemoconvError("config.json: Mamba layers need mamba_num_heads, mamba_head_dim, n_groups, "
                                "ssm_state_size")
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
            raise NemoconvError("config.json: MoE layers need n_routed_experts, num_experts_per_tok, "
                                "moe_intermediate_size")
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

    `entries`: stored tensors (with `.shape`) by stored name; `scheme`: their naming scheme (`hf_name`). The
    embedding must be stored as [vocab_size, hidden_size], and the network the config describes may not need
    more than twice the parameters stored (every tensor is checked by name and shape later, when it is
    planned; this only stops sizes that no stored byte backs)."""
    for name, entry in entries.items():
        if scheme.hf_name(name) == "backbone.embeddings.weight":
            if tuple(entry.shape) != (spec.vocab_size, spec.hidden_size):
                raise NemoconvError(f"config.json: vocab_size × hidden_size is [{spec.vocab_size}, "
                                    f"{spec.hidden_size}] but the embedding {name} is stored as "
                                    f"{list(entry.shape)}")
    stored = sum(math.prod(entry.shape) for entry in entries.values())
    implied = spec.parameter_count()
    if implied > 2 * stored:
        raise NemoconvError(f"config.json describes a network of {implied:,} parameters but the checkpoint stores "
                            f"{stored:,}: its sizes do not match its tensors")
