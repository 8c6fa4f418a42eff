"""``semdiff fit-prior MODEL IMAGES``: ex-post density estimation (a Gaussian mixture on the codes).

DiffuseVAE's Ex-PDE: encode a data set with the model's VAE, fit a Gaussian mixture to the latents
and store it in the model folder as tensors (``prior_gmm_*`` in ``model.safetensors``, its
settings under ``prior_gmm`` in ``config.json``); ``sample(n, prior="gmm")`` then draws codes from
it (the default once it is there). The official recipe fits 10 full-covariance components to
reparameterised latents (``--latents sample``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("fit-prior", help="fit a Gaussian-mixture prior on a model's codes of a data set")
    parser.add_argument("model", help="model folder (config.json + model.safetensors); the prior is written into it")
    parser.add_argument("images", help="folder, glob pattern or file of images to encode")
    parser.add_argument("--out", default=None, help="write the model with its prior to this folder instead")
    parser.add_argument("--components", type=int, default=10, help="mixture components (default 10, as the paper)")
    parser.add_argument("--covariance", choices=["full", "diag"], default="full", help="covariance type (default full)")
    parser.add_argument("--latents", choices=["sample", "mean"], default="sample",
                        help="fit reparameterised draws (official) or the posterior means")
    parser.add_argument("--max-iter", type=int, default=100, help="EM iterations at most (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws and the initialisation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def fit_prior(model_dir: str | Path, images: str | Path, *, out: str | Path | None = None, components: int = 10,
              covariance: str = "full", latents: str = "sample", max_iter: int = 100, seed: int = 0,
              batch_size: int = 64, device: str | None = None, progress: bool | None = None) -> Path:
    """Fit the mixture and write the model folder (``out`` or ``model_dir``); returns its path."""
    import torch
    from torch.utils.data import DataLoader

    from semdiff.data.folder import ImageFolderDataset
    from semdiff.io import load_model_folder, read_config, save_model_folder
    from semdiff.families.base import FeatureNotSupported
    from semdiff.utils import progress_bar, progress_enabled

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a model folder (fit-prior writes into a local folder; "
                                "download or convert the model first)")
    if read_config(model_dir)["family"] != "diffusevae":
        raise FeatureNotSupported("fit-prior fits a Gaussian mixture to a DiffuseVAE model's VAE latents; "
                                  f"{model_dir} holds a {read_config(model_dir)['family']} model")
    if latents not in ("sample", "mean"):
        raise ValueError(f"latents must be 'sample' or 'mean', got {latents!r}")
    from semdiff.families.diffusevae.prior import fit_gmm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family = load_model_folder(model_dir).to(dev)
    dataset = ImageFolderDataset(images, family.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    generator = torch.Generator(device=dev).manual_seed(seed)
    codes = []
    with torch.inference_mode():
        for x01, _ in progress_bar(loader, total=len(loader), enabled=progress_enabled(progress), desc="encode"):
            x = x01.to(dev) * 2 - 1
            codes.append(family.encode(x, sample=latents == "sample", generator=generator).float().cpu())
    z = torch.cat(codes)
    gmm = fit_gmm(z, components, covariance_type=covariance, max_iter=max_iter, seed=seed)
    family.set_prior_gmm(gmm.weights, gmm.means, gmm.covariances, covariance_type=covariance,
                         latents=latents, num_images=len(z), seed=seed, converged=gmm.converged,
                         mean_log_likelihood=gmm.mean_log_likelihood)
    return save_model_folder(family.to("cpu"), out or model_dir)


def run(args) -> int:
    out = fit_prior(args.model, args.images, out=args.out, components=args.components, covariance=args.covariance,
                    latents=args.latents, max_iter=args.max_iter, seed=args.seed, batch_size=args.batch_size,
                    device=args.device)
    print(f"wrote a {args.components}-component {args.covariance} Gaussian-mixture prior into {out}", file=sys.stdout)
    return 0
