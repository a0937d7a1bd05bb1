"""Regenerate tests/peers/max_golden.json by running MAX's own Nemotron-H weight adapter.

MAX cannot be installed in CI (its native engine and Mojo libraries are ~650 MB and `max.pipelines` does not
import on a CPU-only box), so its output on the deterministic cases of cases.py is recorded here, and
tests/test_peer_layouts.py compares nemoconv's `--to max` output with it.

Setup (CPU is enough):
    pip install --no-deps --target /tmp/maxsite max==26.7.0 max-core==26.7.0 mojo-compiler==1.2.0
    pip install --target /tmp/maxdeps psutil msgspec taskgroup exceptiongroup
    PYTHONPATH=/tmp/maxsite:/tmp/maxdeps:. python tests/peers/make_max_golden.py
`max.pipelines` is replaced by a stub module: the adapter file only uses `PipelineConfig` as a type hint.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, build_case, fingerprint, save_golden  # noqa: E402


def load_max_adapter():
    import max as max_pkg

    pipelines = types.ModuleType("max.pipelines")
    pipelines.__path__ = []
    lib = types.ModuleType("max.pipelines.lib")
    lib.PipelineConfig = type("PipelineConfig", (), {})
    sys.modules.setdefault("max.pipelines", pipelines)
    sys.modules.setdefault("max.pipelines.lib", lib)
    path = Path(list(max_pkg.__path__)[0]) / "pipelines" / "architectures" / "nemotron_h" / "weight_adapters.py"
    spec = importlib.util.spec_from_file_location("max_nemotron_h_weight_adapters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weight_to_torch(weight) -> torch.Tensor:
    from max.dtype import DType

    dtypes = {DType.bfloat16: torch.bfloat16, DType.float16: torch.float16, DType.float32: torch.float32,
              DType.float8_e4m3fn: torch.float8_e4m3fn, DType.uint8: torch.uint8, DType.int64: torch.int64}
    buf = weight.to_buffer()
    shape = tuple(int(d) for d in weight.shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * weight.dtype.size_in_bytes
    raw = np.from_dlpack(buf.view(DType.uint8, (nbytes,))).reshape(-1).copy()
    return torch.from_numpy(raw).view(dtypes[weight.dtype]).reshape(shape)


def main() -> None:
    from max.graph.weights import SafetensorWeights
    from safetensors.torch import load_file
    from transformers import AutoConfig

    adapter = load_max_adapter()
    golden = {}
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            src = build_case(name, Path(tmp) / "src")
            weights = SafetensorWeights([str(p) for p in sorted(src.glob("*.safetensors"))])
            result = adapter.convert_nemotron_h_state_dict(dict(weights.items()),
                                                           huggingface_config=AutoConfig.from_pretrained(src),
                                                           pipeline_config=None)
            golden[name] = {"source": fingerprint(load_file(str(src / "model.safetensors"))),
                            "max": fingerprint({k: weight_to_torch(v) for k, v in result.items()})}
            print(f"{name}: {len(golden[name]['max'])} tensors")
    golden["torch_version"] = torch.__version__  # random draws can differ across torch versions
    save_golden(Path(__file__).with_name("max_golden.json"), golden)


if __name__ == "__main__":
    main()
