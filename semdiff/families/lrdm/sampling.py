"""LRDM's samplers: the shared DDPM / DDIM loops with the x0 ("image") parameterisation.

The official process is ``VPSDE(beta_min=0.1, beta_max=20, N=1000)`` with discrete betas
``linspace(beta_min / N, beta_max / N, N)`` (= DDPM's linear 1e-4 .. 0.02) and the network predicts
the clean latent z0. With ``abar_t = prod_{s<=t} (1 - beta_s)``:

- ``ddpm`` (the official ``ddpm_x0_sampling`` predictor, PC sampler without corrector):
  ``mu = sqrt(abar_t) beta_t / (sqrt(alpha_t) (1 - abar_t)) * x0_hat
  + sqrt(alpha_t) (1 - abar_t / alpha_t) / (1 - abar_t) * z_t``,
  ``z_{t-1} = mu + sqrt(beta_t) * N(0, I)`` -- variance beta_t (``"fixedlarge"``), x0 never clipped,
  and the last step (t = 0) returns mu (``denoise=True``). With all T steps (the only count the
  official code runs) the coefficients are the official float32 tables (``official_ddpm_tables``):
  float32 rounding of ``1 - abar_t`` makes e.g. the last step's x0 weight 0.99983 instead of 1, which
  moves a final latent by ~2e-4 relative, so exact parity needs them. Other step counts use the
  respaced process (``beta_i = 1 - abar_i / abar_{i-1}``) with float64 coefficients.
- ``ddim`` (the official ``ddim_x0_sampling`` predictor generalised to any step count):
  ``eps = (z_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``,
  ``z_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma * N(0, I)``
  with ``sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)``.
- ``invert``: deterministic DDIM inversion with the x0 predictor (eps at the current step,
  ``abar_N = 0``), the counterpart of ``ddim`` with eta = 0 on the same timesteps.

Visited timesteps for N steps: ``t_i = floor(i * T / N)``, i = 0..N-1 (``range(T)`` for N = T, the
usual strided DDIM ``range(0, T, T / N)`` when N divides T, and any N in 1..T otherwise).
"""

from __future__ import annotations

from typing import Callable

import torch

from semdiff.families.base import FeatureNotSupported
from semdiff.sampling import DiffusionSchedule, ddim_invert, ddim_sample
from semdiff.sampling.ddpm import ddpm_sample

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")


def lrdm_schedule(beta_min: float = 0.1, beta_max: float = 20.0, num_timesteps: int = 1000) -> DiffusionSchedule:
    """The discrete VPSDE schedule: betas ``linspace(beta_min / N, beta_max / N, N)`` (float64, CPU)."""
    n = num_timesteps
    return DiffusionSchedule.from_name("linear_range", n, beta_start=beta_min / n, beta_end=beta_max / n)


def official_ddpm_tables(schedule: DiffusionSchedule) -> dict[str, torch.Tensor]:
    """The official ``ddpm_x0_sampling`` coefficients for t = 0..T-1, computed as the official code does.

    ``VPSDE`` keeps float32 ``discrete_betas = linspace(beta_min/N, beta_max/N, N)``, ``alphas``,
    ``alphas_cumprod`` and ``sqrt_alphas_cumprod``; the predictor computes
    ``x0_weighting = sqrt_abar * beta / (sqrt(alpha) * (1 - abar))`` and
    ``x_weighting = sqrt(alpha) * (1 - abar / alpha) / (1 - abar)`` in float32 and adds
    ``sqrt(beta) * z``. Returned as float64 tensors holding those float32 values, in the layout of
    ``semdiff.sampling.ddpm.ddpm_coefficients`` (``log_var = log(beta)``).
    """
    n = schedule.num_timesteps
    # float32 linspace between the same ends, exactly the official ``discrete_betas``
    betas = torch.linspace(float(schedule.betas[0]), float(schedule.betas[-1]), n, dtype=torch.float32, device="cpu")
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    coef_x0 = torch.sqrt(abar) * betas / (torch.sqrt(alphas) * (1.0 - abar))
    coef_xt = torch.sqrt(alphas) * (1.0 - abar / alphas) / (1.0 - abar)
    std = torch.sqrt(betas)
    return {"abar": schedule.alphas_cumprod[:n].clone(), "coef_x0": coef_x0.double(), "coef_xt": coef_xt.double(),
            "var": betas.double(), "log_var": 2.0 * torch.log(std.double())}


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Ascending timesteps ``floor(i * T / N)`` for an N-step sampler (any N in 1..T)."""
    if not isinstance(steps, int) or steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be an integer in 1..{num_timesteps}, got {steps!r}")
    return [(i * num_timesteps) // steps for i in range(steps)]


def sample_latents(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    steps: int,
    *,
    sampler: str = "ddim",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``sampler`` ("ddim" or "ddpm") with an x0-predicting ``model(x, t)`` from x_T to z0."""
    timesteps = spaced_timesteps(schedule.num_timesteps, steps)
    if sampler == "ddpm":
        if eta:
            raise FeatureNotSupported("eta is a DDIM option; the DDPM sampler's variance is fixed (beta_t)")
        if noise is not None:
            noise = _check_noise(noise, x_T, steps)
        tables = official_ddpm_tables(schedule) if steps == schedule.num_timesteps else None
        return ddpm_sample(model, x_T, schedule, timesteps, prediction="x0", clip_x0=False, variance="fixedlarge",
                           noise=noise, generator=generator, progress=progress, desc="ddpm", coefficients=tables)
    if sampler == "ddim":
        if noise is not None:
            raise FeatureNotSupported("noise= fixes the ancestral DDPM noise; it needs sampler='ddpm'")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        return ddim_sample(model, x_T, schedule, timesteps, prediction="x0", clip_x0=False, eta=float(eta),
                           generator=generator, progress=progress, desc="ddim")
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def invert_latents(model: ModelFn, z0: torch.Tensor, schedule: DiffusionSchedule, steps: int, *,
                   progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion of clean latents z0 to x_T with the x0 predictor."""
    timesteps = spaced_timesteps(schedule.num_timesteps, steps)
    return ddim_invert(model, z0, schedule, timesteps, prediction="x0", clip_x0=False, progress=progress)


def _check_noise(noise: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step ancestral noise: (steps, *x.shape) or (steps, *x.shape[1:]) (shared by the batch).

    Entry 0 is used by the first (noisiest) step; the last entry belongs to the final step, which
    returns the mean, so it is unused (the official sampler draws it and discards it too).
    """
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor of shape ({steps}, B, C, H, W), got {type(noise).__name__}")
    shapes = ((steps, *x.shape), (steps, *x.shape[1:]))
    if tuple(noise.shape) not in shapes:
        raise ValueError(f"noise must have shape {shapes[0]} or {shapes[1]} (one draw per step), got "
                         f"{tuple(noise.shape)}; with more items than the batch size, decode in one batch")
    return noise.to(device=x.device, dtype=x.dtype)
