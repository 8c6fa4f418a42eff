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


class PeakKernels:
    """The two ceiling kernels per dtype, prepared once; ``measure()`` times each once more and keeps
    the best rate seen. ``run.py`` calls it in every timing round, so the ceilings are measured under
    the same machine load as the passes they are compared with."""

    def __init__(self, device: str | torch.device = "cpu", dtypes=(torch.float32, torch.bfloat16), n: int = 2048):
        self.device = torch.device(device)
        if self.device.type == "cuda" and n < 8192:
            n = 8192  # a 2048^3 product does not fill a large GPU
        self.n = n
        nb = 32 if self.device.type == "cuda" else 1  # enough work to fill a GPU
        self.flops = {"mm": 2 * n**3, "conv": 2 * 256 * 256 * 9 * 64 * 64 * nb}
        g = torch.Generator(device="cpu").manual_seed(0)
        self.kernels = {}
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            a = torch.randn(n, n, generator=g).to(self.device, dtype)
            b = torch.randn(n, n, generator=g).to(self.device, dtype)
            x = torch.randn(nb, 256, 64, 64, generator=g).to(self.device, dtype).contiguous(
                memory_format=torch.channels_last)
            w = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).to(self.device, dtype).contiguous(
                memory_format=torch.channels_last)
            self.kernels[name] = {"mm": (lambda a=a, b=b: a @ b), "conv": (lambda x=x, w=w: F.conv2d(x, w, padding=1))}
        self.times: dict[tuple[str, str], list[float]] = {(d, k): [] for d in self.kernels for k in ("mm", "conv")}

    def measure(self, reps: int = 1, warmup: int = 0) -> None:
        with torch.inference_mode():
            for (dtype, kind), ts in self.times.items():
                ts.extend(time_fn(self.kernels[dtype][kind], self.device, reps, warmup))

    def result(self) -> dict:
        out: dict = {"method": f"best of {len(next(iter(self.times.values())))} timed calls; mm: ({self.n}x{self.n}) "
                               f"@ ({self.n}x{self.n}); conv: 3x3, 256->256 channels, 64x64 (batch 32 on GPUs), "
                               "channels-last"}
        for dtype in self.kernels:
            entry = {}
            for kind in ("mm", "conv"):
                ts = self.times[(dtype, kind)]
                entry[f"{kind}_gflops"] = self.flops[kind] / min(ts) / 1e9
                entry[f"{kind}_gflops_median"] = self.flops[kind] / statistics.median(ts) / 1e9
            entry["peak_gflops"] = max(entry["mm_gflops"], entry["conv_gflops"])
            out[dtype] = entry
        return out


def measure_peaks(device: str | torch.device = "cpu", dtypes=(torch.float32, torch.bfloat16), n: int = 2048,
                  reps: int = 5) -> dict:
    kernels = PeakKernels(device, dtypes, n)
    kernels.measure(reps=reps, warmup=2)
    return kernels.result()


if __name__ == "__main__":
    from semdiff.api import cpu_has_bf16

    dts = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    print(json.dumps(measure_peaks("cpu", dts), indent=2))
