"""Diff-AE as a semdiff family: the official inference procedures over shared samplers.

- encode: ``encoder(x)`` -> raw z_sem.
- encode_stochastic: DDIM inversion with x0 clipping, ``abar_N = 0`` ("ddimN" spacing).
- decode: DDIM (eta = 0) with x0 clipping and eps re-derived; ``sampler="dpmsolver++"|"unipc"``
  runs a faster solver on the same grid (``semdiff.sampling.solvers``).
- encode_stochastic: ``inverter="fixed-point"`` inverts the DDIM decoder exactly on the decode grid,
  ``"dpmsolver++"`` uses diffusers' DPM-Solver++ inverse; the default ``"ddim"`` is the official one.
- sample_codes: latent DDIM (betas const 0.008, no clipping) in the normalised space, then
  ``z = z_n * std + mean``.
"""

from __future__ import annotations

from typing import Any

import torch

from semdiff.families.base import Family, FeatureNotSupported, register_family
from semdiff.families.diffae.networks import AutoencUNet, DiffAEConfig, LatentMLP, LatentMLPConfig, SemanticEncoder
from semdiff.sampling import DiffusionSchedule, ddim_invert, ddim_sample, space_timesteps
from semdiff.sampling.solvers import check_inverter, check_sampler, invert_with_solver, sample_with_solver


@register_family
class DiffAE(Family):
    family_name = "diffae"
    decode_options = frozenset({"eta", "sampler", "order"})
    default_steps = {"encode_stochastic": 250, "decode": 20, "manipulate": 100, "prior": 200}

    def __init__(self, config: dict[str, Any]):
        self.net_config = DiffAEConfig(**config["network"])
        latent = config.get("latent_prior")
        self.latent_config = LatentMLPConfig(**latent) if latent else None
        super().__init__({**config, "image_size": self.net_config.image_size,
                          "has_code_stats": bool(latent) or config.get("has_code_stats", False)})
        self.encoder = SemanticEncoder(self.net_config)
        self.unet = AutoencUNet(self.net_config)
        self.latent_net = LatentMLP(self.latent_config) if self.latent_config else None
        self.num_timesteps = int(config.get("num_timesteps", 1000))
        self.schedule = DiffusionSchedule.from_name(config.get("beta_schedule", "linear"), self.num_timesteps)
        self.latent_schedule = DiffusionSchedule.from_name(config.get("latent_beta_schedule", "const0.008"), self.num_timesteps)

    @classmethod
    def default_config(cls, **network) -> dict[str, Any]:
        return {"network": DiffAEConfig(**network).to_dict()}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["network"] = self.net_config.to_dict()
        config["latent_prior"] = self.latent_config.to_dict() if self.latent_config else None
        return config

    @property
    def code_dim(self) -> int:
        return DiffAEConfig(**self.config["network"]).z_dim

    def stochastic_shape(self) -> tuple[int, ...]:
        return (self.net_config.in_channels, self.net_config.image_size, self.net_config.image_size)

    # ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        if sample:
            raise FeatureNotSupported("Diff-AE's semantic encoder is deterministic: sample=True is not available")
        return self.encoder(x)

    def _eps_model(self, z: torch.Tensor):
        return lambda x, t: self.unet(x, t, z)

    def encode_stochastic(self, x, z, *, steps, progress=False, inverter: str | None = None,
                          iterations: int | None = None, **options):
        """x_T by inversion; ``inverter`` "ddim" (official), "fixed-point" (``iterations`` passes per
        step, decode with sampler "ddim" and the same steps) or "dpmsolver++". The defaults come from
        the config keys ``default_inverter`` ("ddim") and ``inversion_iterations`` (2)."""
        inverter = inverter or self.config.get("default_inverter", "ddim")
        iterations = int(iterations or self.config.get("inversion_iterations", 2))
        if options:
            raise FeatureNotSupported(f"Diff-AE's encode_stochastic has no options {sorted(options)}; "
                                      "it takes: inverter, iterations")
        check_inverter(inverter)
        timesteps = space_timesteps(self.num_timesteps, steps, "ddim")
        if inverter == "ddim":
            return ddim_invert(self._eps_model(z), x, self.schedule, timesteps, clip_x0=True, progress=progress)
        return invert_with_solver(inverter, self._eps_model(z), x, self.schedule, timesteps, clip_x0=True,
                                  iterations=iterations, progress=progress)

    def decode(self, z, x_T, *, steps, generator=None, progress=False, eta: float = 0.0, sampler: str | None = None,
               order: int = 2, **options):
        """DDIM decode (official); ``sampler`` "dpmsolver++"/"unipc" (default: config key
        ``default_sampler``, else "ddim") runs a multistep solver of ``order`` on the same grid."""
        sampler = sampler or self.config.get("default_sampler", "ddim")
        if options:
            raise FeatureNotSupported(f"Diff-AE's decode has no options {sorted(options)}; "
                                      f"it takes: {', '.join(sorted(self.decode_options))}")
        check_sampler(sampler)
        timesteps = space_timesteps(self.num_timesteps, steps, "ddim")
        if sampler == "ddim":
            return ddim_sample(self._eps_model(z), x_T, self.schedule, timesteps, clip_x0=True, eta=eta,
                               generator=generator, progress=progress)
        return sample_with_solver(sampler, self._eps_model(z), x_T, self.schedule, timesteps, clip_x0=True,
                                  eta=eta, order=order, progress=progress)

    @property
    def has_prior(self) -> bool:
        return self.latent_net is not None

    def sample_codes(self, n, *, steps=None, generator=None, progress=False, noise: torch.Tensor | None = None,
                     clip_noise: bool = False, **options):
        if self.latent_net is None:
            return super().sample_codes(n)
        if options:
            raise FeatureNotSupported(f"Diff-AE's latent prior has no options {sorted(options)}")
        steps = steps or self.default_steps["prior"]
        param = next(self.latent_net.parameters())
        if noise is None:
            noise = torch.randn((n, self.code_dim), generator=generator, device=param.device, dtype=param.dtype)
        if clip_noise:
            noise = noise.clamp(-1, 1)
        timesteps = space_timesteps(self.num_timesteps, steps, "ddim")
        z_n = ddim_sample(self.latent_net, noise, self.latent_schedule, timesteps, clip_x0=False,
                          progress=progress, desc="prior")
        return self.denormalize_codes(z_n)
