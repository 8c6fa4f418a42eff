"""semdiff speed benchmark: every fast mode next to the official arithmetic, in one run.

    python benchmarks/run.py                       # tiny, ffhq128, ffhq256 on this machine
    python benchmarks/run.py --quick --sizes tiny  # seconds; what the smoke test runs
    python benchmarks/run.py --sizes ffhq128 --batch 1,8 --out benchmarks/results/cpu-ffhq128.json
    python benchmarks/run.py --merge a.json b.json --out benchmarks/results/cpu.json   # one table from runs

For each size (random weights; the released architectures) and batch it times the encoder pass and
the denoiser pass in every mode, then ``encode_stochastic`` and ``decode`` at the default step
counts through the public API. The *reference* mode does exactly the official arithmetic (legacy
attention, float32, contiguous NCHW, no compile); every other row carries its speed-up over it.

Method (see benchmarks/README.md):

- Time: modes are interleaved round by round (the order rotates) after two warm-up calls each (the
  first call of a shape creates oneDNN primitives); ``seconds`` is the best of the rounds, ``median``
  beside it. The machine is shared, so the best round is the estimate of what the hardware does,
  and ``x ref`` is the ratio of best times measured in the same rounds.
- GFLOP: ``torch.utils.flop_counter.FlopCounterMode`` over one pass (convolutions and matrix
  products; elementwise work is not counted). ``% peak``: GFLOP/s over the machine's best measured
  matmul rate for the mode's dtype (benchmarks/matmul_peak.py), measured in the same run.
- Peak memory (CPU): resident set size sampled every 0.5 ms by a thread during one call, minus the
  RSS before it (after ``malloc_trim``), i.e. the extra memory the call needs beyond weights and
  inputs. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
- End to end: ``encode_stochastic`` (default 250 steps) and ``decode`` (20) through
  ``SemanticAutoencoder``; for sizes beyond ``--e2e-full-max`` pixels they run a few steps and are
  projected linearly to the default step count (the JSON says ``projected``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from matmul_peak import PeakKernels  # noqa: E402

CL = torch.channels_last

# ---------------------------------------------------------------------------------------------
# Sizes


def _diffae_sizes() -> dict[str, dict[str, Any]]:
    from semdiff.families.diffae.convert import RELEASED_NETWORKS

    released = {k.split(" ")[0]: v for k, v in RELEASED_NETWORKS.items()}
    return {
        # the parity-fixture architecture (tests/fixtures/diffae/parity_tiny.json)
        "tiny": dict(image_size=32, model_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1,
                     attention_resolutions=[16], embed_channels=64, z_dim=64, enc_channel_mult=[1, 1, 2, 2],
                     enc_num_res_blocks=1),
        "celeba64": released["celeba64d2c_autoenc"],
        "ffhq128": released["ffhq128_autoenc"],
        "ffhq256": released["ffhq256_autoenc"],
    }


SHIPPED_OVERRIDE: list[str] = []


def shipped_model_dir() -> Path | None:
    import semdiff

    folder = Path(SHIPPED_OVERRIDE[0]) if SHIPPED_OVERRIDE else \
        Path(semdiff.__file__).parent / "pretrained" / "semdiff-emoji32-diffae"
    return folder if (folder / "config.json").exists() else None


DIFFUSEVAE_SIZES = {"dvae-ffhq128": ("ffhq", 8), "dvae-celebahq256": ("celebahq", 8)}


def _diffusevae_family(size: str):
    """A released DiffuseVAE architecture, read from the official key/shape fixture of the tests."""
    from semdiff.families.diffusevae import DiffuseVAE
    from semdiff.families.diffusevae.convert import infer_unet_config

    name, heads = DIFFUSEVAE_SIZES[size]
    keys = json.loads((ROOT.parent / "tests" / "fixtures" / "official-keys" / "diffusevae" / f"keys_{name}.json")
                      .read_text())
    v = keys["vae"]
    vae = dict(input_res=v["input_res"], enc_block_str=v["enc_block_config"], enc_channel_str=v["enc_channel_config"],
               dec_block_str=v["dec_block_config"], dec_channel_str=v["dec_channel_config"])
    unet = infer_unet_config({k: tuple(s) for k, s in keys["ddpm_checkpoint_state_dict_unet_part"].items()})
    return DiffuseVAE(DiffuseVAE.default_config(vae=vae, unet={**unet, "num_heads": heads}))


LRDM_SIZES = {"lrdm-r64x8x8": "LRDM r64x8x8", "tlrdm-r16x16x16": "t-LRDM r16x16x16"}


def _lrdm_family(size: str):
    """A released LRDM architecture (LSUN Churches) without its first stage: the UNet and the
    representation autoencoder work on the 64x64x3 first-stage latent of a 256px image."""
    from semdiff.families.lrdm import LRDM
    from semdiff.families.lrdm.convert import _RELEASED_DECODER, _RELEASED_ENCODER, _RELEASED_UNET, RELEASED_CONFIGS

    c = RELEASED_CONFIGS[next(k for k in RELEASED_CONFIGS if k.startswith(LRDM_SIZES[size] + " "))]
    tc = c["time_conditional"]
    return LRDM({"unet": {**_RELEASED_UNET, **c["unet"]},
                 "representation": {"embed_dim": c["embed_dim"],
                                    "encoder": {**_RELEASED_ENCODER, **c["encoder"], "time_conditional": tc},
                                    "decoder": {**_RELEASED_DECODER, **c["decoder"], "time_conditional": tc}}})


def family_kind(family) -> str:
    return family.family_name


def build_family(size: str):
    """(family, label) with random weights of the named architecture, in eval mode."""
    from semdiff.families.diffae import DiffAE

    sizes = _diffae_sizes()
    if size in DIFFUSEVAE_SIZES:
        try:
            family = _diffusevae_family(size)
        except (ImportError, FileNotFoundError, KeyError) as e:
            raise SystemExit(f"{size}: DiffuseVAE networks are not available here ({e})")
        label = f"diffusevae-{size[5:]}"
    elif size in LRDM_SIZES:
        try:
            family = _lrdm_family(size)
        except (ImportError, KeyError, StopIteration) as e:
            raise SystemExit(f"{size}: LRDM networks are not available here ({e})")
        label = f"{size} (no first stage: 64x64x3 latent)"
    elif size in sizes:
        family = DiffAE(DiffAE.default_config(**sizes[size]))
        label = f"diffae-{size}"
    elif size == "emoji32":
        folder = shipped_model_dir()
        if folder is None:
            raise SystemExit("emoji32: semdiff/pretrained/semdiff-emoji32-diffae is not there yet")
        from semdiff.io import load_model_folder

        family = load_model_folder(folder)
        label = "diffae-emoji32 (shipped weights)"
    else:
        raise SystemExit(f"unknown size {size!r}; known: "
                         f"{', '.join(list(sizes) + ['emoji32'] + list(DIFFUSEVAE_SIZES) + list(LRDM_SIZES))}")
    if size != "emoji32":
        _randomise(family)
    return family.eval(), label


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with unit-scale activations (no zero layers: zeros can time faster)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# Modes


@dataclass(frozen=True)
class Mode:
    name: str
    attention: str = "sdpa"
    dtype: str = "float32"
    channels_last: bool = False
    compile: str | None = None  # torch.compile mode, e.g. "default" or "reduce-overhead" (CUDA graphs)
    weights: str = "float32"  # "bfloat16": experimental bf16 copy of the weights, no autocast (see below)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


REFERENCE = Mode("reference", attention="reference")


def cpu_modes(bf16: bool, compile_: bool, experimental: bool = False) -> list[Mode]:
    modes = [REFERENCE, Mode("sdpa"), Mode("sdpa+cl", channels_last=True)]
    if bf16:
        modes += [Mode("bf16", dtype="bfloat16"), Mode("bf16+cl", dtype="bfloat16", channels_last=True),
                  # the einsum ("reference") attention under bf16: on CPUs it beats SDPA (see README)
                  Mode("bf16+cl+einsum", attention="reference", dtype="bfloat16", channels_last=True)]
    if bf16 and experimental:
        modes.append(Mode("bf16w+cl (proposal)", dtype="bfloat16", channels_last=True, weights="bfloat16"))
    if compile_:
        modes.append(Mode("sdpa+cl+compile", channels_last=True, compile="default"))
        if bf16:
            modes.append(Mode("bf16+cl+compile", dtype="bfloat16", channels_last=True, compile="default"))
    return modes


def gpu_modes(compile_: bool) -> list[Mode]:
    modes = [REFERENCE, Mode("sdpa"), Mode("bf16", dtype="bfloat16"), Mode("fp16", dtype="float16"),
             Mode("bf16+cl", dtype="bfloat16", channels_last=True)]
    if compile_:
        modes += [Mode("bf16+cl+compile", dtype="bfloat16", channels_last=True, compile="max-autotune-no-cudagraphs"),
                  Mode("bf16+cl+compile+graphs", dtype="bfloat16", channels_last=True, compile="reduce-overhead")]
    return modes


@contextlib.contextmanager
def mode_context(mode: Mode, device: torch.device):
    """Attention backend + the API's compute context (inference mode, autocast for bf16/fp16)."""
    from semdiff.nn.attention import get_attention_backend, set_attention_backend

    previous = get_attention_backend()
    set_attention_backend(mode.attention)
    try:
        with torch.inference_mode():
            if mode.dtype != "float32" and mode.weights == "float32":
                with torch.autocast(device.type, dtype=mode.torch_dtype):
                    yield
            else:
                yield
    finally:
        set_attention_backend(previous)


# ---------------------------------------------------------------------------------------------
# Measurement helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """Extra memory (MB) one call needs: see the module docstring."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    _trim()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return (peak[0] - before) / 2**20


def count_gflop(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu_model"] = names[0] if names else platform.processor()
        info["cpu_flags"] = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                                             "avx512_vnni", "avx512_fp16"))
        mem = {line.split(":")[0]: line.split(":")[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()}
        info["memory_total_gb"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
    except OSError:  # pragma: no cover - not Linux
        info["cpu_model"] = platform.processor()
    from semdiff.api import cpu_has_bf16

    info["cpu_bf16"] = cpu_has_bf16()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    info["load_average_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def mem_available_mb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover
        pass
    return float("nan")


# ---------------------------------------------------------------------------------------------
# The benchmark of one size


class Variants:
    """One copy of the family per memory format, and compiled networks per mode (built lazily)."""

    def __init__(self, family, device: torch.device):
        self.device = device
        self.base = family.to(device)
        self._cl = None
        self._low = None
        self._compiled: dict[str, Any] = {}

    def family(self, mode: Mode):
        if mode.weights != "float32":
            if self._low is None:
                self._low = bf16_weight_copy(self.base)
                if mode.channels_last:
                    self._low.to(memory_format=CL)
            return self._low
        if not mode.channels_last:
            return self.base
        if self._cl is None:
            self._cl = copy.deepcopy(self.base).to(memory_format=CL)
        return self._cl

    def nets(self, mode: Mode):
        """(encoder, denoiser) callables: ``encoder(x)`` and ``denoiser(x_t, t, z)``."""
        fam = self.family(mode)
        if family_kind(fam) == "lrdm":
            # the representation encoder; the UNet with the code's features (computed once per call by
            # the family, so not part of a pass here)
            unet = fam.unet
            if mode.compile is not None:
                unet = self._compiled.setdefault(mode.name, torch.compile(fam.unet, mode=mode.compile))
            feats: dict[int, Any] = {}

            def denoiser(x, t, z, u=unet, fam=fam):
                if x.shape[0] not in feats:
                    g = torch.Generator().manual_seed(0)
                    codes = torch.randn(x.shape[0], *fam.code_shape, generator=g).to(x.device)
                    if fam.time_conditional:
                        feats[x.shape[0]] = None
                    else:
                        feats[x.shape[0]] = fam.features(codes)
                f = feats[x.shape[0]]
                if f is None:  # t-LRDM: features depend on t
                    g = torch.Generator().manual_seed(0)
                    f = fam.features(torch.randn(x.shape[0], *fam.code_shape, generator=g).to(x.device), t)
                return u(x, t, f)

            return fam.encode, denoiser
        if family_kind(fam) == "diffusevae":
            # the VAE encoder; the UNet takes x_t and the VAE reconstruction x̂ (here a fixed image)
            encoder, unet = fam.encode, fam.unet
            if mode.compile is not None:
                unet = self._compiled.setdefault(mode.name, torch.compile(fam.unet, mode=mode.compile))
            return encoder, (lambda x, t, z, u=unet: u(x, t, x.flip(-1).clamp(-1, 1)))
        if mode.compile is None:
            return fam.encoder, fam.unet
        if mode.name not in self._compiled:
            self._compiled[mode.name] = (torch.compile(fam.encoder, mode=mode.compile),
                                         torch.compile(fam.unet, mode=mode.compile))
        return self._compiled[mode.name]


def bf16_weight_copy(family):
    """EXPERIMENTAL (not in the library): a bf16 copy of the weights, run without autocast.

    Autocast casts every weight to bf16 on every pass, and GroupNorm32 casts activations to fp32
    and back; here the convolution/linear weights are bf16 once, GroupNorm keeps fp32 affine
    parameters and normalises the bf16 input directly (PyTorch's CPU kernel accumulates in fp32 for
    bf16 input with fp32 parameters), and the sinusoidal time embedding is cast to bf16.
    """
    import torch.nn.functional as F

    from semdiff.nn.layers import GroupNorm32

    low = copy.deepcopy(family).to(torch.bfloat16)
    for m in low.modules():
        if isinstance(m, GroupNorm32):
            m.float()
            m.forward = (lambda self: (lambda x: F.group_norm(x, self.num_groups, self.weight, self.bias,
                                                                self.eps)))(m)
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    first = low.unet.time_embed.time_embed[0]
    first.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16),))
    return low


def pass_inputs(family, batch: int, device: torch.device, mode: Mode):
    g = torch.Generator().manual_seed(batch)
    size = family.image_size
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    xt = torch.randn(batch, 3, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    z = torch.randn(batch, family.code_dim, generator=g).to(device)
    if mode.weights != "float32":
        x, xt, z = x.to(mode.torch_dtype), xt.to(mode.torch_dtype), z.to(mode.torch_dtype)
    if mode.channels_last:
        x, xt = x.contiguous(memory_format=CL), xt.contiguous(memory_format=CL)
    return x, xt, t, z


def bench_passes(variants: Variants, modes: list[Mode], batch: int, rounds: int, peaks: dict,
                 log: Callable[[str], None], kernels: PeakKernels | None = None) -> list[dict]:
    device = variants.device
    fam = variants.base
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for mode in modes:
        encoder, unet = variants.nets(mode)
        x, xt, t, z = pass_inputs(fam, batch, device, mode)
        calls[(mode.name, "encoder pass")] = (lambda e=encoder, x=x: e(x))
        calls[(mode.name, "denoiser pass")] = (lambda u=unet, xt=xt, t=t, z=z: u(xt, t, z))
    # GFLOP per pass: counted once in the reference mode (the same arithmetic in every mode).
    gflop = {}
    for comp in ("encoder pass", "denoiser pass"):
        with mode_context(REFERENCE, device):
            gflop[comp] = count_gflop(calls[("reference", comp)])
    # Warm-up: two calls per mode (oneDNN primitive creation, compilation).
    compile_s = {}
    for mode in modes:
        t0 = time.perf_counter()
        with mode_context(mode, device):
            for comp in ("encoder pass", "denoiser pass"):
                for _ in range(2):
                    calls[(mode.name, comp)]()
        _sync(device)
        compile_s[mode.name] = time.perf_counter() - t0
    times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        if kernels is not None:  # the ceilings, under this round's load
            kernels.measure()
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            with mode_context(mode, device):
                for comp in ("encoder pass", "denoiser pass"):
                    _sync(device)
                    t0 = time.perf_counter()
                    calls[(mode.name, comp)]()
                    _sync(device)
                    times[(mode.name, comp)].append(time.perf_counter() - t0)
        log(f"    round {r + 1}/{rounds}: " + ", ".join(
            f"{m.name} {times[(m.name, 'denoiser pass')][-1]:.3f}s" for m in modes))
    rows = []
    for comp in ("encoder pass", "denoiser pass"):
        ref = times[("reference", comp)]
        for mode in modes:
            ts = times[(mode.name, comp)]
            with mode_context(mode, device):
                mem = peak_memory(calls[(mode.name, comp)], device)
            best = min(ts)
            peak = peaks.get(mode.dtype, {}).get("peak_gflops")
            rows.append({
                "component": comp, "mode": asdict(mode), "mode_name": mode.name, "batch": batch,
                "seconds": best, "seconds_median": statistics.median(ts), "rounds": len(ts),
                "images_per_s": batch / best,
                "gflop": gflop[comp], "gflops": gflop[comp] / best,
                "pct_of_peak": 100 * gflop[comp] / best / peak if peak else None,
                "pct_of_mm_peak": None,
                "speedup_vs_reference": min(ref) / best,
                # per-round ratios (same round, so the same machine load) and their median
                "speedup_vs_reference_median": statistics.median(a / b for a, b in zip(ref, ts)),
                "peak_memory_mb": mem,
                "warmup_seconds": compile_s[mode.name] if comp == "encoder pass" else None,
            })
    return rows


def parse_recipe(text: str) -> dict[str, Any]:
    """``inverter:steps[:iterations]:sampler:steps``, e.g. ``fixed-point:10:2:ddim:10``."""
    parts = text.split(":")
    if len(parts) == 4:
        parts.insert(2, "1")
    if len(parts) != 5:
        raise SystemExit(f"--fast-recipe must be inverter:steps[:iterations]:sampler:steps, got {text!r}")
    return {"inverter": parts[0], "inv_steps": int(parts[1]), "iterations": int(parts[2]), "sampler": parts[3],
            "dec_steps": int(parts[4])}


def recipe_label(r: dict[str, Any]) -> str:
    it = f"x{r['iterations']} " if r["inverter"] == "fixed-point" else ""
    return f"{r['inverter']} {it}{r['inv_steps']} + {r['sampler']} {r['dec_steps']}"


def bench_end_to_end(variants: Variants, modes: list[Mode], steps: dict[str, int], run_steps: dict[str, int],
                     log: Callable[[str], None], recipe: dict[str, Any] | None = None,
                     rounds: int = 2) -> list[dict]:
    """encode_stochastic and decode through the public API, batch 1; then whole reconstructions
    (encoder + inversion + decode): the official recipe and ``recipe``, measured when the run uses
    the full step counts, otherwise projected from the measured seconds per step. The modes are
    interleaved over ``rounds`` rounds and the best round is kept (the machine is shared)."""
    from semdiff import SemanticAutoencoder
    from semdiff.nn.attention import get_attention_backend, set_attention_backend
    from semdiff.sampling.solvers import passes as count_passes

    device = variants.device
    fam = variants.base
    g = torch.Generator().manual_seed(1)
    x01 = torch.rand(1, 3, fam.image_size, fam.image_size, generator=g)
    full = run_steps == steps
    modes = [m for m in modes if m.compile is None and m.weights == "float32"]  # what the API can run
    models = {m.name: SemanticAutoencoder(variants.family(m), device=device, progress=False,
                                          dtype=None if m.dtype == "float32" else m.torch_dtype) for m in modes}
    for m in modes:  # the API makes bf16 channels-last on CPUs; the mode decides here
        models[m.name].family.to(memory_format=CL if m.channels_last else torch.contiguous_format)
    opts = {}
    if recipe is not None:
        opts = {"inverter": recipe["inverter"]}
        if recipe["inverter"] == "fixed-point":
            opts["iterations"] = recipe["iterations"]
    best: dict[str, dict[str, float]] = {m.name: {} for m in modes}

    def keep(name, key, value):
        best[name][key] = min(best[name].get(key, float("inf")), value)

    previous = get_attention_backend()
    try:
        for r in range(rounds + 1):  # round 0 warms up (oneDNN primitives of every shape)
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                model = models[mode.name]
                set_attention_backend(mode.attention)
                if r == 0:
                    z = model.encode(x01)
                    model.decode(z, model.encode_stochastic(x01, z, steps=2), steps=2)
                    continue
                for _ in range(2):
                    t0 = time.perf_counter()
                    z = model.encode(x01)
                    _sync(device)
                    keep(mode.name, "enc", time.perf_counter() - t0)
                t0 = time.perf_counter()
                x_T = model.encode_stochastic(x01, z, steps=run_steps["encode_stochastic"])
                _sync(device)
                keep(mode.name, "inv", time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.decode(z, x_T, steps=run_steps["decode"])
                _sync(device)
                keep(mode.name, "dec", time.perf_counter() - t0)
                if recipe is not None and full:
                    t0 = time.perf_counter()
                    z = model.encode(x01)
                    x_T = model.encode_stochastic(x01, z, steps=recipe["inv_steps"], **opts)
                    model.decode(z, x_T, steps=recipe["dec_steps"], sampler=recipe["sampler"])
                    _sync(device)
                    keep(mode.name, "fast", time.perf_counter() - t0)
                b = best[mode.name]
                log(f"    e2e round {r}/{rounds} {mode.name}: encode {b['enc']:.3f}s, inversion "
                    f"{run_steps['encode_stochastic']} steps {b['inv']:.2f}s, decode {run_steps['decode']} steps "
                    f"{b['dec']:.2f}s (best so far)")
    finally:
        set_attention_backend(previous)

    rows = []
    for mode in modes:
        b = best[mode.name]
        for what, n in (("encode_stochastic", "encode_stochastic"), ("decode", "decode")):
            t = b["inv" if what == "encode_stochastic" else "dec"] * steps[n] / run_steps[n]
            rows.append({"component": f"{what} ({steps[n]} steps)", "mode_name": mode.name, "batch": 1,
                         "seconds": t, "measured_steps": run_steps[n], "default_steps": steps[n],
                         "projected": run_steps[n] != steps[n], "passes": steps[n], "images_per_s": 1 / t})
        rows.append({"component": "encode (semantic)", "mode_name": mode.name, "batch": 1, "seconds": b["enc"],
                     "passes": 1, "projected": False, "images_per_s": 1 / b["enc"]})
        inv_step = b["inv"] / run_steps["encode_stochastic"]
        dec_step = b["dec"] / run_steps["decode"]
        official = b["enc"] + inv_step * steps["encode_stochastic"] + dec_step * steps["decode"]
        rows.append({"component": f"reconstruct: official (inv {steps['encode_stochastic']} + dec {steps['decode']})",
                     "mode_name": mode.name, "batch": 1, "seconds": official, "projected": not full,
                     "passes": 1 + steps["encode_stochastic"] + steps["decode"], "images_per_s": 1 / official})
        if recipe is not None:
            n_inv = count_passes("invert", recipe["inverter"], recipe["inv_steps"], iterations=recipe["iterations"])
            fast = b["fast"] if full else b["enc"] + inv_step * n_inv + dec_step * recipe["dec_steps"]
            rows.append({"component": f"reconstruct: {recipe_label(recipe)}", "mode_name": mode.name, "batch": 1,
                         "seconds": fast, "projected": not full, "passes": 1 + n_inv + recipe["dec_steps"],
                         "images_per_s": 1 / fast})
    ref = {r["component"]: r["seconds"] for r in rows if r["mode_name"] == "reference"}
    official_ref = next((r["seconds"] for r in rows if r["mode_name"] == "reference"
                         and r["component"].startswith("reconstruct: official")), None)
    for r in rows:
        r["speedup_vs_reference"] = ref[r["component"]] / r["seconds"] if r["component"] in ref else None
        if r["component"].startswith("reconstruct") and official_ref:
            r["speedup_vs_official_reference"] = official_ref / r["seconds"]
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def format_table(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"Machine: {m.get('cpu_model')} | {m.get('cpu_count')} cores ({m.get('torch_threads')} torch threads)"
                 f" | {m.get('memory_total_gb')} GB | torch {m.get('torch')} | bf16 native: {m.get('cpu_bf16')}"
                 + (f" | GPU {m['gpu']}" if m.get("gpu") else ""))
    peaks = result["peaks"]
    lines.append("Matmul peak (best of runs): " + "; ".join(
        f"{k}: mm {v['mm_gflops']:.0f}, conv {v['conv_gflops']:.0f} GFLOP/s" for k, v in peaks.items()
        if isinstance(v, dict)))
    header = f"| {'size':<9} | {'batch':>5} | {'component':<14} | {'mode':<16} | {'s':>8} | {'img/s':>8} | " \
             f"{'GFLOP':>7} | {'GFLOP/s':>7} | {'% peak':>6} | {'% mm':>5} | {'x ref':>6} | {'mem MB':>7} |"
    lines += ["", header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for row in result["passes"]:
        pct = f"{row['pct_of_peak']:.0f}" if row.get("pct_of_peak") else "-"
        pmm = f"{row['pct_of_mm_peak']:.0f}" if row.get("pct_of_mm_peak") else "-"
        lines.append(f"| {row['size']:<9} | {row['batch']:>5} | {row['component']:<14} | {row['mode_name']:<16} | "
                     f"{row['seconds']:>8.4f} | {row['images_per_s']:>8.2f} | {row['gflop']:>7.3g} | "
                     f"{row['gflops']:>7.0f} | {pct:>6} | {pmm:>5} | {row['speedup_vs_reference']:>6.2f} | "
                     f"{row['peak_memory_mb']:>7.0f} |")
    if result.get("end_to_end"):
        header = (f"| {'size':<9} | {'component':<42} | {'mode':<9} | {'passes':>6} | {'s':>9} | {'x ref':>6} | "
                  f"{'x official':>10} | {'note':<12} |")
        lines += ["", header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
        for row in result["end_to_end"]:
            note = "projected" if row.get("projected") else "measured"
            sp = f"{row['speedup_vs_reference']:.2f}" if row.get("speedup_vs_reference") else "-"
            so = f"{row['speedup_vs_official_reference']:.2f}" if row.get("speedup_vs_official_reference") else ""
            lines.append(f"| {row['size']:<9} | {row['component']:<42} | {row['mode_name']:<9} | "
                         f"{row.get('passes', ''):>6} | {row['seconds']:>9.3f} | {sp:>6} | {so:>10} | {note:<12} |")
    if result.get("max_batch"):
        lines.append("")
        for size, info in result["max_batch"].items():
            lines.append(f"{size}: denoiser-pass memory {info['mb_per_image']:.0f} MB/image -> largest batch that fits "
                         f"in {info['available_mb'] / 1024:.1f} GB available: ~{info['estimate']}")
    if result.get("throughput"):
        lines.append("")
        for row in result["throughput"]:
            lines.append(f"folder throughput ({row['what']}, {row['mode_name']}, {row['images']} images): "
                         f"{row['images_per_s']:.1f} images/s")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """The README table: one row per size, batch and mode (denoiser and encoder pass side by side)."""
    rows = {}
    for r in result["passes"]:
        key = (r["size"], r["batch"], r["mode_name"])
        rows.setdefault(key, {})[r["component"]] = r
    lines = ["| size | batch | mode | denoiser s | img/s | GFLOP | GFLOP/s | % peak | % mm | x ref | encoder s | "
             "x ref | extra MB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (size, batch, mode), comps in rows.items():
        d, e = comps.get("denoiser pass"), comps.get("encoder pass")
        if d is None:
            continue
        lines.append(
            f"| {size} | {batch} | {mode} | {d['seconds']:.3f} | {d['images_per_s']:.2f} | {d['gflop']:.3g} | "
            f"{d['gflops']:.0f} | {d['pct_of_peak']:.0f} | {d['pct_of_mm_peak']:.0f} | "
            f"**{d['speedup_vs_reference']:.2f}** | {e['seconds']:.3f} | {e['speedup_vs_reference']:.2f} | "
            f"{d['peak_memory_mb']:.0f} |")
    e2e = [r for r in result.get("end_to_end", []) if r["component"].startswith("reconstruct")]
    if e2e:
        lines += ["", "| size | end to end (batch 1) | mode | passes | s | x reference mode | x official recipe "
                  "in reference mode | |", "|---|---|---|---:|---:|---:|---:|---|"]
        for r in e2e:
            so = r.get("speedup_vs_official_reference")
            lines.append(f"| {r['size']} | {r['component']} | {r['mode_name']} | {r.get('passes', '')} | "
                         f"{r['seconds']:.2f} | {r['speedup_vs_reference']:.2f} | "
                         f"{f'**{so:.1f}**' if so else ''} | {'projected' if r.get('projected') else 'measured'} |")
    return "\n".join(lines)


def merge(files: list[str]) -> dict:
    parts = [json.loads(Path(f).read_text()) for f in files]
    for part in parts:  # every row keeps the % of the peaks measured in its own run
        for row in part.get("passes", []):
            entry = part["peaks"].get(row["mode"]["dtype"], {})
            if entry and row.get("pct_of_mm_peak") is None:
                row["pct_of_mm_peak"] = 100 * row["gflops"] / entry["mm_gflops"]
            row.setdefault("threads", part["machine"].get("torch_threads"))
    out = parts[0]
    for p in parts[1:]:
        for key in ("passes", "end_to_end", "throughput", "notes"):
            out.setdefault(key, []).extend(p.get(key, []))
        out.setdefault("max_batch", {}).update(p.get("max_batch", {}))
        for k, v in p.get("peaks", {}).items():  # keep the best measured ceiling
            if isinstance(v, dict) and isinstance(out["peaks"].get(k), dict):
                for kk in v:
                    out["peaks"][k][kk] = max(out["peaks"][k][kk], v[kk])
        out.setdefault("runs", []).append(p.get("machine", {}))
    out["notes"] = list(dict.fromkeys(out.get("notes", [])))
    return out


# ---------------------------------------------------------------------------------------------


def _emoji_folder(n: int, size: int) -> Path:
    """Write ``n`` emoji images (cycled if the set is smaller) as PNG files into a temporary folder."""
    import tempfile

    from PIL import Image

    from semdiff.data import load_emoji

    images = load_emoji(size).images
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    folder = Path(tempfile.mkdtemp(prefix="semdiff-bench-folder-"))
    for i in range(n):
        Image.fromarray(images[i % len(images)].permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    return folder


def bench_folder_throughput(spec: str, device: torch.device, modes: list[Mode], log) -> list[dict]:
    """Images/s of ``semdiff.features.extract_features`` (DataLoader streaming, automatic batch size)
    over a folder, with the shipped model. ``spec``: a folder, or ``emoji:N`` for N rendered emoji."""
    try:
        from semdiff.features import extract_features
    except ImportError:
        log("  semdiff.features is not there: folder throughput skipped")
        return []
    model_dir = shipped_model_dir()
    if model_dir is None:
        log("  no shipped model: folder throughput skipped")
        return []
    import shutil
    import tempfile

    from semdiff import SemanticAutoencoder

    rows = []
    made = None
    if spec.startswith("emoji:"):
        made = folder = _emoji_folder(int(spec.split(":")[1]), 32)
    else:
        folder = Path(spec)
    n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    try:
        for mode in [m for m in modes if m.name in ("reference", "sdpa", "bf16", "bf16+cl") and m.compile is None]:
            model = SemanticAutoencoder.from_pretrained(model_dir, device=device, progress=False,
                                                        dtype=None if mode.dtype == "float32" else mode.torch_dtype)
            model.family.to(memory_format=CL if mode.channels_last else torch.contiguous_format)
            from semdiff.nn.attention import set_attention_backend

            set_attention_backend(mode.attention)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = extract_features(model, str(folder), Path(tmp) / "codes.safetensors", resume=False,
                                       progress=False)
                dt = time.perf_counter() - t0
            set_attention_backend("auto")
            bs = getattr(res, "batch_size", None)
            rows.append({"what": "extract_features (semantic codes)", "mode_name": mode.name, "images": n,
                         "seconds": dt, "images_per_s": n / dt, "batch_size": bs})
            log(f"  folder {folder} ({n} images), {mode.name}: {dt:.1f}s, {n / dt:.0f} images/s")
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,ffhq128,ffhq256",
                   help="comma list of tiny, celeba64, ffhq128, ffhq256, emoji32 (the shipped model), "
                        "dvae-ffhq128, dvae-celebahq256 (DiffuseVAE), lrdm-r64x8x8, tlrdm-r16x16x16 (LRDM)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default: 1 and a large one per size)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per mode (default 5, --quick 2)")
    p.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only, short end-to-end runs")
    p.add_argument("--modes", default=None, help="comma list of mode names to keep (reference is always kept)")
    p.add_argument("--compile", action="store_true", help="add torch.compile modes (slow to compile on a CPU)")
    p.add_argument("--experimental", action="store_true",
                   help="add the proposed bf16-weights mode (not in the library; see bf16_weight_copy)")
    p.add_argument("--no-e2e", action="store_true", help="skip encode_stochastic/decode through the API")
    p.add_argument("--e2e-full-max", type=int, default=32,
                   help="image sizes up to this run encode_stochastic/decode at the full default step counts")
    p.add_argument("--fast-recipe", default="fixed-point:10:2:ddim:10",
                   help="reconstruction recipe timed next to the official one: inverter:steps[:iterations]:sampler:steps")
    p.add_argument("--folder", default=None, help="also time feature extraction (semdiff.features) over this "
                                                  "image folder, or 'emoji:N' for N rendered emoji, with the "
                                                  "shipped model")
    p.add_argument("--shipped", default=None, help="model folder used for the emoji32 size and --folder "
                                                   "(default: semdiff/pretrained/semdiff-emoji32-diffae)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--merge", nargs="+", default=None, help="merge result JSON files into --out and print the table")
    p.add_argument("--summary", action="store_true", help="with --merge: print the condensed README table")
    args = p.parse_args(argv)

    if args.merge:
        result = merge(args.merge)
        print(format_summary(result) if args.summary else format_table(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return 0

    os.environ.setdefault("SEMDIFF_PROGRESS", "0")
    if args.shipped:
        SHIPPED_OVERRIDE.append(args.shipped)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from semdiff.api import cpu_has_bf16

    rounds = args.rounds or (2 if args.quick else 5)
    notes: list[str] = []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        modes = gpu_modes(args.compile)
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    else:
        bf16 = cpu_has_bf16()
        if not bf16:
            notes.append("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 modes skipped")
        modes = cpu_modes(bf16, args.compile, args.experimental)
        if not args.compile:
            notes.append("torch.compile modes skipped on the CPU (pass --compile to add them)")
        dtypes = [torch.float32] + ([torch.bfloat16] if bf16 else [])
    if args.modes:
        keep = set(args.modes.split(","))
        modes = [m for m in modes if m.name in keep or m.name == "reference"]

    result: dict[str, Any] = {"machine": machine_info(device), "args": vars(args), "passes": [], "end_to_end": [],
                              "max_batch": {}, "notes": notes}
    log("measuring matmul peaks ...")
    kernels = PeakKernels(device, dtypes, n=1024 if args.quick else 2048)
    kernels.measure(reps=3 if args.quick else 5, warmup=2)
    peaks = kernels.result()
    result["peaks"] = peaks

    default_batches = {"tiny": [1, 64], "emoji32": [1, 64], "celeba64": [1, 16], "ffhq128": [1, 8], "ffhq256": [1, 4],
                       "dvae-ffhq128": [1, 8], "dvae-celebahq256": [1, 4], "lrdm-r64x8x8": [1, 8],
                       "tlrdm-r16x16x16": [1, 8]}
    for size in [s for s in args.sizes.split(",") if s]:
        family, label = build_family(size)
        variants = Variants(family, device)
        size_modes = [m for m in modes if m.weights == "float32" or family_kind(family) == "diffae"]
        batches = [int(b) for b in args.batch.split(",")] if args.batch else (
            [1] if args.quick else default_batches.get(size, [1]))
        mem_rows = {}
        for batch in batches:
            log(f"{label}: batch {batch}, modes {', '.join(m.name for m in size_modes)}")
            try:
                rows = bench_passes(variants, size_modes, batch, rounds, peaks, log, kernels)
            except RuntimeError as e:  # out of memory and the like: say so and go on
                notes.append(f"{size} batch {batch}: {type(e).__name__}: {str(e)[:200]}")
                continue
            for r in rows:
                r["size"] = size
                r["model"] = label
            result["passes"].extend(rows)
            mem_rows[batch] = next((r["peak_memory_mb"] for r in rows
                                    if r["component"] == "denoiser pass" and r["mode_name"] in ("sdpa", "reference")
                                    and r["mode_name"] == ("sdpa" if any(m.name == "sdpa" for m in modes)
                                                           else "reference")), None)
        mem_rows = {b: m for b, m in mem_rows.items() if m is not None}
        if len(mem_rows) >= 2:
            (b0, m0), (b1, m1) = sorted(mem_rows.items())[0], sorted(mem_rows.items())[-1]
            per_image = max((m1 - m0) / (b1 - b0), 1e-3)
            avail = mem_available_mb(device)
            result["max_batch"][size] = {"mb_per_image": per_image, "available_mb": avail,
                                         "estimate": int(max(1, (0.8 * avail - m0) // per_image + 1)),
                                         "method": "linear fit of denoiser-pass peak memory (sdpa mode) "
                                                   f"between batch {b0} and {b1}; 80% of MemAvailable"}
        peaks.update(kernels.result())  # best over every round so far
        if not args.no_e2e:
            steps = {"encode_stochastic": family.default_steps["encode_stochastic"],
                     "decode": family.default_steps["decode"]}
            full = family.image_size <= args.e2e_full_max and not args.quick
            run_steps = steps if full else {"encode_stochastic": 2 if args.quick else 10,
                                            "decode": 2 if args.quick else 5}
            e2e_modes = [m for m in size_modes if m.compile is None]
            recipe = parse_recipe(args.fast_recipe) if family_kind(family) == "diffae" else None
            rows = bench_end_to_end(variants, e2e_modes, steps, run_steps, log, recipe,
                                    rounds=1 if args.quick else 2)
            for r in rows:
                r["size"] = size
                r["model"] = label
            result["end_to_end"].extend(rows)
    # The % of peak: against the best ceiling measured over the whole run.
    peaks.update(kernels.result())
    for row in result["passes"]:
        entry = peaks.get(row["mode"]["dtype"], {})
        row["pct_of_peak"] = 100 * row["gflops"] / entry["peak_gflops"] if entry else None
        row["pct_of_mm_peak"] = 100 * row["gflops"] / entry["mm_gflops"] if entry else None
    if args.folder:
        result["throughput"] = bench_folder_throughput(args.folder, device, modes, log)
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
