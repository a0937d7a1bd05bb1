"""The scale tensors quantized checkpoints carry beside their weights, by leaf name (one list for every layer).

Per FP8 linear, as ModelOpt writes them: `<module>.weight_scale` and `<module>.input_scale`; KV-cache scales
`<attn>.k_proj.k_scale` / `<attn>.v_proj.v_scale` (ModelOpt 0.47's export; some tools put them on the
attention module itself); `weight_scale_2` / `output_scale` appear in other ModelOpt formats (NVFP4) and are
recognised as scales so that they are never taken for weights.
"""

from __future__ import annotations

LINEAR_SCALES = ("weight_scale", "input_scale")
KV_SCALE_OF = {"k_proj": "k_scale", "v_proj": "v_scale"}  # the projection each KV-cache scale sits beside
KV_SCALES = tuple(KV_SCALE_OF.values())
SCALE_SUFFIXES = LINEAR_SCALES + KV_SCALES + ("weight_scale_2", "output_scale")


def is_scale(tensor_name: str) -> bool:
    return tensor_name.rpartition(".")[2] in SCALE_SUFFIXES
