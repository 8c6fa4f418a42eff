"""DiffuseVAE's point, measured: sample quality at few DDIM steps against an unconditional DDPM of the same size.

    python benchmarks/diffusevae_few_step.py --baseline runs/dv-uncond/model
    python benchmarks/diffusevae_few_step.py --model runs/dv/model --baseline runs/dv-uncond/model --n 500

``--model`` (default: the bundled ``semdiff-emoji32-diffusevae``) is sampled with z from N(0, I) and, when it
stores one, from its Ex-PDE Gaussian mixture; ``--baseline`` is the same UNet trained the same way with the
condition zeroed (``semdiff train --preset emoji32-diffusevae-uncond``) and is sampled with a zero condition.
Every sampler is the official deterministic DDIM (eta = 0, uniform spacing) from the *same* x_T ~ N(0, I)
(Form-1). The figure is semdiff-FD (128-d features of the shipped fd-features CNN; not comparable with FID)
of the samples against the held-out split of the model's data, plus, for scale, the FD of the training split
against the held-out split (the floor a perfect sampler would reach with this many images) and of the VAE's
blurry x̂ alone. Written to ``--out`` (JSON) and printed as a markdown table with the ratio baseline / DiffuseVAE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[few-step] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def ddim_samples(family, z: torch.Tensor | None, noise: torch.Tensor, steps: int, batch: int = 250) -> torch.Tensor:
    """Images in [0, 1]: the family's DDIM from ``noise`` with x̂ = VAE(z), or with a zero condition (z None)."""
    from semdiff.families.diffusevae.sampling import sample_chain

    out = []
    tables = family._tables(steps, "uniform")
    for s in range(0, len(noise), batch):
        x_T = noise[s:s + batch]
        if z is None:
            y = sample_chain(lambda x, t: family.unet(x, t, torch.zeros_like(x)), x_T, tables)
        else:
            zb = z[s:s + batch]
            y = family.decode(zb, family.start_state(zb, x_T), steps=steps, sampler="ddim", spacing="uniform")
        out.append(((y.clamp(-1, 1) + 1) / 2).float())
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="semdiff-emoji32-diffusevae")
    p.add_argument("--baseline", required=True, help="model folder of the unconditional baseline")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--n", type=int, default=500, help="samples per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "diffusevae-few-step.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.num_threads))

    from semdiff import SemanticAutoencoder
    from semdiff.evaluation import extract_features, feature_statistics, frechet_distance, load_fd_extractor
    from semdiff.training.data import load_data

    ae = SemanticAutoencoder.from_pretrained(args.model, progress=False)
    base = SemanticAutoencoder.from_pretrained(args.baseline, progress=False)
    fam, bfam = ae.family.eval(), base.family.eval()
    if fam.form != "form1":
        raise SystemExit("the comparison starts both chains from the same x_T ~ N(0, I): use a Form-1 model")
    training = ae.config.get("training") or {}
    data_name, holdout = training.get("data", "emoji"), float(training.get("holdout", 0.1))
    test = load_data(data_name, ae.image_size, split="test", holdout=holdout)
    train = load_data(data_name, ae.image_size, split="train", holdout=holdout)
    net = load_fd_extractor()
    stats_test = feature_statistics(extract_features(net, test.images))

    def fd(images: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(extract_features(net, images)), *stats_test)

    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.n, *fam.stochastic_shape()), generator=gen)
    codes = {"normal": fam.sample_codes(args.n, prior="normal", generator=torch.Generator().manual_seed(args.seed + 1))}
    if fam.prior_gmm:
        codes["gmm"] = fam.sample_codes(args.n, prior="gmm", generator=torch.Generator().manual_seed(args.seed + 2))
    result: dict = {
        "model": str(args.model), "baseline": str(args.baseline), "data": data_name, "heldout_items": len(test),
        "num_samples": args.n, "seed": args.seed, "sampler": "official DDIM, eta 0, uniform spacing, same x_T",
        "torch_threads": torch.get_num_threads(),
        "unet_params": {"diffusevae": n_params(fam.unet), "baseline": n_params(bfam.unet)},
        "vae_params": n_params(fam.vae),
        "training": {"diffusevae": training.get("stages"), "baseline": (base.config.get("training") or {}).get("stages")},
        "feature_space": "semdiff-FD v1 (fd-features CNN, 128-d); not comparable with FID",
        "fd_train_vs_heldout": fd(train.images[torch.randperm(len(train), generator=gen)[:args.n]]),
        "fd_vae_xhat_vs_heldout": {},
        "rows": [],
    }
    with torch.no_grad():
        for prior, z in codes.items():
            result["fd_vae_xhat_vs_heldout"][prior] = fd(torch.cat(
                [fam.vae.decode(z[s:s + 250]) for s in range(0, len(z), 250)]).float())
    log(f"train vs held-out FD {result['fd_train_vs_heldout']:.3f}; VAE x̂ alone {result['fd_vae_xhat_vs_heldout']}")
    for steps in args.steps:
        row: dict = {"steps": steps}
        for name, z, family in [*((f"diffusevae_{k}", v, fam) for k, v in codes.items()), ("baseline", None, bfam)]:
            t0 = time.time()
            images = ddim_samples(family, z, noise, steps)
            row[name] = fd(images)
            row[f"{name}_seconds"] = round(time.time() - t0, 1)
        for k in codes:
            row[f"ratio_baseline_over_{k}"] = row["baseline"] / row[f"diffusevae_{k}"]
        result["rows"].append(row)
        log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    priors = [k for k in ("normal", "gmm") if f"diffusevae_{k}" in result["rows"][0]]
    head = ["DDIM steps"] + [f"DiffuseVAE ({'N(0,I)' if k == 'normal' else 'GMM'})" for k in priors] \
        + ["uncond. DDPM (same UNet)", "ratio (uncond / N(0,I))"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["rows"]:
        cells = [str(r["steps"])] + [f"{r[f'diffusevae_{k}']:.2f}" for k in priors] \
            + [f"{r['baseline']:.2f}", f"{r['ratio_baseline_over_normal']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"semdiff-FD vs {result['heldout_items']} held-out images, {result['num_samples']} samples each "
                 f"(lower is better); train split vs held-out: {result['fd_train_vs_heldout']:.2f}; VAE x̂ alone: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in result["fd_vae_xhat_vs_heldout"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
