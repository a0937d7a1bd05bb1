"""What the benchmarks share: the Nemotron-H-8B layout (and a tiny stand-in for CPU smoke runs), and timing."""

PATTERN_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
SHAPE_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=21504, mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
                conv_kernel=4, chunk_size=128, vocab_size=131072)
SHAPE_SMALL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   intermediate_size=512, mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=16,
                   conv_kernel=4, chunk_size=16, vocab_size=4096)


def sync(device) -> None:
    """Wait for the device, so host clocks measure finished work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int):
    """Median wall seconds of `fn` over `repeat` runs (device-synchronized), and its last result."""
    import statistics
    import time

    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
