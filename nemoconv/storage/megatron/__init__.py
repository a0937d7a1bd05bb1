"""Megatron-core torch_dist (DCP) checkpoints: restricted metadata unpickling, the tensor reader/writer and
the run config (`common.pt` / `run_config.yaml`)."""
