"""Beta schedules and the float64 coefficient tables of a discrete diffusion process.

Forward process: ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with
``abar_t = prod_{s<=t} (1 - beta_s)``. Coefficients are computed in float64 and cast to float32 at
the point of use, as the official implementations do; that order of rounding is part of parity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _linspace(start: float, end: float, n: int) -> torch.Tensor:
    # numpy's linspace, not torch's: the official code uses numpy and the two differ in the last bit.
    import numpy as np

    return torch.from_numpy(np.linspace(start, end, n, dtype=np.float64)).to("cpu")


def make_betas(name: str, num_timesteps: int = 1000, **kwargs) -> torch.Tensor:
    """Return float64 betas for a named schedule.

    - ``linear``: ``linspace(s*1e-4, s*0.02, T)`` with ``s = 1000 / T`` (DDPM / Diff-AE).
    - ``const<v>`` (e.g. ``const0.008``): every beta equals v (Diff-AE latent prior).
    - ``linear_range``: ``linspace(beta_start, beta_end, T)`` from kwargs (DiffuseVAE).
    - ``scaled_linear``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (LDM/LRDM
      ``linear`` schedule; defaults 0.0015 and 0.0195).
    - ``cosine``: Nichol & Dhariwal, ``s = 0.008``, clipped at 0.999.
    """
    T = num_timesteps
    if name == "linear":
        scale = 1000 / T
        return _linspace(scale * 1e-4, scale * 0.02, T)
    if name.startswith("const"):
        return torch.full((T,), float(name[len("const"):]), dtype=torch.float64, device="cpu")
    if name == "linear_range":
        return _linspace(kwargs["beta_start"], kwargs["beta_end"], T)
    if name == "scaled_linear":
        start = kwargs.get("beta_start", 0.0015)
        end = kwargs.get("beta_end", 0.0195)
        return _linspace(start**0.5, end**0.5, T) ** 2
    if name == "cosine":
        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64, device="cpu")
    raise ValueError(f"unknown beta schedule {name!r} (linear, const<v>, linear_range, scaled_linear, cosine)")


@dataclass(frozen=True)
class DiffusionSchedule:
    """The float64 ``alphas_cumprod`` of a T-step process and helpers to read it.

    ``abar(t)`` accepts original-scale timesteps; ``t = -1`` stands for "before the first step"
    (abar = 1) and ``t = T`` for "after the last" (abar = 0), which is how DDIM's first and last
    updates are expressed.
    """

    betas: torch.Tensor

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, **kwargs) -> "DiffusionSchedule":
        return cls(make_betas(name, num_timesteps, **kwargs))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def __post_init__(self):
        # computed once: samplers read it at every step
        object.__setattr__(self, "_alphas_cumprod", torch.cumprod(1.0 - self.betas, dim=0))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def abar(self, t: int) -> float:
        """abar at an original timestep as a Python float64; -1 -> 1.0, T -> 0.0."""
        if t < 0:
            return 1.0
        if t >= self.num_timesteps:
            return 0.0
        return float(self.alphas_cumprod[t])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for a batch of timesteps t (B,)."""
        abar = self.alphas_cumprod.to(x0.device)[t]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = abar.sqrt().float().reshape(shape)
        b = (1.0 - abar).sqrt().float().reshape(shape)
        return a * x0 + b * noise
