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


def graph_time_us(fn, device, repeat: int, calls: int = 20) -> float:
    """Median µs per call of `fn` replayed from one CUDA graph of `calls` calls (eager on the CPU)."""
    import statistics

    import torch

    if device.type != "cuda":
        fn()
        return float("nan")
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def random_tensor(name: str, shape, g, device):
    """A stable random network, drawn on `device` in float32: Mamba decay in range (A_log in log[1, 16],
    dt in [1e-3, 1e-1]), D ~ 1, norms near 1, linear weights N(0, 1/fan_in), and a peaked lm_head like a
    trained model's."""
    import math

    import torch

    def uniform(lo, hi):
        return torch.empty(shape, device=device).uniform_(lo, hi, generator=g)

    if name.endswith("A_log"):
        return torch.log(uniform(1.0, 16.0))
    if name.endswith(".D"):
        return uniform(0.5, 1.5)
    if name.endswith("dt_bias"):
        dt = torch.exp(uniform(math.log(1e-3), math.log(1e-1)))
        return dt + torch.log(-torch.expm1(-dt))                       # softplus⁻¹(dt)
    noise = torch.randn(shape, generator=g, device=device)
    if "norm" in name:
        return 1.0 + 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if name.endswith("embeddings.weight"):
        return noise
    return noise / math.sqrt(shape[-1]) * (4.0 if name == "lm_head.weight" else 1.0)


class GpuMonitor:
    """The GPU's SM clock and board power, sampled by nvidia-smi every `period_ms` while a block runs: an H200
    at its power limit lowers its clock under long runs of large matrix products, so a rate read without them
    cannot tell a slower kernel from a hotter card. `summary` afterwards: {sm_mhz_mean, sm_mhz_min,
    power_w_mean, power_w_max, samples}, or None where there is no nvidia-smi or no sample."""

    def __init__(self, period_ms: int = 50):
        self.period_ms, self.proc, self.summary = period_ms, None, None

    def __enter__(self):
        import os
        import shutil
        import subprocess

        exe = shutil.which("nvidia-smi")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        if exe is not None and visible.isdigit():
            self.proc = subprocess.Popen([exe, "-i", visible, "--query-gpu=clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits", "-lms", str(self.period_ms)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate()
        rows = []
        for line in out.splitlines():
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:                 # "[N/A]" or a partial last line
                continue
            rows.append((mhz, watts))
        if rows:
            self.summary = {"sm_mhz_mean": round(sum(r[0] for r in rows) / len(rows)),
                            "sm_mhz_min": round(min(r[0] for r in rows)),
                            "power_w_mean": round(sum(r[1] for r in rows) / len(rows)),
                            "power_w_max": round(max(r[1] for r in rows)), "samples": len(rows)}
