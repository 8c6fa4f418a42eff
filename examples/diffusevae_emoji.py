"""The bundled DiffuseVAE (semdiff-emoji32-diffusevae): the VAE's blurry x̂, the DDPM's detail, an exact
reconstruction through the inverted x_T, an interpolation of z and samples from both priors.

    python examples/diffusevae_emoji.py                # writes diffusevae-emoji.png
    python examples/diffusevae_emoji.py --steps 25

Rows: the demo's held-out emoji; x̂ = VAE(z), the blurry image the 64-d code z holds; z decoded by the
DDPM from a random x_T (the detail is invented); encode -> invert -> decode (near-exact); a lerp of z
between the first two inputs (x_T of the first held fixed, as in DiffuseVAE); samples with z from the
fitted Gaussian mixture and from N(0, I). Printed: PSNR of x̂ and of both decodes on the inputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from demo import load_inputs  # the demo's held-out emoji (examples/demo.py)
from semdiff import SemanticAutoencoder
from semdiff.training.grids import save_labelled_grid

NAME = "semdiff-emoji32-diffusevae"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=NAME)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for inversion and decoding")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps for the samples (the family's point: few)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="diffusevae-emoji.png")
    args = p.parse_args(argv)
    t0 = time.time()
    model = SemanticAutoencoder.from_pretrained(args.model, progress=False)
    g = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    x, _ = load_inputs()
    z = model.encode(x)
    with torch.no_grad():
        x_hat = (model.family.vae_reconstruction(z).clamp(-1, 1) + 1) / 2
    z_only = model.decode(z, steps=args.steps, generator=g())
    rec = model.reconstruct(x, steps=args.steps, inversion_steps=args.steps)
    path = model.interpolate(x[0:1], x[1:2], num=len(x), steps=args.steps, inversion_steps=args.steps)
    priors = [p for p in ("gmm", "normal") if p in model.family.available_priors]
    samples = [(f"samples, z ~ {p}\n({args.sample_steps} steps)",
                model.sample(len(x), steps=args.sample_steps, generator=g(), prior=p)) for p in priors]
    save_labelled_grid([("input", x), ("x̂ = VAE(z)", x_hat), ("z, random x_T", z_only),
                        ("reconstruction\n(inverted x_T)", rec), ("interpolation of z", path), *samples],
                       Path(args.out))
    print(f"{args.model}: code z = {model.code_dim} numbers, priors {', '.join(priors)}")
    print(f"PSNR on the inputs: x_hat {psnr(x_hat, x):.2f} dB, z with random x_T {psnr(z_only, x):.2f} dB, "
          f"reconstruction {psnr(rec, x):.2f} dB")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
