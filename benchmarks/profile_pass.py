"""Where the time of one denoiser pass goes: torch.profiler by operator class, next to the FLOPs.

    python benchmarks/profile_pass.py --size ffhq128 --modes reference,bf16+cl [--batch 1] [--threads N]

For each mode it prints the share of the pass spent in convolutions, matrix products, attention,
GroupNorm, elementwise ops and dtype/layout copies, and the rate the convolutions themselves reach
(their FLOPs from ``FlopCounterMode`` over their self time): the evidence for what limits a pass.
Profiler overhead inflates the absolute times a little (the shares are what matter); the ceilings
are re-measured between the modes and the best is used. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import run  # noqa: E402

CLASSES = [
    ("convolution", ("convolution", "conv2d", "mkldnn_convolution", "conv1d")),
    ("matmul", ("addmm", "bmm", "mm", "matmul", "linear", "baddbmm", "einsum")),
    ("attention", ("scaled_dot_product", "softmax", "flash_attention")),
    ("groupnorm", ("group_norm",)),
    ("copies/casts", ("copy_", "_to_copy", "contiguous", "clone")),
    ("elementwise", ("silu", "add", "mul", "cat", "avg_pool", "upsample", "sub", "div", "exp", "cos", "sin",
                     "sigmoid", "fill_")),
]


def classify(name: str) -> str:
    short = name.split("::")[-1]
    for label, keys in CLASSES:
        if any(short == k or short.startswith(k) or short.startswith("native_" + k) or short.startswith("_" + k)
               for k in keys):
            return label
    return "other"


def profile_mode(variants, mode, batch: int, reps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    device = variants.device
    _, unet = variants.nets(mode)
    _, xt, t, z = run.pass_inputs(variants.base, batch, device, mode)
    with run.mode_context(mode, device):
        for _ in range(2):
            unet(xt, t, z)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            unet(xt, t, z)
            times.append(time.perf_counter() - t0)
        counter = FlopCounterMode(display=False)
        with counter:
            unet(xt, t, z)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            unet(xt, t, z)
    flops = defaultdict(float)
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        flops["convolution" if "convolution" in str(op) else "matmul/attention"] += n
    by_class = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("aten::"):
            by_class[classify(evt.key)] += evt.self_cpu_time_total / 1e6
    total = sum(by_class.values())
    conv_s = by_class.get("convolution", 0.0)
    return {
        "mode": mode.name, "batch": batch, "seconds_best": min(times), "gflop": sum(flops.values()) / 1e9,
        "profiled_self_seconds": total,
        "share": {k: v / total for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "conv_gflop": flops["convolution"] / 1e9,
        "conv_gflops": flops["convolution"] / conv_s / 1e9 if conv_s else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="ffhq128")
    p.add_argument("--modes", default="reference,bf16,bf16+cl")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--experimental", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from semdiff.api import cpu_has_bf16

    device = torch.device("cpu")
    all_modes = {m.name: m for m in run.cpu_modes(cpu_has_bf16(), False, args.experimental)}
    family, label = run.build_family(args.size)
    variants = run.Variants(family, device)
    kernels = run.PeakKernels(device, [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else []))
    kernels.measure(reps=3, warmup=2)
    rows = []
    for name in args.modes.split(","):
        r = profile_mode(variants, all_modes[name], args.batch)
        kernels.measure()  # the ceilings between the modes, under the same load
        rows.append(r)
    peaks = kernels.result()
    for r in rows:
        name = r["mode"]
        peak = peaks[all_modes[name].dtype]
        r["conv_pct_of_conv_peak"] = 100 * r["conv_gflops"] / peak["conv_gflops"] if r["conv_gflops"] else None
        r["pass_pct_of_conv_peak"] = 100 * r["gflop"] / r["seconds_best"] / peak["conv_gflops"]
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["share"].items())
        print(f"{label} batch {args.batch} {name:<20} pass {r['seconds_best']:.3f}s "
              f"({r['gflop'] / r['seconds_best']:.0f} GFLOP/s = {r['pass_pct_of_conv_peak']:.0f}% of the conv peak); "
              f"convolutions alone {r['conv_gflops']:.0f} GFLOP/s = {r['conv_pct_of_conv_peak']:.0f}% of the conv "
              f"peak; time: {shares}")
    print("peaks: " + "; ".join(f"{k}: mm {v['mm_gflops']:.0f}, conv {v['conv_gflops']:.0f}" for k, v in peaks.items()
                                 if isinstance(v, dict)))
    if args.out:
        Path(args.out).write_text(json.dumps({"size": args.size, "threads": torch.get_num_threads(), "peaks": peaks,
                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
