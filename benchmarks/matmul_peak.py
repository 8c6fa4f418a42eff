"""Measure the machine's matrix-multiply ceilings, so per-pass figures can be read as a % of them.

Two kernels per dtype, both timed after warm-up, best of ``reps`` (the machine is shared, so the
fastest run is the best estimate of what the hardware does; the median is reported beside it):

- ``mm``: ``A @ B`` with A, B of shape (n, n), n = 2048 by default: 2 n^3 FLOP. On CPUs torch sends
  float32 to MKL's sgemm and bfloat16 to oneDNN.
- ``conv``: a 3x3 convolution, 256 -> 256 channels on a 64x64 map, channels-last (oneDNN's direct
  convolution, the kernel that runs the UNets): 2 * 256 * 256 * 9 * 64 * 64 FLOP.

``peak`` is the larger of the two: the stricter ceiling for the "% of peak" columns.

    python benchmarks/matmul_peak.py            # prints JSON
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, reps: int = 5, warmup: int = 2) -> list[float]:
    """Seconds per call for ``reps`` calls after ``warmup`` calls (synchronised on GPUs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure_peaks(device: str | torch.device = "cpu", dtypes=(torch.float32, torch.bfloat16), n: int = 2048,
                  reps: int = 5) -> dict:
    device = torch.device(device)
    if device.type == "cuda" and n < 8192:
        n = 8192  # a 2048^3 product does not fill a large GPU
    result: dict = {"method": "best of {} calls after 2 warm-up calls; mm: ({n}x{n}) @ ({n}x{n}); "
                              "conv: 3x3, 256->256 channels, 64x64 (batch 32 on GPUs), channels-last".format(reps, n=n)}
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            a = torch.randn(n, n, generator=g).to(device, dtype)
            b = torch.randn(n, n, generator=g).to(device, dtype)
            t_mm = time_fn(lambda: a @ b, device, reps)
            nb = 32 if device.type == "cuda" else 1  # enough work to fill a GPU
            x = torch.randn(nb, 256, 64, 64, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).to(device, dtype).contiguous(
                memory_format=torch.channels_last)
            t_conv = time_fn(lambda: F.conv2d(x, w, padding=1), device, reps)
            f_mm, f_conv = 2 * n**3, 2 * 256 * 256 * 9 * 64 * 64 * nb
            entry = {
                "mm_gflops": f_mm / min(t_mm) / 1e9,
                "mm_gflops_median": f_mm / statistics.median(t_mm) / 1e9,
                "conv_gflops": f_conv / min(t_conv) / 1e9,
                "conv_gflops_median": f_conv / statistics.median(t_conv) / 1e9,
            }
            entry["peak_gflops"] = max(entry["mm_gflops"], entry["conv_gflops"])
            result[name] = entry
    return result


if __name__ == "__main__":
    from semdiff.api import cpu_has_bf16

    dts = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    print(json.dumps(measure_peaks("cpu", dts), indent=2))
