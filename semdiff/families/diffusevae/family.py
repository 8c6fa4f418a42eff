"""DiffuseVAE as a semdiff family: a VAE gives z and x̂, a DDPM conditioned on x̂ refines it.

- encode: the VAE posterior mean mu (B, z_dim); ``sample=True`` draws ``mu + eps exp(logvar / 2)``.
- decode: ``x̂ = 2 * vae.decode(z) - 1``, then the respaced DDPM (ancestral, ``fixedlarge`` or
  ``fixedsmall``) or DDIM sampler of Form-1 or Form-2 from x_T, with guidance weight and
  temperature (see ``semdiff.families.diffusevae.sampling``); Form-2 subtracts x̂ at the end.
- encode_stochastic: DDIM inversion around x̂ (absent from the official code), the inverse of the
  eta = 0 DDIM decode with the same steps, spacing and guidance weight.
- sample_codes: z ~ N(0, I), or from the Gaussian mixture ``semdiff fit-prior`` stored (Ex-PDE).

The stochastic code x_T is the chain's *actual starting state*: in Form-2 it contains x̂, exactly
as ``encode_stochastic`` returns it. When the API draws the noise itself (``decode(z)`` without x_T,
``sample``), ``start_state`` turns it into the official start ``temperature * noise`` (Form-1) or
``x̂ + temperature * noise`` (Form-2). A given x_T is used as it is, so ``temperature`` only acts
on drawn noise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from semdiff.families.base import Family, FeatureNotSupported, register_family
from semdiff.families.diffusevae.networks import VAE, ConditionalUNet, UNetConfig, VAEConfig
from semdiff.families.diffusevae.prior import COVARIANCE_TYPES, sample_gmm
from semdiff.families.diffusevae.sampling import (
    SAMPLERS,
    SPACINGS,
    VARIANCES,
    RespacedTables,
    diffusevae_timesteps,
    invert_chain,
    make_eps_fn,
    official_betas,
    q_sample,
    sample_chain,
)
from semdiff.sampling import DiffusionSchedule

FORMS = ("form1", "form2")
DEFAULT_SCHEDULE = {"beta_1": 1e-4, "beta_2": 0.02, "num_timesteps": 1000}
PRIORS = ("normal", "gmm")


def normalize_form(form: Any) -> str:
    text = str(form).lower().replace("-", "").replace("_", "").replace(" ", "")
    text = {"1": "form1", "2": "form2"}.get(text, text)
    if text not in FORMS:
        raise ValueError(f"form must be 'form1' or 'form2', got {form!r}")
    return text


def _check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@register_family
class DiffuseVAE(Family):
    family_name = "diffusevae"
    decode_options = frozenset({"sampler", "spacing", "guidance_weight", "temperature", "variance", "ddpm_noise", "eta",
                                "clip_denoised"})
    # an inverted x_T decodes back to its image only through the unclipped chain (see invert_chain)
    inverted_decode_options = {"clip_denoised": False}
    stochastic_interpolation = "fixed"
    default_steps = {"encode_stochastic": 100, "decode": 100, "manipulate": 100, "prior": 1}

    def __init__(self, config: dict[str, Any]):
        self.vae_config = VAEConfig(**config["vae"])
        self.unet_config = UNetConfig(**config["unet"])
        if self.unet_config.use_z and self.unet_config.z_dim != self.vae_config.z_dim:
            raise ValueError(f"the UNet projects {self.unet_config.z_dim}-d codes but the VAE's z has "
                             f"{self.vae_config.z_dim} dimensions")
        down = 2 ** (len(self.unet_config.channel_mult) - 1)
        if self.vae_config.input_res % down:
            raise ValueError(f"{self.vae_config.input_res}x{self.vae_config.input_res} images do not fit a UNet that "
                             f"halves its input {len(self.unet_config.channel_mult) - 1} times")
        self.form = normalize_form(config.get("form", "form1"))
        self.schedule_config = {**DEFAULT_SCHEDULE, **(config.get("schedule") or {})}
        self.default_variance = _check_choice("variance", config.get("variance", "fixedlarge"), VARIANCES)
        self.default_sampler = _check_choice("sampler", config.get("sampler", "ddim"), SAMPLERS)
        self.default_spacing = _check_choice("spacing", config.get("spacing", "uniform"), SPACINGS)
        gmm = config.get("prior_gmm") or None
        super().__init__({**config, "image_size": self.vae_config.input_res})
        self.vae = VAE(self.vae_config)
        self.unet = ConditionalUNet(self.unet_config)
        sc = self.schedule_config
        # float64 tables on the CPU whatever the default device (the model may be built on "meta")
        self.schedule = DiffusionSchedule(official_betas(sc["beta_1"], sc["beta_2"], int(sc["num_timesteps"])))
        self.prior_gmm = None
        if gmm:
            k, d, ct = int(gmm["components"]), self.code_dim, gmm.get("covariance_type", "full")
            _check_choice("covariance_type", ct, COVARIANCE_TYPES)
            self._register_gmm(torch.full((k,), 1.0 / k), torch.zeros(k, d),
                               torch.ones(k, d) if ct == "diag" else torch.eye(d).expand(k, d, d).clone(), gmm)

    @classmethod
    def default_config(cls, *, vae: dict[str, Any], unet: dict[str, Any] | None = None, form: str = "form1",
                       **extra) -> dict[str, Any]:
        vae_cfg = VAEConfig(**vae)
        return {"vae": vae_cfg.to_dict(), "unet": UNetConfig(**(unet or {})).to_dict(), "form": normalize_form(form),
                "schedule": dict(DEFAULT_SCHEDULE), **extra}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            vae=self.vae_config.to_dict(),
            unet=self.unet_config.to_dict(),
            form=self.form,
            schedule=dict(self.schedule_config),
            variance=self.default_variance,
            sampler=self.default_sampler,
            spacing=self.default_spacing,
            prior_gmm=dict(self.prior_gmm) if self.prior_gmm else None,
        )
        return config

    @property
    def code_dim(self) -> int:
        return self.vae_config.z_dim

    def stochastic_shape(self) -> tuple[int, ...]:
        return (self.unet_config.in_channels, self.vae_config.input_res, self.vae_config.input_res)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    # ---- the VAE ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, z_dim): the posterior mean, or with ``sample=True`` a draw ``mu + eps exp(logvar / 2)``."""
        mu, logvar = self.vae.encode(x * 0.5 + 0.5)  # the VAE works in [0, 1]
        if sample:
            device = generator.device if generator is not None else mu.device
            eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype).to(mu.device)
            mu = self.vae.reparameterize(mu, logvar, eps)
        return mu.flatten(1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, z_dim), of images in [-1, 1]."""
        mu, logvar = self.vae.encode(x * 0.5 + 0.5)
        return mu.flatten(1), logvar.flatten(1)

    def vae_reconstruction(self, z: torch.Tensor) -> torch.Tensor:
        """x̂ = 2 * vae.decode(z) - 1 in [-1, 1]: the DDPM's condition (and Form-2's shift)."""
        return 2 * self.vae.decode(z) - 1

    # ---- sampler plumbing ------------------------------------------------------------------------
    def _tables(self, steps: int, spacing: str | None) -> RespacedTables:
        spacing = _check_choice("spacing", spacing or self.default_spacing, SPACINGS)
        return RespacedTables.build(self.schedule, diffusevae_timesteps(self.num_timesteps, steps, spacing))

    def _eps_fn(self, z: torch.Tensor, cond: torch.Tensor, guidance_weight: float,
                shift: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        z_emb = z_uncond = None
        if self.unet.proj is not None:  # constant along the chain: computed once
            z_emb = self.unet.z_embedding(z)
            if guidance_weight:
                z_uncond = self.unet.z_embedding(torch.zeros_like(z))
        return make_eps_fn(self.unet, cond, z_emb=z_emb, z_emb_uncond=z_uncond, guidance_weight=guidance_weight,
                           shift=shift)

    @staticmethod
    def _weight(guidance_weight: Any) -> float:
        w = float(guidance_weight)
        if w != w or abs(w) == float("inf"):
            raise ValueError(f"guidance_weight must be finite, got {guidance_weight!r}")
        return w

    # ---- the DDPM --------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """The forward process ``q(x_t | x0[, x̂])`` at original timesteps t; Form-2 needs z (for x̂)."""
        if self.form == "form2":
            if z is None:
                raise ValueError("Form-2's forward process is shifted by x̂: pass z")
            return q_sample(self.schedule, x0, t, noise, self.vae_reconstruction(z))
        return q_sample(self.schedule, x0, t, noise)

    def start_state(self, z: torch.Tensor, noise: torch.Tensor, /, *, temperature: float = 1.0,
                    cond: torch.Tensor | None = None, **options) -> torch.Tensor:
        """The official x_T from N(0, I) noise: ``temperature * noise`` (+ x̂ = VAE(z) in Form-2)."""
        x_T = noise * float(temperature)
        if self.form != "form2":
            return x_T
        return (self.vae_reconstruction(z) if cond is None else cond) + x_T

    def decode(
        self,
        z: torch.Tensor,
        x_T: torch.Tensor,
        *,
        steps: int,
        generator: torch.Generator | None = None,
        progress: bool = False,
        sampler: str | None = None,
        spacing: str | None = None,
        guidance_weight: float = 0.0,
        temperature: float = 1.0,
        variance: str | None = None,
        ddpm_noise: torch.Tensor | None = None,
        eta: float = 0.0,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        clip_denoised: bool = True,
        **options,
    ) -> torch.Tensor:
        """Images in [-1, 1] from codes z (B, z_dim) and starting states x_T (B, 3, H, W).

        ``sampler``: "ddim" (default of the config, deterministic with eta = 0) or "ddpm" (ancestral,
        ``variance`` "fixedlarge"/"fixedsmall", default from the config); ``spacing``: "uniform" or
        "quad"; ``guidance_weight`` w: ``(1 + w) eps(x̂, z) - w eps(0, 0)``; ``temperature`` scales
        drawn noise (not a given x_T); ``ddpm_noise``: the per-step noise of the sampler, shape
        (steps, 3, H, W), shared by the batch (the official ``ddpm_latents``; unused by an eta = 0
        DDIM, which draws none); ``eta``: DDIM's stochasticity. ``callback(k, x)`` (family level
        only) sees the official state after k steps. ``clip_denoised`` (default: the official clamp
        of x0 to [-1, 1]); ``False`` to decode an x_T from ``encode_stochastic`` exactly.
        """
        if options:
            raise FeatureNotSupported(f"DiffuseVAE's decode has no option(s) {sorted(options)}; it takes: "
                                      f"{', '.join(sorted(self.decode_options))}")
        sampler = _check_choice("sampler", sampler or self.default_sampler, SAMPLERS)
        w = self._weight(guidance_weight)
        temperature = float(temperature)
        if not temperature >= 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        eta = float(eta)
        if sampler == "ddim":
            if variance is not None:
                raise ValueError("variance applies to the ancestral sampler (sampler='ddpm'); DDIM's noise is set by eta")
            if not 0 <= eta:
                raise ValueError(f"eta must be >= 0, got {eta}")
        else:
            if eta != 0.0:
                raise ValueError("eta applies to the DDIM sampler; the ancestral sampler's noise is set by variance")
            variance = _check_choice("variance", variance or self.default_variance, VARIANCES)
        tables = self._tables(steps, spacing)
        if ddpm_noise is not None:
            ddpm_noise = self._check_ddpm_noise(ddpm_noise, steps, len(tables), x_T)
        cond = self.vae_reconstruction(z)
        shift = cond if self.form == "form2" else None
        eps_fn = self._eps_fn(z, cond, w, shift)
        return sample_chain(eps_fn, x_T, tables, method=sampler, shift=shift, variance=variance or "fixedlarge",
                            eta=eta, noise=ddpm_noise, generator=generator, callback=callback, progress=progress,
                            clip_denoised=bool(clip_denoised))

    def _check_ddpm_noise(self, noise: Any, steps: int, used: int, x_T: torch.Tensor) -> torch.Tensor:
        shape = self.stochastic_shape()
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"ddpm_noise must be a tensor of shape ({steps}, {', '.join(map(str, shape))})")
        if noise.dim() != 4 or tuple(noise.shape[1:]) != shape or noise.shape[0] != steps:
            raise ValueError(f"ddpm_noise must have shape ({steps}, {', '.join(map(str, shape))}) — one noise image "
                             f"per step, shared by the batch as in the official code — got {tuple(noise.shape)}")
        if not torch.isfinite(noise).all():
            raise ValueError("ddpm_noise contains NaN or infinite values")
        return noise[:used].to(device=x_T.device, dtype=torch.float32)

    def encode_stochastic(self, x: torch.Tensor, z: torch.Tensor, *, steps: int, progress: bool = False,
                          sampler: str | None = None, spacing: str | None = None, guidance_weight: float = 0.0,
                          eta: float = 0.0, clip_denoised: bool = False, **options) -> torch.Tensor:
        """x_T (the actual start state; x̂ included in Form-2) by DDIM inversion around x̂ = VAE(z).

        ``decode(z, x_T, steps=steps, sampler="ddim", spacing=..., guidance_weight=..., clip_denoised=False)``
        maps it back to (approximately) x; ``reconstruct``/``interpolate``/``manipulate`` do that. Only
        the deterministic DDIM (eta = 0) can be inverted.
        """
        if options:
            raise FeatureNotSupported(
                f"DiffuseVAE's encode_stochastic has no option(s) {sorted(options)}; it takes: sampler ('ddim'), "
                "spacing, guidance_weight, clip_denoised (temperature, variance and ddpm_noise only concern drawn starts)")
        if (sampler or "ddim") != "ddim":
            raise FeatureNotSupported("only the deterministic DDIM sampler can be inverted; the ancestral (ddpm) "
                                      "sampler adds fresh noise at every step")
        if float(eta) != 0.0:
            raise FeatureNotSupported("DDIM with eta > 0 is stochastic and cannot be inverted; use eta=0")
        w = self._weight(guidance_weight)
        tables = self._tables(steps, spacing)
        cond = self.vae_reconstruction(z)
        shift = cond if self.form == "form2" else None
        return invert_chain(self._eps_fn(z, cond, w, shift), x, tables, shift=shift, progress=progress,
                            clip_denoised=bool(clip_denoised))

    # ---- prior -----------------------------------------------------------------------------------
    @property
    def has_prior(self) -> bool:
        return True

    @property
    def available_priors(self) -> list[str]:
        return ["normal", "gmm"] if self.prior_gmm else ["normal"]

    @property
    def default_prior(self) -> str:
        """What ``sample_codes`` draws from without ``prior``: the fitted mixture when one is stored."""
        return "gmm" if self.prior_gmm else "normal"

    def sample_codes(self, n: int, *, steps: int | None = None, generator: torch.Generator | None = None,
                     progress: bool = False, prior: str | None = None, **options) -> torch.Tensor:
        """z (n, z_dim) from N(0, I) (``prior="normal"``) or the fitted mixture (``"gmm"``, the default
        when one is stored)."""
        if options:
            raise FeatureNotSupported(f"DiffuseVAE's prior has no option(s) {sorted(options)}; it takes: prior")
        prior = prior or self.default_prior
        _check_choice("prior", prior, PRIORS)
        device = self.vae.enc.mu.weight.device
        if prior == "gmm":
            if not self.prior_gmm:
                raise FeatureNotSupported("this model has no Gaussian-mixture prior; fit one with "
                                          "`semdiff fit-prior MODEL_DIR IMAGES` or use prior='normal'")
            return sample_gmm(self.prior_gmm_weights, self.prior_gmm_means, self.prior_gmm_covs,
                              self.prior_gmm["covariance_type"], n, generator=generator).to(device)
        gen_device = generator.device if generator is not None else device
        return torch.randn((n, self.code_dim), generator=generator, device=gen_device).to(device)

    def _register_gmm(self, weights, means, covs, info: dict[str, Any]) -> None:
        for name, value in (("prior_gmm_weights", weights), ("prior_gmm_means", means), ("prior_gmm_covs", covs)):
            if name in self._buffers:
                self._buffers[name] = value
            else:
                self.register_buffer(name, value)
        self.prior_gmm = {**info, "components": int(weights.shape[0])}

    def set_prior_gmm(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, *,
                      covariance_type: str = "full", **info) -> None:
        """Store a fitted mixture (weights (K,), means (K, D), covariances (K, D, D) or (K, D))."""
        _check_choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        k, d = means.shape
        want = (k, d, d) if covariance_type == "full" else (k, d)
        if d != self.code_dim or weights.shape != (k,) or tuple(covariances.shape) != want:
            raise ValueError(f"a {covariance_type} mixture on {self.code_dim}-d codes needs weights ({k},), means "
                             f"({k}, {self.code_dim}), covariances {want}; got {tuple(weights.shape)}, "
                             f"{tuple(means.shape)}, {tuple(covariances.shape)}")
        device = self.vae.enc.mu.weight.device
        self._register_gmm(weights.detach().float().to(device), means.detach().float().to(device),
                           covariances.detach().float().to(device), {"covariance_type": covariance_type, **info})
        self.config["prior_gmm"] = dict(self.prior_gmm)
