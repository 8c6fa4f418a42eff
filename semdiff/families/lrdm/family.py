"""LRDM / t-LRDM as a semdiff family: the official inference procedures over shared samplers.

Pipeline (images x in [-1, 1]):

    z0 = scale_factor * VQ.encode(x)                    first stage, pre-quantisation latent
    q(r | z0) = N(mean, exp(logvar))                    representation encoder (no EMA)
    features = D_r(r)                                   computed once per decode call
    z_t -> ... -> z0_hat with the x0-predicting UNet    EMA weights; DDPM (official) or DDIM
    x = VQ.decode(inverse_scale_factor * z0_hat)        decoding quantises

The semantic code of an LRDM is the representation r, flattened: ``encode`` returns the posterior
mean (``sample=True``: a reparameterised draw), ``sample_codes`` draws r ~ N(0, I) (the prior
that KL training enforces), and interpolation slerps r by default (``code_interpolation``).

t-LRDM (time-conditional representation encoder and decoder) has no single r per image: the
official ``reconstruct`` re-encodes the clean latent at every step, ``r_t = mean(q(r | z0, t))``, and
decodes ``D_r(r_t, t)``. Its code is therefore the clean first-stage latent z0 (flattened), which is
exactly what that procedure needs, and ``decode`` reproduces it step for step (``sample_r=True``:
``r_t`` drawn from the posterior at every step, the official ``sample_r``). Unconditional sampling,
which crashes in the official code, draws one r ~ N(0, I), computes ``D_r(r, t)`` at every step of a
DDIM run and returns the generated z0 as the code (``sample_codes``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from semdiff.families.base import Family, FeatureNotSupported, register_family
from semdiff.families.lrdm.first_stage import build_vq_model, downsampling_factor
from semdiff.families.lrdm.networks import RepresentationAE, RepresentationConfig, ReprCondUNet, UNetConfig
from semdiff.families.lrdm.sampling import SAMPLERS, invert_latents, lrdm_schedule, sample_latents


@register_family
class LRDM(Family):
    family_name = "lrdm"
    decode_options = frozenset({"sampler", "eta", "noise", "sample_r"})
    stochastic_interpolation = "slerp"
    #: how codes (representations) are interpolated by default; "lerp" is the official alternative
    code_interpolation = "slerp"
    default_steps = {"encode_stochastic": 100, "decode": 100, "manipulate": 100, "prior": 100}

    def __init__(self, config: dict[str, Any]):
        self.unet_config = UNetConfig.from_dict(dict(config["unet"]))
        self.repr_config = RepresentationConfig.from_dict(dict(config["representation"]))
        first = config.get("first_stage")
        # LRDM scales latents with its own buffers: record diffusers' scaling_factor as 1 so nothing applies it
        self.first_stage_config = {**dict(first), "scaling_factor": 1.0} if first else None
        factor = downsampling_factor(self.first_stage_config) if first else 1
        image_size = self.unet_config.resolution * factor
        if config.get("image_size") not in (None, image_size):
            raise ValueError(f"image_size {config['image_size']} does not match the UNet resolution "
                             f"{self.unet_config.resolution} x first-stage factor {factor} = {image_size}")
        _check_consistent(self.unet_config, self.repr_config, self.first_stage_config)
        super().__init__({**config, "image_size": image_size})
        self.unet = ReprCondUNet(self.unet_config)
        self.repr_ae = RepresentationAE(self.repr_config)
        self.first_stage = build_vq_model(self.first_stage_config) if first else None
        # z0 = scale_factor * latents, latents = inverse_scale_factor * z (two buffers, as stored officially)
        self.register_buffer("scale_factor", torch.tensor(1.0, dtype=torch.float32))
        self.register_buffer("inverse_scale_factor", torch.tensor(1.0, dtype=torch.float32))
        diffusion = dict(config.get("diffusion") or {})
        self.diffusion_config = {"beta_min": float(diffusion.get("beta_min", 0.1)),
                                 "beta_max": float(diffusion.get("beta_max", 20.0)),
                                 "num_timesteps": int(diffusion.get("num_timesteps", 1000))}
        self.schedule = lrdm_schedule(**self.diffusion_config)  # float64 on the CPU, even under meta

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["unet"] = self.unet_config.to_dict()
        config["representation"] = self.repr_config.to_dict()
        config["first_stage"] = self.first_stage_config
        config["diffusion"] = dict(self.diffusion_config)
        return config

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def time_conditional(self) -> bool:
        """True for t-LRDM (time-conditional representation encoder and decoder)."""
        return self.repr_config.time_conditional

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one first-stage latent z0 (= x_T)."""
        res = self.unet_config.resolution
        return (self.unet_config.in_channels, res, res)

    @property
    def representation_shape(self) -> tuple[int, int, int]:
        """Shape of one representation r, e.g. (64, 8, 8)."""
        return self.repr_config.latent_shape

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return self.latent_shape if self.time_conditional else self.representation_shape

    @property
    def code_dim(self) -> int:
        return math.prod(self.code_shape)

    def stochastic_shape(self) -> tuple[int, ...]:
        return self.latent_shape

    # ---- the building blocks (also the parity-test surface) -------------------------------------
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B,3,H,W) -> z0 = scale_factor * pre-quantisation latent (B,C,H/f,W/f)."""
        latents = x if self.first_stage is None else self.first_stage.encode(x).latents
        return latents * self.scale_factor

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z (B,C,h,w) -> images ``VQ.decode(inverse_scale_factor * z)`` (quantised), in [-1, 1] up to overshoot."""
        latents = z * self.inverse_scale_factor
        return latents if self.first_stage is None else self.first_stage.decode(latents).sample

    def posterior(self, z0: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(r | z0 [, t]), logvar clamped to [-30, 10]."""
        return self.repr_ae.encode(z0, t)

    def features(self, r: torch.Tensor, t: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The UNet's conditioning maps D_r(r [, t]), deep -> shallow."""
        return self.repr_ae.decode(r, t)

    def predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        return self.unet(z_t, t, features)

    # ---- the three parts ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        z0 = self.encode_latent(x)
        if self.time_conditional:
            if sample:
                raise FeatureNotSupported(
                    "t-LRDM's representation depends on the timestep, so its code is the clean latent z0 and "
                    "there is nothing to sample at encode time; use decode(..., sample_r=True) to draw r_t from "
                    "the posterior at every step (the official sample_r)"
                )
            return z0.flatten(1)
        mean, logvar = self.posterior(z0)
        if sample:
            noise = _randn(mean.shape, generator, mean)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean.flatten(1)

    def _x0_model(self, codes: torch.Tensor, *, sample_r: bool = False, generator: torch.Generator | None = None):
        """The x0 predictor ``(z_t, t) -> z0_hat`` conditioned on codes (B, code_dim)."""
        codes = codes.reshape(-1, *self.code_shape)
        if not self.time_conditional:
            if sample_r:
                raise FeatureNotSupported("sample_r is a t-LRDM option; for an LRDM, draw the code with "
                                          "encode(..., sample=True) instead")
            feats = self.features(codes)  # once per call: r does not depend on t
            return lambda z_t, t: self.unet(z_t, t, feats)

        def model(z_t, t):
            mean, logvar = self.posterior(codes, t)
            r = mean + torch.exp(0.5 * logvar) * _randn(mean.shape, generator, mean) if sample_r else mean
            return self.unet(z_t, t, self.features(r, t))

        return model

    def encode_stochastic(self, x, z, *, steps, progress=False, **options):
        """x_T by DDIM inversion (x0 predictor, eta = 0) of the clean latent, conditioned on the codes."""
        if options:
            raise FeatureNotSupported(f"LRDM's encode_stochastic takes no options {sorted(options)}")
        z0 = self.encode_latent(x)
        return invert_latents(self._x0_model(z), z0, self.schedule, steps, progress=progress)

    def decode(self, z, x_T, *, steps, generator=None, progress=False, sampler: str = "ddim", eta: float = 0.0,
               noise: torch.Tensor | None = None, sample_r: bool = False, **options):
        """Images from codes and x_T: ``sampler="ddim"`` (default, any step count, ``eta``) or ``"ddpm"``
        (the official ancestral sampler; ``steps=1000`` for parity, ``noise`` (steps, [B,] C, H, W) fixes
        its per-step noise)."""
        if options:
            raise FeatureNotSupported(f"LRDM decode has no options {sorted(options)}; it takes: "
                                      f"{', '.join(sorted(self.decode_options))}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        model = self._x0_model(z, sample_r=sample_r, generator=generator)
        z0 = sample_latents(model, x_T, self.schedule, steps, sampler=sampler, eta=eta, noise=noise,
                            generator=generator, progress=progress)
        return self.decode_latent(z0)

    @property
    def has_prior(self) -> bool:
        return True

    def sample_codes(self, n, *, steps=None, generator=None, progress=False, **options):
        """LRDM: r ~ N(0, I) (the representation prior), flattened. t-LRDM: a generated clean latent z0
        (one r ~ N(0, I) per item, ``D_r(r, t)`` at every step of a ``steps``-step DDIM run)."""
        if options:
            raise FeatureNotSupported(f"LRDM's prior has no options {sorted(options)}")
        param = next(self.unet.parameters())
        r = _randn((n, *self.representation_shape), generator, param)
        if not self.time_conditional:
            return r.flatten(1)
        x_T = _randn((n, *self.latent_shape), generator, param)

        def model(z_t, t):
            return self.unet(z_t, t, self.features(r, t))

        z0 = sample_latents(model, x_T, self.schedule, steps or self.default_steps["prior"], sampler="ddim",
                            progress=progress)
        return z0.flatten(1)


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (so CPU generators work with CUDA models), moved to ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(like)


def _check_consistent(unet: UNetConfig, rep: RepresentationConfig, first: dict | None) -> None:
    """The pieces must fit together (the official code would fail at the first forward pass)."""
    dec = rep.decoder
    levels = len(unet.ch_mult)
    if len(dec.ch_mult) != levels:
        raise ValueError(f"the representation decoder has {len(dec.ch_mult)} levels, the UNet {levels}: "
                         "it must give one feature map per UNet level")
    repr_ch = unet.repr_ch or unet.ch
    mult = unet.repr_ch_mult or unet.ch_mult
    for level in range(levels):
        have = dec.ch * dec.ch_mult[level]
        if have != repr_ch * mult[level]:
            raise ValueError(f"UNet level {level} expects {repr_ch * mult[level]} representation channels, "
                             f"the decoder gives {have}")
    if dec.resolution != unet.resolution:
        raise ValueError(f"the representation decoder's resolution {dec.resolution} differs from the UNet's "
                         f"{unet.resolution}")
    if rep.encoder.in_channels != unet.in_channels or rep.encoder.resolution != unet.resolution:
        raise ValueError("the representation encoder must read the UNet's latent (same channels and resolution)")
    if first is not None and first.get("latent_channels", unet.in_channels) != unet.in_channels:
        raise ValueError(f"the first stage has {first.get('latent_channels')} latent channels, the UNet "
                         f"{unet.in_channels}")
