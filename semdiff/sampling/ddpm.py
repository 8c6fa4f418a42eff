"""Ancestral DDPM sampling (Ho et al. 2020) over a model callable, on any subset of timesteps.

For the visited timesteps t_0 < ... < t_{N-1} the respaced process has
``beta_i = 1 - abar_i / abar_{i-1}`` (abar_{-1} = 1) and the posterior ``q(x_{i-1} | x_i, x0)``::

    mean_i = beta_i sqrt(abar_{i-1}) / (1 - abar_i) * x0_hat
             + (1 - abar_{i-1}) sqrt(1 - beta_i) / (1 - abar_i) * x_i
    var_i  = beta_i (1 - abar_{i-1}) / (1 - abar_i)              ("fixedsmall")
             or beta_i, with var_0 := posterior var_1              ("fixedlarge")

and ``x_{i-1} = mean_i + sqrt(var_i) * z`` for i > 0, ``mean_0`` at the last step. Coefficients are
float64, cast to float32 before use. ``noise`` may fix the per-step z (shape (N, *x.shape[1:]),
shared by the batch, as the official DiffuseVAE code does, or (N, *x.shape)).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from semdiff.sampling.ddim import ModelFn, predict_x0_eps, randn_like_on
from semdiff.sampling.schedules import DiffusionSchedule
from semdiff.utils import progress_bar


def ddpm_coefficients(schedule: DiffusionSchedule, timesteps: Sequence[int], variance: str) -> dict[str, torch.Tensor]:
    """float64 tables (indexed by step i) of the respaced posterior: coef_x0, coef_xt, var, log_var."""
    abar = torch.tensor([schedule.abar(t) for t in timesteps], dtype=torch.float64)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1.0 - abar / abar_prev
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    if variance == "fixedsmall":
        var = post_var
        # log of a zero variance at i=0 is clipped to the next one, as in the official code
        log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(post_var) > 1 else post_var.log()
    elif variance == "fixedlarge":
        var = torch.cat([post_var[1:2], betas[1:]]) if len(betas) > 1 else betas
        log_var = var.log()
    else:
        raise ValueError(f"variance must be 'fixedlarge' or 'fixedsmall', got {variance!r}")
    return {
        "abar": abar,
        "coef_x0": betas * abar_prev.sqrt() / (1.0 - abar),
        "coef_xt": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
        "var": var,
        "log_var": log_var,
    }


def ddpm_sample(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    timesteps: Sequence[int],
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
    variance: str = "fixedlarge",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "ddpm",
    x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    coefficients: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Ancestral sampling from ``x_T`` at ``timesteps[-1]`` down to x0 (see the module docstring).

    ``x0_transform`` post-processes x0_hat before the posterior mean (e.g. a family's shift).
    ``coefficients`` replaces the tables of ``ddpm_coefficients`` (same keys, indexed by step i) for a
    family whose official code computes them differently (LRDM: float32 tables from its own betas).
    """
    c = coefficients if coefficients is not None else ddpm_coefficients(schedule, timesteps, variance)
    n = len(timesteps)
    if noise is not None and noise.shape[0] != n:
        raise ValueError(f"noise must have one entry per step ({n}), got shape {tuple(noise.shape)}")
    x = x_T
    for i in progress_bar(reversed(range(n)), total=n, enabled=progress, desc=desc):
        t = torch.full((x.shape[0],), timesteps[i], dtype=torch.long, device=x.device)
        x0, _ = predict_x0_eps(model(x, t), x, float(c["abar"][i]), prediction=prediction, clip_x0=clip_x0)
        if x0_transform is not None:
            x0 = x0_transform(x0)
        mean = float(c["coef_x0"][i]) * x0 + float(c["coef_xt"][i]) * x
        if i == 0:
            x = mean
            break
        if noise is not None:
            z = noise[n - 1 - i].to(x)
        else:
            z = randn_like_on(x, generator)
        x = mean + torch.exp(torch.tensor(0.5 * float(c["log_var"][i]))).to(x) * z
    return x
