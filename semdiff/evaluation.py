"""Evaluation of semantic autoencoders on held-out data: ``semdiff evaluate``.

Metrics (images in [0, 1]):

- ``mse``, ``psnr`` (per image, ``10 log10(1 / mse)``; identical images give ``inf``), ``ssim`` (Gaussian
  window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, valid positions, averaged over channels).
- Reconstruction from z_sem alone (x_T ~ N(0, I), fixed seed) and from z_sem + the DDIM-inverted x_T, at
  T DDIM steps (10, 20, 100).
- Linear probes: multinomial logistic regression (L2 chosen on a validation part of the training split)
  fitted on training-split features, accuracy on the held-out split; z_sem next to PCA of the pixels with
  as many dimensions, and the majority class.
- Attribute edits: held-out images whose attribute is off are moved along the classifier direction,
  decoded, re-encoded and classified; reported: the attribute's probability rises ("moved"), it crosses 0.5
  ("flipped"), the predictions of attributes of other labels stay ("others kept").
- Sample quality: **semdiff-FD**, the Fréchet distance in the 128-d feature space of a small CNN that ships
  with semdiff (``semdiff/pretrained/fd-features``, trained once on the procedural shapes data set to
  classify shape, colour, background and regress size/position). It works offline and is *not* comparable
  with FID. FID itself is computed when you pass the pytorch-fid Inception weights
  (``pt_inception-2015-12-05-6726825d.pth`` or a safetensors copy) with ``--inception``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FD_FEATURES_DIR = Path(__file__).with_name("pretrained") / "fd-features"
FD_WEIGHTS = "fd-features.safetensors"

# ------------------------------------------------------------------------------------------------
# image metrics


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of (B,C,H,W) tensors."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB; ``inf`` where the images are identical."""
    m = mse(a, b)
    return 10 * torch.log10(data_range**2 / m)  # m == 0 -> inf


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, over valid positions, mean over channels."""
    a, b = a.double(), b.double()  # E[x^2] - E[x]^2 cancels badly in float32
    c = a.shape[1]
    size = min(window_size, a.shape[-1], a.shape[-2])
    g = _gaussian_window(size, sigma).double().to(a.device)
    w = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def filt(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a**2
    s_bb = filt(b * b) - mu_b**2
    s_ab = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return (num / den).flatten(1).mean(1).float()


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean MSE, mean per-image PSNR (finite images only) and mean SSIM."""
    m = mse(pred, target)
    p = psnr(pred, target)
    finite = p[torch.isfinite(p)]
    return {"mse": float(m.mean()), "psnr": float(finite.mean()) if len(finite) else float("inf"),
            "ssim": float(ssim(pred, target).mean())}


# ------------------------------------------------------------------------------------------------
# linear probes


def pca_fit(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the top-k principal directions (D, k) of the rows of x."""
    x = x.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean.float(), vh[:k].T.float()


def pca_transform(x: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    return (x.float() - mean) @ components


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 100) -> dict[str, float]:
    """Accuracy on the test rows of a multinomial logistic regression fitted on the train rows.

    Features are standardised with the train statistics; the L2 strength is chosen on a random
    ``val_fraction`` of the train rows, then the probe is refitted on all of them. Test labels the
    train split never had count as errors.
    """
    with torch.enable_grad():
        train_x, test_x = train_x.double(), test_x.double()
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        classes = torch.unique(train_y)
        remap = {int(c): i for i, c in enumerate(classes)}
        ytr = torch.tensor([remap[int(v)] for v in train_y])
        yte = torch.tensor([remap.get(int(v), -1) for v in test_y])
        c = len(classes)
        if c < 2:
            return {"accuracy": float((yte == 0).float().mean()), "l2": float("nan")}
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(ytr), generator=g)
        n_val = max(1, int(len(ytr) * val_fraction))
        val, fit = perm[:n_val], perm[n_val:]
        best, best_l2 = -1.0, l2_grid[0]
        for l2 in l2_grid:
            w, b = _fit_logreg(train_x[fit], ytr[fit], c, l2, max_iter)
            acc = float(((train_x[val] @ w + b).argmax(1) == ytr[val]).float().mean())
            if acc > best:
                best, best_l2 = acc, l2
        w, b = _fit_logreg(train_x, ytr, c, best_l2, max_iter)
        acc = float(((test_x @ w + b).argmax(1) == yte).float().mean())
    return {"accuracy": acc, "l2": best_l2, "val_accuracy": best}


def majority_accuracy(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    values, counts = torch.unique(train_y, return_counts=True)
    return float((test_y == values[counts.argmax()]).float().mean())


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in float64 through symmetric eigendecompositions."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.double()
    return f.mean(0), torch.cov(f.T)


class FDFeatureNet(nn.Module):
    """semdiff-FD's fixed feature extractor: images in [0, 1] at any size -> 128-d features.

    Inputs are resized to 32x32 (bilinear, antialiased); five 3x3 convolutions with batch norm and SiLU,
    three of stride 2, global average pooling. The heads (shape, colour, background, size/x/y) were only used
    to train it.
    """

    feature_dim = 128
    input_size = 32

    def __init__(self, num_shapes: int = 8, num_colors: int = 8, num_backgrounds: int = 4):
        super().__init__()
        chans = [(3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 96, 2), (96, 96, 1), (96, 128, 2)]
        layers: list[nn.Module] = []
        for cin, cout, stride in chans:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({"shape": nn.Linear(128, num_shapes), "color": nn.Linear(128, num_colors),
                                    "background": nn.Linear(128, num_backgrounds), "geometry": nn.Linear(128, 3)})

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.body(x * 2 - 1).mean((2, 3))

    def forward(self, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x01)
        return {k: head(f) for k, head in self.heads.items()}


def load_fd_extractor(path: str | os.PathLike | None = None) -> FDFeatureNet:
    """The shipped semdiff-FD network (weights stored as float16, run in float32)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else FD_FEATURES_DIR / FD_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"semdiff-FD weights not found at {path}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    net = FDFeatureNet()
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
    device = device or next(net.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size]
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        out.append(net.features(x.to(device)).double().cpu())
    return torch.cat(out)


def semdiff_fd(images_a: torch.Tensor, images_b: torch.Tensor, net: FDFeatureNet | None = None) -> float:
    """semdiff-FD between two image sets in [0, 1] (not comparable with FID)."""
    net = net or load_fd_extractor()
    fa, fb = extract_features(net, images_a), extract_features(net, images_b)
    return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))


# ------------------------------------------------------------------------------------------------
# FID Inception (the pytorch-fid network); weights supplied by the user


class _BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class _InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, cin, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(bp)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3`` up to the 2048-d pool3 features, with its parameter names, so the
    ``pt_inception-2015-12-05-6726825d.pth`` state dict loads as it is. Input: images in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _InceptionA(192, 32)
        self.Mixed_5c = _InceptionA(256, 64)
        self.Mixed_5d = _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, 128)
        self.Mixed_6c = _InceptionC(768, 160)
        self.Mixed_6d = _InceptionC(768, 160)
        self.Mixed_6e = _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, "avg")
        self.Mixed_7c = _InceptionE(2048, "max")

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x01.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean((2, 3))


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """The FID Inception from the user's weights file (safetensors, or a pickled state dict read without
    executing code). The file's ``fc.*`` and ``num_batches_tracked`` entries are ignored."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        from semdiff.checkpoint import load_checkpoint, state_dict_of

        state = state_dict_of(load_checkpoint(path, expected="Inception weights"), path)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits.")) and
             not k.endswith("num_batches_tracked")}
    net = FIDInceptionV3()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not the pytorch-fid Inception state dict: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# the evaluation of a model


def _batches(n: int, size: int) -> Iterable[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _log(text: str) -> None:
    print(f"[semdiff evaluate] {text}", file=sys.stderr, flush=True)


def evaluate_model(model: Any = None, *, data: str | None = None, split: str = "test", holdout: float | None = None,
                   steps: Sequence[int] = (10, 20, 100), max_items: int | None = None, edit_scale: float = 0.3,
                   edit_items: int = 64, edit_steps: int = 20, num_samples: int = 1000, sample_steps: int = 20,
                   prior_steps: int | None = None, inception: str | os.PathLike | None = None,
                   skip: Iterable[str] = (), device: str | None = None, seed: int = 0, write_card: bool = False,
                   out: str | os.PathLike | None = None, print_report: bool = False,
                   batch_size: int = 128) -> dict[str, Any]:
    """Evaluate a model (name, folder or ``SemanticAutoencoder``) on the held-out split of its data.

    Returns the metrics dict (also written to ``out`` as JSON, and into the model folder's README.md with
    ``write_card``).
    """
    from semdiff.api import SemanticAutoencoder
    from semdiff.training.data import load_data

    t0 = time.time()
    skip = set(skip)
    if isinstance(model, SemanticAutoencoder):
        ae = model
        folder = None
    else:
        ae = SemanticAutoencoder.from_pretrained(model, device=device, progress=False, batch_size=batch_size)
        folder = Path(model) if model is not None and Path(model).is_dir() else None
        if folder is None:
            folder = _resolved_folder(model)
    ae.progress = False
    ae.batch_size = batch_size
    config = ae.config
    training = config.get("training") or {}
    data_name = data or training.get("data")
    if not data_name:
        raise ValueError("the model does not record its training data; pass --data")
    holdout = holdout if holdout is not None else float(training.get("holdout", 0.1))
    size = ae.image_size
    test = load_data(data_name, size, split=split, holdout=holdout)
    if max_items is not None:
        test = test.subset(torch.arange(min(max_items, len(test))))
    train = load_data(data_name, size, split="train", holdout=holdout) if split != "train" else test
    x = test.float_images()
    n = len(x)
    _log(f"{ae.name}: {n} {split} images of {data_name} (holdout {holdout}), {len(train)} train images")
    result: dict[str, Any] = {
        "model": str(ae.name),
        "data": {"name": str(data_name), "split": split, "items": n, "holdout": holdout, "train_items": len(train),
                 "split_rule": "held out when SHA-256(key) < holdout; emoji key = codepoints without skin-tone "
                               "modifiers, so every skin-tone variant of a held-out emoji is held out"},
        "device": str(ae.device), "torch_threads": torch.get_num_threads(),
    }
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731

    z = ae.encode(x, progress=False)
    recon_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if "reconstruction" not in skip:
        rows = []
        noise = ae.family.random_stochastic(n, generator=gen())
        for T in steps:
            t1 = time.time()
            rec_z = ae.decode(z, noise, steps=T, progress=False)
            rows.append({"name": f"z_sem alone (x_T ~ N(0, I)), T={T}", "code": "z", "T": T,
                         **image_metrics(rec_z, x), "seconds": round(time.time() - t1, 1)})
            t1 = time.time()
            x_T = ae.encode_stochastic(x, z, steps=T, progress=False)
            rec = ae.decode(z, x_T, steps=T, progress=False, **ae.family.inverted_decode_options)
            recon_cache[T] = (x_T, rec)
            rows.append({"name": f"z_sem + inverted x_T, T={T}", "code": "z+x_T", "T": T,
                         **image_metrics(rec, x), "seconds": round(time.time() - t1, 1)})
            _log(f"reconstruction T={T}: z alone PSNR {rows[-2]['psnr']:.2f} dB, z+x_T PSNR {rows[-1]['psnr']:.2f} dB")
        rows.sort(key=lambda r: (r["code"] != "z", r["T"]))
        result["reconstruction"] = {"rows": rows, "decode_steps": "T (inversion and decoding both use T steps)"}

    if "probe" not in skip and test.labels:
        result["probe"] = probe_report(ae, train, test, z_test=z, seed=seed)
        for row in result["probe"]["rows"]:
            _log(f"probe {row['label']}: z_sem {row['z_sem']:.3f}  PCA {row['pca']:.3f}  majority {row['majority']:.3f}")

    if "edit" not in skip and ae.attributes:
        x_T, rec = recon_cache.get(edit_steps) or (None, None)
        if x_T is None:
            x_T = ae.encode_stochastic(x, z, steps=edit_steps, progress=False)
            rec = ae.decode(z, x_T, steps=edit_steps, progress=False, **ae.family.inverted_decode_options)
        result["edit"] = edit_report(ae, z, x_T, rec, scale=edit_scale, max_items=edit_items, steps=edit_steps)
        _log(f"edits: mean success {result['edit']['mean_success']:.3f}, moved {result['edit']['mean_moved']:.3f}")

    if "samples" not in skip:
        result["sample_quality"] = sample_quality(ae, train, test, num_samples=num_samples, steps=sample_steps,
                                                  prior_steps=prior_steps, inception=inception, seed=seed,
                                                  recon=recon_cache.get(max(steps))[1] if recon_cache else None)
    result["runtime_s"] = round(time.time() - t0, 1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    if write_card:
        if folder is None:
            raise ValueError("--write-card needs a model folder")
        write_metrics_card(folder, result)
    if print_report:
        from semdiff.training.card import metrics_markdown

        print(metrics_markdown(result))
    return result


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def _resolved_folder(name) -> Path | None:
    try:
        from semdiff.hub import resolve_model_dir
        from semdiff.manifest import default_model_name

        return Path(resolve_model_dir(str(name if name is not None else default_model_name())))
    except Exception:  # pragma: no cover - hub missing or not resolvable offline
        return None


def write_metrics_card(folder: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Re-render the model folder's README.md with the evaluation figures; keep them in ``metrics.json``."""
    from semdiff.training.card import render_model_card

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    card = folder / "README.md"
    card.write_text(render_model_card(config, name=folder.name, metrics=metrics))
    return card


# ------------------------------------------------------------------------------------------------
# parts


def probe_labels(data) -> list[str]:
    """Categorical (with value names) and bool labels of a data set."""
    out = []
    for name, y in sorted(data.labels.items()):
        if y.dtype == torch.bool or (not y.is_floating_point() and name in data.label_names):
            out.append(name)
    return out


def probe_report(ae, train, test, *, z_test: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """Linear probes of z_sem vs PCA of the pixels (same dimension) for every label of the data."""
    z_train = ae.encode(train.float_images(), progress=False)
    z_test = z_test if z_test is not None else ae.encode(test.float_images(), progress=False)
    k = z_train.shape[1]
    px_train, px_test = train.float_images().flatten(1), test.float_images().flatten(1)
    mean, comps = pca_fit(px_train, k)
    p_train, p_test = pca_transform(px_train, mean, comps), pca_transform(px_test, mean, comps)
    rows = []
    for label in probe_labels(test):
        ytr, yte = train.labels[label].long(), test.labels[label].long()
        if len(torch.unique(ytr)) < 2 or len(torch.unique(yte)) < 2:
            continue
        rz = linear_probe(z_train, ytr, z_test, yte, seed=seed)
        rp = linear_probe(p_train, ytr, p_test, yte, seed=seed)
        rows.append({"label": label, "classes": int(len(torch.unique(torch.cat([ytr, yte])))),
                     "z_sem": rz["accuracy"], "pca": rp["accuracy"], "majority": majority_accuracy(ytr, yte),
                     "l2_z": rz["l2"], "l2_pca": rp["l2"]})
    return {"dims": k, "rows": rows, "protocol": "multinomial logistic regression on standardised features, "
            "L2 from {1e-4,1e-3,1e-2,1e-1} chosen on 20% of the train split, refit on the whole train split, "
            "accuracy on the held-out split"}


def _attribute_families(ae) -> dict[str, str]:
    groups = ae.config.get("attribute_groups") or {}
    family = {name: name for name in ae.attributes}
    for label, names in groups.items():
        for name in names:
            family[name] = label
    return family


@torch.no_grad()
def edit_report(ae, z: torch.Tensor, x_T: torch.Tensor, rec: torch.Tensor, *, scale: float = 0.3,
                max_items: int = 64, steps: int = 20) -> dict[str, Any]:
    """Edit success of every attribute on images where it is off (decoded, re-encoded, classified).

    The reference is the re-encoded reconstruction without an edit, so only the edit is measured.
    """
    names = ae.attributes
    family = _attribute_families(ae)
    p_ref = torch.stack(list(ae.classify(ae.encode(rec, progress=False)).values()), 1)
    rows = []
    for a, name in enumerate(names):
        cand = torch.nonzero(p_ref[:, a] < 0.5).flatten()[:max_items]
        if len(cand) == 0:
            continue
        z_e = ae.family.edit_codes(z[cand].to(ae.device), {name: scale}).cpu()
        x_e = ae.decode(z_e, x_T[cand], steps=steps, progress=False, **ae.family.inverted_decode_options)
        p_e = torch.stack(list(ae.classify(ae.encode(x_e, progress=False)).values()), 1)
        others = [j for j, other in enumerate(names) if family[other] != family[name]]
        moved = p_e[:, a] > p_ref[cand, a]
        flipped = p_e[:, a] > 0.5
        if others:
            same = (p_e[:, others] > 0.5) == (p_ref[cand][:, others] > 0.5)
            kept_frac = same.float().mean(1)
            all_kept = same.all(1)
        else:
            kept_frac = torch.ones(len(cand))
            all_kept = torch.ones(len(cand), dtype=torch.bool)
        rows.append({"attribute": name, "n": int(len(cand)), "moved": float(moved.float().mean()),
                     "flipped": float(flipped.float().mean()), "others_kept": float(kept_frac.mean()),
                     "success": float((flipped & all_kept).float().mean())})
    mean = lambda key: float(sum(r[key] for r in rows) / max(1, len(rows)))  # noqa: E731
    return {"scale": scale, "steps": steps, "rows": rows, "mean_moved": mean("moved"), "mean_flipped": mean("flipped"),
            "mean_others_kept": mean("others_kept"), "mean_success": mean("success")}


@torch.no_grad()
def sample_quality(ae, train, test, *, num_samples: int = 1000, steps: int = 20, prior_steps: int | None = None,
                   inception=None, seed: int = 0, recon: torch.Tensor | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"feature_space": "semdiff-FD v1: 128-d features of the CNN shipped in "
                                            "semdiff/pretrained/fd-features (trained on shapes); not comparable "
                                            "with FID"}
    net = load_fd_extractor()
    f_test = extract_features(net, test.images)
    f_train = extract_features(net, train.images)
    stats_test = feature_statistics(f_test)
    out["semdiff_fd_train_vs_heldout"] = frechet_distance(*feature_statistics(f_train), *stats_test)
    if recon is not None:
        out["semdiff_fd_reconstructions_vs_heldout"] = frechet_distance(
            *feature_statistics(extract_features(net, recon)), *stats_test)
    samples = None
    if ae.has_prior and num_samples > 0:
        t1 = time.time()
        samples = ae.sample(num_samples, steps=steps, prior_steps=prior_steps,
                            generator=torch.Generator().manual_seed(seed), progress=False)
        out["num_samples"] = num_samples
        out["sample_decode_steps"] = steps
        stats_samples = feature_statistics(extract_features(net, samples))
        out["semdiff_fd_samples_vs_heldout"] = frechet_distance(*stats_samples, *stats_test)
        out["semdiff_fd_samples_vs_train"] = frechet_distance(*stats_samples, *feature_statistics(f_train))
        out["sampling_seconds"] = round(time.time() - t1, 1)
        # families with several priors (DiffuseVAE: "normal" and a fitted "gmm"): every one, same seed;
        # the default prior's samples are the ones above
        priors = list(getattr(ae.family, "available_priors", []) or [])
        if len(priors) > 1:
            by_prior = out["semdiff_fd_samples_vs_heldout_by_prior"] = {}
            for prior in priors:
                if prior == ae.family.default_prior:
                    by_prior[prior] = out["semdiff_fd_samples_vs_heldout"]
                    continue
                s_p = ae.sample(num_samples, steps=steps, prior_steps=prior_steps, prior=prior,
                                generator=torch.Generator().manual_seed(seed), progress=False)
                by_prior[prior] = frechet_distance(*feature_statistics(extract_features(net, s_p)), *stats_test)
    if inception is not None:
        inc = load_inception(inception)
        i_test = extract_features(inc, test.images, batch_size=32)
        st = feature_statistics(i_test)
        out["fid_train_vs_heldout"] = frechet_distance(*feature_statistics(extract_features(inc, train.images, 32)), *st)
        if samples is not None:
            out["fid_samples_vs_heldout"] = frechet_distance(*feature_statistics(extract_features(inc, samples, 32)), *st)
    else:
        out["fid"] = "not computed: pass --inception pt_inception-2015-12-05-6726825d.pth (pytorch-fid weights)"
    return out
