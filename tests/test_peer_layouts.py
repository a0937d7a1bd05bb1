"""Independent evidence that our `nemo` and `max` layouts are what NeMo AutoModel and MAX themselves produce.

A conversion bug that the inverse mapping undoes would pass every round trip and every verify run; these
tests compare against the peers' own code instead:
- NeMo AutoModel's NemotronV3StateDictAdapter.from_hf runs live (pip install --no-deps nemo-automodel),
- MAX's convert_nemotron_h_state_dict output is recorded in tests/peers/max_golden.json
  (tests/peers/make_max_golden.py regenerates it where MAX is installed).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_all
from safetensors.torch import load_file

import nemoconv

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from cases import CASES, build_case, fingerprint  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "peers" / "max_golden.json").read_text())


def _same_tensor(source_name: str, output_name: str) -> bool:
    """Whether `output_name` may hold the data of `source_name`: the same last component and layer index (MAX
    names layers `blocks.N`)."""
    layer = re.search(r"\.(\d+)\.", source_name)
    return source_name.rsplit(".", 1)[-1] == output_name.rsplit(".", 1)[-1] and (
        layer is None or f".{layer.group(1)}." in output_name)


@pytest.mark.parametrize("case", list(CASES))
def test_max_output_equals_max_weight_adapter(case, tmp_path):
    src = build_case(case, tmp_path / "src")
    golden = GOLDEN[case]
    source = fingerprint(load_file(str(src / "model.safetensors")))
    # a stale golden file (the cases changed) must be regenerated, not silently weakened
    assert {k: v[:2] for k, v in source.items()} == {k: v[:2] for k, v in golden["source"].items()}, \
        "regenerate tests/peers/max_golden.json"
    nemoconv.convert(src, tmp_path / "max", to="max")
    ours = fingerprint(load_all(tmp_path / "max"))
    assert sorted(ours) == sorted(golden["max"]), sorted(set(ours) ^ set(golden["max"]))
    # Tensors drawn with other bits here (another torch, or this CPU's vector exp/log: dt_bias is made with
    # exp, log and expm1) are compared by layout; every other tensor bit for bit.
    redrawn = [k for k in source if source[k] != golden["source"][k]]
    if torch.__version__ != GOLDEN["torch_version"]:
        redrawn = list(source)
    for name, want in golden["max"].items():
        if any(_same_tensor(r, name) for r in redrawn):
            assert ours[name][:2] == want[:2], name
        else:
            assert ours[name] == want, name


def _nemo_adapter(src: Path, dtype: torch.dtype):
    adapter_mod = pytest.importorskip("nemo_automodel.components.models.nemotron_v3.state_dict_adapter")
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.moe.config import MoEConfig
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    # the MoE config NemotronV3Model builds from an HF config (nemotron_v3/model.py)
    moe = MoEConfig(
        n_routed_experts=config.n_routed_experts, n_shared_experts=1,
        n_activated_experts=config.num_experts_per_tok, n_expert_groups=config.n_group,
        n_limited_groups=config.topk_group, train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0,
        score_func="sigmoid", route_scale=config.routed_scaling_factor, dim=config.hidden_size,
        inter_dim=config.intermediate_size, moe_inter_dim=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob, router_bias=False, expert_bias=config.mlp_bias,
        expert_activation="relu2", dtype=dtype, shared_expert_gate=False,
        shared_expert_inter_dim=config.moe_shared_expert_intermediate_size, shared_expert_activation="relu2",
        force_e_score_correction_bias=True, moe_latent_size=getattr(config, "moe_latent_size", None),
    )
    return adapter_mod.NemotronV3StateDictAdapter(config=config, moe_config=moe, backend=BackendConfig(), dtype=dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_nemo_output_equals_nemo_automodel_from_hf(case, tmp_path):
    src = build_case(case, tmp_path / "src")
    dtype = CASES[case]["dtype"]
    adapter = _nemo_adapter(src, dtype)
    theirs = adapter.from_hf(load_file(str(src / "model.safetensors")))
    nemoconv.convert(src, tmp_path / "nemo", to="nemo")
    ours = load_all(tmp_path / "nemo")
    assert fingerprint(ours) == fingerprint(theirs)
    # and NeMo's own inverse takes our output back to the source
    back = adapter.to_hf(dict(ours))
    source = load_file(str(src / "model.safetensors"))
    assert sorted(back) == sorted(source)
    for k in source:
        assert torch.equal(back[k].to(source[k].dtype).float(), source[k].float()), k
