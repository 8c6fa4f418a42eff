"""DDIM (Song et al. 2021) decoding and inversion over a model callable.

With ``abar_i`` the cumulative alpha at the i-th visited timestep ``t_i``::

    x0_hat = sqrt(1/abar_i) x_i - sqrt(1/abar_i - 1) eps          (eps-prediction)
    x0_hat = clamp(x0_hat, -1, 1)                                  (images only: ``clip_x0``)
    eps'   = (sqrt(1/abar_i) x_i - x0_hat) / sqrt(1/abar_i - 1)    (re-derived, as the official code)
    decode:  x_{i-1} = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1} - sigma^2) eps' + sigma z,
             abar_{-1} = 1, so the last step returns x0_hat
    invert:  x_{i+1} = sqrt(abar_{i+1}) x0_hat + sqrt(1 - abar_{i+1}) eps',
             abar_N = 0, so the returned x_T equals eps' of the last step (Diff-AE convention)

Coefficients are taken from the float64 schedule and cast to float32 before use, like the official
``_extract_into_tensor``; the network is called with the original-scale timestep.

Why not diffusers' ``DDIMScheduler`` here: its "leading" spacing is ``range(0, T, T // N)``, which is
not the official stride rule when N does not divide T (N=3: 0,333,666 vs 0,334,668); other spacings
use a wrong previous timestep (diffusers #12633); it re-derives eps from the clipped x0 only with
``use_clipped_model_output=True``; and ``DDIMInverseScheduler`` evaluates the network at the next
timestep. The loop below is the official arithmetic in a dozen lines. diffusers' multistep solvers
are used where they fit (``semdiff.sampling.solvers``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from semdiff.sampling.schedules import DiffusionSchedule
from semdiff.utils import progress_bar

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def predict_x0_eps(
    output: torch.Tensor,
    x: torch.Tensor,
    abar: float,
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output at cumulative alpha ``abar`` into (x0_hat, eps)."""
    sqrt_recip = _f32((1.0 / abar) ** 0.5, x)
    sqrt_recipm1 = _f32((1.0 / abar - 1.0) ** 0.5, x)
    if prediction == "eps":
        x0 = sqrt_recip * x - sqrt_recipm1 * output
    elif prediction == "x0":
        x0 = output
    else:
        raise ValueError(f"prediction must be 'eps' or 'x0', got {prediction!r}")
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    eps = (sqrt_recip * x - x0) / sqrt_recipm1
    return x0, eps


def randn_like_on(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) shaped like ``x``, drawn on the generator's device (a CPU generator works for CUDA x)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddim_sample(
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    timesteps: Sequence[int],
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "decode",
) -> torch.Tensor:
    """Run DDIM from ``x_T`` (taken as the state at ``timesteps[-1]``) down to x0.

    ``timesteps`` are ascending original timesteps (see ``semdiff.sampling.space_timesteps``).
    ``eta > 0`` adds DDIM's stochastic term with noise drawn from ``generator``.
    """
    abars = [schedule.abar(t) for t in timesteps]
    x = x_T
    for i in progress_bar(reversed(range(len(timesteps))), total=len(timesteps), enabled=progress, desc=desc):
        output = model(x, _timestep_batch(timesteps[i], x))
        x0, eps = predict_x0_eps(output, x, abars[i], prediction=prediction, clip_x0=clip_x0)
        abar = _f32(abars[i], x)
        abar_prev = _f32(abars[i - 1] if i > 0 else 1.0, x)
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma**2).sqrt() * eps
        if eta > 0 and i > 0:
            noise = randn_like_on(x, generator)
            x = x + sigma * noise
    return x


def ddim_invert(
    model: ModelFn,
    x0: torch.Tensor,
    schedule: DiffusionSchedule,
    timesteps: Sequence[int],
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
    progress: bool = False,
    desc: str = "invert",
) -> torch.Tensor:
    """Deterministic DDIM inversion from a clean ``x0`` to the stochastic code x_T.

    The network is evaluated at the current timestep and the update uses the next cumulative
    alpha with ``abar_N = 0`` (the official ``ddim_reverse_sample_loop``), not diffusers'
    ``DDIMInverseScheduler`` convention.
    """
    abars = [schedule.abar(t) for t in timesteps]
    x = x0
    n = len(timesteps)
    for i in progress_bar(range(n), total=n, enabled=progress, desc=desc):
        output = model(x, _timestep_batch(timesteps[i], x))
        pred_x0, eps = predict_x0_eps(output, x, abars[i], prediction=prediction, clip_x0=clip_x0)
        abar_next = _f32(abars[i + 1] if i + 1 < n else 0.0, x)
        x = pred_x0 * abar_next.sqrt() + (1 - abar_next).sqrt() * eps
    return x
