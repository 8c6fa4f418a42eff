"""Noise schedules, timestep spacings and samplers shared by every family.

Samplers are short functions over a model callable ``model(x, t) -> output`` (``t`` holds the
ORIGINAL-scale integer timesteps, shape (B,)); they hold no state between calls.
"""

from semdiff.sampling.ddim import ddim_invert, ddim_sample, predict_x0_eps
from semdiff.sampling.schedules import DiffusionSchedule, make_betas
from semdiff.sampling.spacing import ddim_stride_timesteps, space_timesteps

__all__ = [
    "DiffusionSchedule",
    "ddim_invert",
    "ddim_sample",
    "ddim_stride_timesteps",
    "make_betas",
    "predict_x0_eps",
    "space_timesteps",
]
