"""Quality versus network passes: reconstruction (inversion + decode) and sampling, per sampler.

    python benchmarks/quality.py                         # the shipped emoji model (or the analytic part only)
    python benchmarks/quality.py --model PATH --n 64     # any model folder
    python benchmarks/quality.py --analytic-only         # the closed-form check, seconds

Three parts, written to ``--out`` (JSON) and ``--md`` (markdown tables):

1. ``analytic``: data ~ N(mu, diag(s^2)) has the exact optimal denoiser
   ``eps*(x, t) = sqrt(1 - abar) (x - sqrt(abar) mu) / (abar s^2 + 1 - abar)`` and a closed-form
   probability-flow ODE (``(x_t - sqrt(abar_t) mu) / sqrt(abar_t s^2 + 1 - abar_t)`` is constant
   along it), so solver errors are measured against the exact answer, free of any network.
2. ``reconstruction``: held-out images -> z = encode(x) -> x_T by an inverter -> decode by a
   sampler. PSNR / SSIM against the input and against the official recipe (DDIM inversion 250 +
   DDIM decode 20), with the number of denoiser passes (the one encoder pass is the same for all).
3. ``sampling``: codes from the model's prior (or of held-out images when it has none) and a fixed
   x_T ~ N(0, I), decoded by each sampler at N steps; PSNR / SSIM against the official DDIM at 1000
   steps (every timestep) from the same codes, the converged answer all samplers approach, and, with
   ``--fd``, the semdiff-FD of the samples against held-out images.
4. ``precision``: bf16 (the API's autocast, with and without channels-last) against float32 on the
   same images: code error, PSNR of reconstructions and decodes against the float32 result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Analytic


class GaussianDenoiser:
    """The exact eps-prediction of Gaussian data N(mu, diag(s^2)) under a DiffusionSchedule."""

    def __init__(self, schedule, mu: torch.Tensor, s: torch.Tensor):
        self.schedule, self.mu, self.s = schedule, mu, s
        self.abar = schedule.alphas_cumprod.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def exact_decode(self, x_T: torch.Tensor, t_T: int) -> torch.Tensor:
        a = self.schedule.abar(t_T)
        return self.mu + self.s * (x_T - math.sqrt(a) * self.mu) / (a * self.s**2 + 1 - a).sqrt()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def analytic(dim: int = 3 * 32 * 32, seed: int = 0) -> dict[str, Any]:
    from semdiff.sampling import DiffusionSchedule, space_timesteps
    from semdiff.sampling.solvers import invert_with_solver, sample_with_solver

    g = torch.Generator().manual_seed(seed)
    schedule = DiffusionSchedule.from_name("linear", 1000)
    mu = torch.rand(dim, generator=g) - 0.5
    s = torch.rand(dim, generator=g) * 0.4 + 0.1
    model = GaussianDenoiser(schedule, mu, s)
    x_T = torch.randn(8, dim, generator=g)
    x0 = mu + s * torch.randn(8, dim, generator=g)
    decode = []
    for n in (5, 10, 20, 50, 100, 200):
        ts = space_timesteps(1000, n)
        exact = model.exact_decode(x_T, ts[-1])
        row = {"steps": n}
        for name in ("ddim", "dpmsolver++", "unipc"):
            row[name] = rel_err(sample_with_solver(name, model, x_T, schedule, ts), exact)
        decode.append(row)
    recon = []
    for n in (5, 10, 20, 50):
        ts = space_timesteps(1000, n)
        row = {"steps": n}
        row["ddim inv + ddim"] = rel_err(sample_with_solver("ddim", model, invert_with_solver(
            "ddim", model, x0, schedule, ts), schedule, ts), x0)
        for k in (1, 2, 3):
            row[f"fixed-point x{k} + ddim"] = rel_err(sample_with_solver("ddim", model, invert_with_solver(
                "fixed-point", model, x0, schedule, ts, iterations=k), schedule, ts), x0)
        row["dpm++ inv + dpm++"] = rel_err(sample_with_solver("dpmsolver++", model, invert_with_solver(
            "dpmsolver++", model, x0, schedule, ts), schedule, ts), x0)
        recon.append(row)
    official = rel_err(sample_with_solver("ddim", model, invert_with_solver(
        "ddim", model, x0, schedule, space_timesteps(1000, 250)), schedule, space_timesteps(1000, 20)), x0)
    return {"what": "relative L2 error; decode: against the exact ODE solution from x_T at t_{N-1}; "
                    "reconstruction: against x0", "dim": dim, "decode": decode, "reconstruction": recon,
            "official_250_inv_20_dec": official}


# ---------------------------------------------------------------------------------------------
# 2./3. On a model


def load_model(name: str | None):
    from semdiff import SemanticAutoencoder

    if name in (None, "shipped"):
        folder = Path(__file__).resolve().parent.parent / "semdiff" / "pretrained" / "semdiff-emoji32-diffae"
        if not (folder / "config.json").exists():
            return None, None
        name = str(folder)
    if name == "tiny-parity":
        sys.path.insert(0, str(ROOT.parent / "tests"))
        from diffae_helpers import load_fixture, official_weights
        from semdiff.families.diffae import DiffAE
        from semdiff.families.diffae.convert import convert_state_dict

        config, state = convert_state_dict(official_weights(load_fixture()), image_size=32)
        fam = DiffAE(config)
        fam.load_state_dict(state, strict=True)
        return SemanticAutoencoder(fam.eval(), progress=False, name="tiny-parity (random weights)"), None
    model = SemanticAutoencoder.from_pretrained(name, progress=False)
    return model, name


def held_out_images(model, n: int, seed: int = 0) -> torch.Tensor:
    training = model.config.get("training") or {}
    data = training.get("data")
    if data:
        from semdiff.training.data import load_data

        test = load_data(data, model.image_size, split="test", holdout=float(training.get("holdout", 0.1)))
        x = test.float_images()
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx]
    g = torch.Generator().manual_seed(seed)  # no data recorded: smooth random images
    x = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(x, size=model.image_size, mode="bilinear", align_corners=False)


def metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from semdiff.evaluation import image_metrics

    m = image_metrics(pred.clamp(0, 1), target.clamp(0, 1))
    return {"psnr": m["psnr"], "ssim": m["ssim"]}


def noise_stats(x_T: torch.Tensor) -> dict[str, float]:
    """How Gaussian-white a stochastic code looks: its std (1 for N(0, I)) and the mean correlation of
    horizontally and vertically neighbouring pixels (0 for white noise). Codes that carry image
    structure reconstruct exactly but edit and interpolate less like samples from the prior."""
    x = x_T.float()
    x = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    corr_h = (x[..., :, 1:] * x[..., :, :-1]).mean()
    corr_v = (x[..., 1:, :] * x[..., :-1, :]).mean()
    return {"x_T_std": float(x_T.float().std()), "x_T_neighbour_corr": float((corr_h + corr_v) / 2)}


def reconstruction(model, x01: torch.Tensor, recipes: list[dict], timer: Callable | None = None) -> list[dict]:
    from semdiff.sampling.solvers import passes

    z = model.encode(x01)
    rows = []
    official = None
    for r in recipes:
        t0 = time.perf_counter()
        x_T = model.encode_stochastic(x01, z, steps=r["inv_steps"], inverter=r["inverter"],
                                      **({"iterations": r["iterations"]} if r["inverter"] == "fixed-point" else {}))
        rec = model.decode(z, x_T, steps=r["dec_steps"], sampler=r["sampler"])
        dt = time.perf_counter() - t0
        n_pass = passes("invert", r["inverter"], r["inv_steps"], iterations=r.get("iterations", 1)) + \
            passes("decode", r["sampler"], r["dec_steps"])
        row = {**r, "passes": n_pass, **metrics(rec, x01), "seconds_batch": dt, **noise_stats(x_T)}
        if official is None and r.get("official"):
            official = rec
        if official is not None:
            row["psnr_vs_official"] = metrics(rec, official)["psnr"]
        rows.append(row)
        log(f"  recon {r['label']:<36} passes {n_pass:>4}  PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}  "
            f"({dt:.1f}s)")
    return rows


def default_recipes(quick: bool) -> list[dict]:
    R = []

    def add(label, inverter, inv_steps, sampler, dec_steps, iterations=None, official=False):
        d = {"label": label, "inverter": inverter, "inv_steps": inv_steps, "sampler": sampler, "dec_steps": dec_steps,
             "official": official}
        if iterations:
            d["iterations"] = iterations
        R.append(d)

    add("official: DDIM inv 250 + DDIM 20", "ddim", 250, "ddim", 20, official=True)
    for n in ((10, 20) if quick else (10, 20, 50)):
        add(f"DDIM inv {n} + DDIM {n}", "ddim", n, "ddim", n)
    add("DDIM inv 250 + DPM++ 10", "ddim", 250, "dpmsolver++", 10)
    for n in ((5, 10) if quick else (5, 10, 20)):
        for k in ((2,) if quick else (1, 2, 3)):
            add(f"fixed-point x{k} inv {n} + DDIM {n}", "fixed-point", n, "ddim", n, iterations=k)
    for n in ((10,) if quick else (10, 20)):
        add(f"DPM++ inv {n} + DPM++ {n}", "dpmsolver++", n, "dpmsolver++", n)
    # a fixed-point code is the inverse of *its* grid: decoded on another grid it is an ordinary code
    for n in ((20,) if quick else (20, 100)):
        add(f"fixed-point x2 inv 10 + DDIM {n} (other grid)", "fixed-point", 10, "ddim", n, iterations=2)
    if not quick:
        add("official inversion 250 + DDIM 100", "ddim", 250, "ddim", 100)
    return R


def sampling(model, x01: torch.Tensor, steps_list, seed: int = 0, fd: bool = False,
             codes: str = "auto", ref_steps: int = 1000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = len(x01)
    if model.has_prior and codes in ("auto", "prior"):
        with torch.inference_mode():
            z = model.family.sample_codes(n, generator=g).float()
        source = "prior"
    else:
        z = model.encode(x01)
        source = "encoder (held-out images)"
    x_T = torch.randn(n, *model.family.stochastic_shape(), generator=g)
    ref = model.decode(z, x_T, steps=ref_steps, sampler="ddim")
    rows = []
    fd_net = None
    if fd:
        try:
            from semdiff.evaluation import extract_features, feature_statistics, frechet_distance, load_fd_extractor

            fd_net = load_fd_extractor()
            stats_ref = feature_statistics(extract_features(fd_net, x01))
        except Exception as e:  # noqa: BLE001 - optional
            log(f"  semdiff-FD unavailable: {e}")
            fd_net = None
    for steps in steps_list:
        for name in ("ddim", "dpmsolver++", "unipc"):
            out = model.decode(z, x_T, steps=steps, sampler=name)
            row = {"sampler": name, "steps": steps, "passes": steps, **metrics(out, ref)}
            if fd_net is not None:
                row["semdiff_fd"] = frechet_distance(*feature_statistics(extract_features(fd_net, out)), *stats_ref)
            rows.append(row)
            log(f"  sample {name:<12} {steps:>4} steps  PSNR vs DDIM-{ref_steps} {row['psnr']:.2f}  SSIM {row['ssim']:.4f}")
    return {"codes": source, "reference": f"DDIM {ref_steps} steps, same z and x_T", "rows": rows}


def precision(model, x01: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """bf16 (autocast, as ``dtype=torch.bfloat16``; and with channels-last) against float32 on the
    same inputs: the semantic codes, a reconstruction (official recipe and the fast one) and a decode
    from a fixed x_T."""
    import copy

    from semdiff import SemanticAutoencoder
    from semdiff.api import cpu_has_bf16

    if not cpu_has_bf16():
        return {"skipped": "this CPU has no native bf16"}
    variants = {"bf16": SemanticAutoencoder(model.family, dtype=torch.bfloat16, progress=False)}
    cl = copy.deepcopy(model.family).to(memory_format=torch.channels_last)
    variants["bf16+channels-last"] = SemanticAutoencoder(cl, dtype=torch.bfloat16, progress=False)
    g = torch.Generator().manual_seed(seed)
    x_T_random = torch.randn(len(x01), *model.family.stochastic_shape(), generator=g)
    recipes = {"official (ddim 250 + ddim 20)": dict(inv=dict(steps=250), dec=dict(steps=20)),
               "fast (fixed-point x2 10 + ddim 10)": dict(inv=dict(steps=10, inverter="fixed-point", iterations=2),
                                                          dec=dict(steps=10))}

    def run(m):
        z = m.encode(x01)
        out = {"z": z, "sample": m.decode(z32, x_T_random, steps=20)}
        for name, r in recipes.items():
            out[name] = m.decode(z, m.encode_stochastic(x01, z, **r["inv"]), **r["dec"])
        return out

    z32 = model.encode(x01)
    ref = run(model)
    rows = []
    for label, m in variants.items():
        got = run(m)
        row = {"variant": label, "z_rel_err": rel_err(got["z"], ref["z"]),
               "sample_psnr_vs_fp32": metrics(got["sample"], ref["sample"])["psnr"]}
        for name in recipes:
            row[f"{name}: psnr vs input"] = metrics(got[name], x01)["psnr"]
            row[f"{name}: psnr vs fp32"] = metrics(got[name], ref[name])["psnr"]
            row[f"{name}: fp32 psnr vs input"] = metrics(ref[name], x01)["psnr"]
        rows.append(row)
        log(f"  {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "variant"))
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------
# Markdown


def to_markdown(result: dict) -> str:
    out = []
    a = result.get("analytic")
    if a:
        out.append("**Analytic check** (Gaussian data, exact denoiser; relative L2 error against the exact ODE "
                   "solution):\n")
        out.append("| steps | DDIM | DPM-Solver++(2M) | UniPC |\n|---:|---:|---:|---:|")
        for r in a["decode"]:
            out.append(f"| {r['steps']} | {r['ddim']:.2e} | {r['dpmsolver++']:.2e} | {r['unipc']:.2e} |")
        keys = [k for k in a["reconstruction"][0] if k != "steps"]
        out.append("\nRound trip (inversion then decode, N steps each; relative error against x0; official "
                   f"250 + 20: {a['official_250_inv_20_dec']:.2e}):\n")
        out.append("| N | " + " | ".join(keys) + " |\n|---:|" + "---:|" * len(keys))
        for r in a["reconstruction"]:
            out.append(f"| {r['steps']} | " + " | ".join(f"{r[k]:.2e}" for k in keys) + " |")
    rec = result.get("reconstruction")
    if rec:
        out.append(f"\n**Reconstruction** ({result['model']}, {result['n_images']} held-out images; PSNR/SSIM "
                   "against the input; passes = denoiser passes, plus one encoder pass for all):\n")
        out.append("| recipe | passes | PSNR dB | SSIM | PSNR vs official dB | x_T std | x_T neighbour corr |\n"
                   "|---|---:|---:|---:|---:|---:|---:|")
        for r in rec:
            vs = r.get("psnr_vs_official")
            vs = "-" if r.get("official") else (f"{vs:.2f}" if vs is not None and math.isfinite(vs) else "inf")
            out.append(f"| {r['label']} | {r['passes']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {vs} | "
                       f"{r.get('x_T_std', float('nan')):.2f} | {r.get('x_T_neighbour_corr', float('nan')):.2f} |")
    smp = result.get("sampling")
    if smp:
        out.append(f"\n**Sampling** ({result['model']}, codes from the {smp['codes']}; PSNR/SSIM against "
                   f"{smp['reference']}):\n")
        has_fd = any("semdiff_fd" in r for r in smp["rows"])
        out.append("| steps = passes | sampler | PSNR dB | SSIM |" + (" semdiff-FD |" if has_fd else "")
                   + "\n|---:|---|---:|---:|" + ("---:|" if has_fd else ""))
        for r in smp["rows"]:
            out.append(f"| {r['steps']} | {r['sampler']} | {r['psnr']:.2f} | {r['ssim']:.4f} |"
                       + (f" {r['semdiff_fd']:.2f} |" if has_fd else ""))
    prec = result.get("precision")
    if prec and prec.get("rows"):
        out.append(f"\n**bf16 against float32** ({result['model']}, same inputs; PSNR in dB):\n")
        keys = [k for k in prec["rows"][0] if k != "variant"]
        out.append("| variant | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        for r in prec["rows"]:
            out.append(f"| {r['variant']} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder or name; 'tiny-parity' for the parity fixture "
                                                 "(random weights); default: the shipped emoji model")
    p.add_argument("--n", type=int, default=32, help="held-out images / samples")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--analytic-only", action="store_true")
    p.add_argument("--no-precision", action="store_true", help="skip the bf16-against-float32 part")
    p.add_argument("--fd", action="store_true", help="semdiff-FD of the samples (needs --n in the hundreds)")
    p.add_argument("--codes", default="auto", choices=["auto", "prior", "encoder"],
                   help="codes for the sampling part: the prior's (auto when the model has one) or encoded images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "quality.json"))
    p.add_argument("--md", default=str(ROOT / "results" / "quality.md"))
    args = p.parse_args(argv)
    os.environ.setdefault("SEMDIFF_PROGRESS", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    result: dict[str, Any] = {"torch": torch.__version__}
    log("analytic check ...")
    result["analytic"] = analytic()
    if not args.analytic_only:
        model, name = load_model(args.model)
        if model is None:
            log("no shipped model yet (semdiff/pretrained/semdiff-emoji32-diffae): analytic part only")
        else:
            result["model"] = model.name or name
            x01 = held_out_images(model, args.n)
            result["n_images"] = len(x01)
            log(f"reconstruction on {result['model']} ...")
            result["reconstruction"] = reconstruction(model, x01, default_recipes(args.quick))
            if not args.no_precision:
                log("bf16 against float32 ...")
                result["precision"] = precision(model, x01)
            log("sampling ...")
            result["sampling"] = sampling(model, x01, (5, 10, 20) if args.quick else (5, 10, 15, 20, 50),
                                          fd=args.fd, codes=args.codes, ref_steps=200 if args.quick else 1000)
    result["seconds"] = round(time.time() - t0, 1)
    md = to_markdown(result)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.md).write_text(md)
    log(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
