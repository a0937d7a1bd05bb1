"""The HF `nemotron_h` config of a Megatron checkpoint, which carries none of its own.

Found, in order: `--config FILE` (an HF config.json); a `config.json` nemoconv wrote beside the tensors;
Megatron-Bridge's `run_config.yaml` (its `model:` section: the model provider's TransformerConfig fields);
NeMo 2's `context/model.yaml` (its `config:` section). None of them: a clear error.
"""

from __future__ import annotations

from pathlib import Path

from nemoconv.errors import NemoconvError
from nemoconv.untrusted import want_dict

_MAX_YAML = 16 << 20

# Megatron TransformerConfig / provider field → HF nemotron_h field.
_FIELDS = {
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "mamba_num_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "mamba_state_dim": "ssm_state_size",
    "mamba_num_groups": "n_groups",
    "layernorm_epsilon": "layer_norm_epsilon",
    "vocab_size": "vocab_size",
    "num_moe_experts": "n_routed_experts",
    "moe_router_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_latent_size": "moe_latent_size",
    "moe_router_num_groups": "n_group",
    "moe_router_group_topk": "topk_group",
    "moe_router_topk_scaling_factor": "routed_scaling_factor",
    "share_embeddings_and_output_weights": "tie_word_embeddings",
    "fp32_residual_connection": "residual_in_fp32",
}


def split_layer_pattern(pattern: str) -> tuple[str, str, int]:
    """Megatron's unified `hybrid_layer_pattern` → (main pattern, MTP pattern per depth, MTP depth): `|` marks
    pipeline stages (dropped), `/` starts each MTP depth's pattern (all the same)."""
    main, *mtp = pattern.replace("|", "").split("/")
    if mtp and len(set(mtp)) != 1:
        raise NemoconvError(f"hybrid_layer_pattern {pattern!r}: MTP depths have different patterns {mtp}")
    return main, (mtp[0] if mtp else ""), len(mtp)


def join_layer_pattern(main: str, mtp: str, depth: int) -> str:
    return main + "".join("/" + mtp for _ in range(depth))


def hf_config_from_megatron(model: dict, where: str) -> dict:
    """An HF nemotron_h config from Megatron model fields (unknown fields are ignored, missing ones defaulted)."""
    cfg: dict = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"]}
    for src, dst in _FIELDS.items():
        if model.get(src) is not None:
            cfg[dst] = model[src]
    pattern = model.get("hybrid_layer_pattern") or model.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise NemoconvError(f"{where}: no hybrid_layer_pattern / hybrid_override_pattern (not a hybrid Mamba model)")
    main, mtp, depth = split_layer_pattern(pattern)
    if not depth and model.get("mtp_num_layers"):
        mtp, depth = model.get("mtp_hybrid_override_pattern") or "", int(model["mtp_num_layers"])
    cfg["hybrid_override_pattern"] = main
    cfg["num_hidden_layers"] = len(main)
    if depth:
        cfg["num_nextn_predict_layers"] = depth
        cfg["mtp_hybrid_override_pattern"] = mtp
    if model.get("add_bias_linear"):
        cfg["use_bias"] = cfg["mlp_bias"] = True
    if "vocab_size" not in cfg:
        raise NemoconvError(f"{where}: no vocab_size; pass --config FILE (an HF config.json)")
    return cfg


def _load_yaml(path: Path) -> dict:
    """YAML from a training run: plain data only; Python-object tags (`!!python/…`, `!…`) read as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    try:
        if path.stat().st_size > _MAX_YAML:
            raise NemoconvError(f"{path}: implausibly large for a config")
        data = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise NemoconvError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise NemoconvError(f"{path}: not a mapping")
    return data


def _read_hf_config(path: Path) -> dict:
    """An HF config.json, read as `load_config` reads one (transformers writes `Infinity` in them)."""
    import json

    try:
        if path.stat().st_size > _MAX_YAML:
            raise NemoconvError(f"{path}: implausibly large for a config")
        return want_dict(json.loads(path.read_text()), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NemoconvError(f"{path}: cannot read config ({exc})") from None


def find_hf_config(source: Path, dist_dir: Path, config_file=None) -> dict:
    if config_file is not None:
        return _read_hf_config(Path(config_file))
    for d in dict.fromkeys((dist_dir, source)):
        if (d / "config.json").is_file():
            return _read_hf_config(d / "config.json")
    for d in dict.fromkeys((dist_dir, dist_dir.parent, source)):
        run = d / "run_config.yaml"
        if run.is_file():
            model = _load_yaml(run).get("model")
            if isinstance(model, dict):
                return hf_config_from_megatron(model, str(run))
    for d in dict.fromkeys((dist_dir.parent, source)):
        ctx = d / "context" / "model.yaml"
        if ctx.is_file():
            model = _load_yaml(ctx).get("config")
            if isinstance(model, dict):
                return hf_config_from_megatron(model, str(ctx))
    raise NemoconvError(f"{source}: a Megatron checkpoint without a model config (no config.json, run_config.yaml "
                        f"or context/model.yaml); pass --config FILE with the HF config.json")


def megatron_model_fields(cfg: dict) -> dict:
    """The reverse: Megatron model fields for a run_config.yaml beside a checkpoint nemoconv writes."""
    model = {src: cfg[dst] for src, dst in _FIELDS.items() if cfg.get(dst) is not None}
    main = cfg.get("hybrid_override_pattern") or ""
    depth = int(cfg.get("num_nextn_predict_layers") or 0)
    model["hybrid_layer_pattern"] = join_layer_pattern(main, cfg.get("mtp_hybrid_override_pattern") or "", depth)
    model["num_layers"] = len(main)
    return model
