"""Run by tests/test_megatron.py: megatron-core's own dist_checkpointing.save writes a torch_dist checkpoint
(one rank, gloo, CPU) from the tensors of a nemoconv-written megatron checkpoint, the way Megatron-core's
modules shard them: routed experts as one ShardedTensor per expert with a prepended expert axis, and (to stand
for tensor parallelism) each attention output projection as two column shards.

    python mcore_save.py SRC_MEGATRON_DIR OUT_DIR

megatron-core needs, on CPU: psutil (else the save hangs), torch.cuda.synchronize / current_device stand-ins,
and this __main__ guard (it starts writer processes)."""

import sys
import tempfile

import torch
import torch.distributed as dist

if __name__ == "__main__":
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"  # used as a device for a small status tensor
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from nemoconv.checkpoint.local import open_checkpoint
    from nemoconv.stream.pipeline import iter_tensors

    src, out = sys.argv[1], sys.argv[2]
    tensors = dict(iter_tensors(open_checkpoint(src), to="megatron", prefetch=0))
    state = {}
    for key, t in tensors.items():
        if ".mlp.experts.linear_fc" in key:  # SequentialMLP / TEGroupedMLP: per expert, prepended axis
            for j in range(t.shape[0]):
                state[f"{key}.{j}"] = ShardedTensor.from_rank_offsets(key, t[j].clone(), (0, j, t.shape[0]),
                                                                      replica_id=0, prepend_axis_num=1)
        elif key.endswith("self_attention.linear_proj.weight"):  # a row-parallel linear at TP=2
            half = t.shape[1] // 2
            for r in range(2):
                state[f"{key}.{r}"] = ShardedTensor.from_rank_offsets(key, t[:, r * half:(r + 1) * half].clone(),
                                                                      (1, r, 2), replica_id=0)
        else:
            state[key] = ShardedTensor.from_rank_offsets(key, t.clone(), replica_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        dist_checkpointing.save(state, out)
        dist.barrier()
        dist.destroy_process_group()
    print("saved")
