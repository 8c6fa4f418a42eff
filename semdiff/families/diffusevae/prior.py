"""Ex-post density estimation for DiffuseVAE: a Gaussian mixture on VAE latents, fitted in torch.

The official ``expde.py`` fits ``sklearn.mixture.GaussianMixture(n_components=10, random_state=0)``
on reparameterised latents of the training set and pickles it with joblib. Here the mixture is
fitted by EM in float64 (k-means++ seeding and a few Lloyd iterations, like sklearn's
``init_params="kmeans"``; ``reg_covar`` added to every covariance, ``tol`` on the mean
log-likelihood) and stored as three tensors — weights (K,), means (K, D) and covariances
(K, D, D) for ``"full"`` or (K, D) for ``"diag"`` — so a model folder never holds a pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COVARIANCE_TYPES = ("full", "diag")


@dataclass
class GaussianMixture:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    covariances: torch.Tensor  # (K, D, D) full, (K, D) diag
    covariance_type: str = "full"
    converged: bool = True
    n_iter: int = 0
    mean_log_likelihood: float = float("nan")

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample log density (N,)."""
        return torch.logsumexp(_weighted_log_prob(x.double(), self.weights.double(), self.means.double(),
                                                  self.covariances.double(), self.covariance_type), dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_gmm(self.weights, self.means, self.covariances, self.covariance_type, n, generator=generator)


def _cholesky(covs: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.cholesky(covs)
    except RuntimeError as err:  # pragma: no cover - guarded by reg_covar
        raise ValueError("a mixture covariance is not positive definite; increase reg_covar") from err


def _weighted_log_prob(x, weights, means, covs, covariance_type) -> torch.Tensor:
    """log(w_k) + log N(x | mu_k, Sigma_k), (N, K), float64."""
    n, d = x.shape
    out = torch.empty(n, means.shape[0], dtype=x.dtype, device=x.device)
    for k in range(means.shape[0]):
        diff = x - means[k]
        if covariance_type == "full":
            chol = _cholesky(covs[k])
            sol = torch.linalg.solve_triangular(chol, diff.T, upper=False)  # (D, N)
            maha = (sol**2).sum(0)
            logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        else:
            maha = (diff**2 / covs[k]).sum(1)
            logdet = torch.log(covs[k]).sum()
        out[:, k] = torch.log(weights[k]) - 0.5 * (d * math.log(2 * math.pi) + logdet + maha)
    return out


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """k-means++ seeding and Lloyd iterations; returns hard labels (N,)."""
    n = x.shape[0]
    centers = [x[torch.randint(n, (1,), generator=generator).item()]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs.float(), 1, generator=generator).item()
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _m_step(x, resp, covariance_type, reg_covar):
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    means = resp.T @ x / nk[:, None]
    if covariance_type == "full":
        covs = []
        for k in range(means.shape[0]):
            diff = x - means[k]
            cov = (resp[:, k, None] * diff).T @ diff / nk[k]
            cov.diagonal().add_(reg_covar)
            covs.append(cov)
        covs = torch.stack(covs)
    else:
        avg_x2 = resp.T @ (x * x) / nk[:, None]
        covs = avg_x2 - means**2 + reg_covar
        covs = covs.clamp_min(reg_covar)
    return nk / x.shape[0], means, covs


def fit_gmm(
    latents: torch.Tensor,
    n_components: int = 10,
    *,
    covariance_type: str = "full",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    seed: int = 0,
) -> GaussianMixture:
    """Fit a Gaussian mixture to latents (N, D) by EM (sklearn's defaults: K=10, full, 100 iterations)."""
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
    if latents.dim() != 2:
        raise ValueError(f"latents must have shape (N, D), got {tuple(latents.shape)}")
    x = latents.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("latents contain NaN or infinite values")
    n = x.shape[0]
    if n_components < 1 or n < n_components:
        raise ValueError(f"cannot fit {n_components} components to {n} latents (need at least one latent per component)")
    generator = torch.Generator().manual_seed(int(seed))
    labels = _kmeans(x, n_components, generator)
    resp = torch.nn.functional.one_hot(labels, n_components).double()
    weights, means, covs = _m_step(x, resp, covariance_type, reg_covar)
    lower_bound, converged, it = -math.inf, False, 0
    for it in range(1, max_iter + 1):
        wlp = _weighted_log_prob(x, weights, means, covs, covariance_type)
        log_norm = torch.logsumexp(wlp, dim=1)
        resp = torch.exp(wlp - log_norm[:, None])
        weights, means, covs = _m_step(x, resp, covariance_type, reg_covar)
        new_bound = float(log_norm.mean())
        if abs(new_bound - lower_bound) < tol:
            lower_bound, converged = new_bound, True
            break
        lower_bound = new_bound
    return GaussianMixture(weights.float(), means.float(), covs.float(), covariance_type, converged, it, lower_bound)


def sample_gmm(
    weights: torch.Tensor,
    means: torch.Tensor,
    covariances: torch.Tensor,
    covariance_type: str,
    n: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n draws (n, D): a component per draw from the weights, then ``mu_k + L_k eps`` (L L^T = Sigma_k).

    Randomness is drawn on the generator's device (CPU if none) in float64 and the result is
    returned on the means' device as float32.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    w = weights.detach().to(device, torch.float64)
    mu = means.detach().to(device, torch.float64)
    cov = covariances.detach().to(device, torch.float64)
    comp = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
    eps = torch.randn((n, mu.shape[1]), generator=generator, device=device, dtype=torch.float64)
    if covariance_type == "full":
        chol = _cholesky(cov)
        out = torch.empty_like(eps)
        for k in range(mu.shape[0]):  # per component: never materialise one (D, D) factor per draw
            sel = comp == k
            out[sel] = mu[k] + eps[sel] @ chol[k].T
    elif covariance_type == "diag":
        out = mu[comp] + cov[comp].sqrt() * eps
    else:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
    return out.to(means.device, torch.float32)
