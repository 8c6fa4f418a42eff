"""The bundled LRDM (semdiff-emoji32-lrdm): reconstructions, decodes of r alone, an interpolation and
samples from its N(0, I) representation prior, on the demo's held-out emoji.

    python examples/lrdm_emoji.py                      # writes lrdm-emoji.png
    python examples/lrdm_emoji.py --steps 20 --out x.png

Rows: the inputs; encode -> DDIM-invert -> decode (near-exact); the representation mean r alone with
a random x_T (what r keeps: shape, colours, layout); a slerp of r (and of x_T) between the first two
inputs; eight samples, r ~ N(0, I). Printed: PSNR of both reconstructions on the inputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from demo import load_inputs  # the demo's held-out emoji (examples/demo.py)
from semdiff import SemanticAutoencoder
from semdiff.training.grids import save_labelled_grid

NAME = "semdiff-emoji32-lrdm"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=NAME)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps, decoding and inversion (default: the model's, 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lrdm-emoji.png")
    args = p.parse_args(argv)
    t0 = time.time()
    model = SemanticAutoencoder.from_pretrained(args.model)
    g = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    x, _ = load_inputs()
    z = model.encode(x)
    rec = model.reconstruct(x, steps=args.steps, inversion_steps=args.steps)
    r_only = model.decode(z, model.family.random_stochastic(len(x), generator=g()), steps=args.steps)
    path = model.interpolate(x[0:1], x[1:2], num=8, steps=args.steps, inversion_steps=args.steps)
    samples = model.sample(8, steps=args.steps, generator=g())
    save_labelled_grid([("input", x), ("reconstruction", rec), ("r alone", r_only), ("interpolation", path),
                        ("r ~ N(0, I)", samples)], Path(args.out))
    print(f"{args.model}: code r {tuple(model.family.representation_shape)} = {model.code_dim} numbers")
    print(f"PSNR on the inputs: reconstruction {psnr(rec, x):.2f} dB, r alone {psnr(r_only, x):.2f} dB")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
