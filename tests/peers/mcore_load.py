"""Run by tests/test_megatron.py: megatron-core's own dist_checkpointing loads a checkpoint directory and prints
every tensor's key, dtype, shape and a hash of its bytes as JSON (one rank, gloo, CPU)."""

import hashlib
import json
import sys
import tempfile

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import load_plain_tensors, load_tensors_metadata

if __name__ == "__main__":
    directory = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        metadata = load_tensors_metadata(directory)
        tensors = load_plain_tensors(directory)
        dist.destroy_process_group()
    out = {}
    for key, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out[key] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                    "metadata_shape": list(metadata[key].global_shape), "sha256": hashlib.sha256(raw).hexdigest()}
    print(json.dumps(out))
