"""DiffuseVAE's samplers: the official respaced DDPM and DDIM, and a DDIM inversion around x̂.

Everything runs in *shifted coordinates* ``y = x - shift``: ``shift`` is x̂ in Form-2 and absent
in Form-1. Form-2's forward process ``q(x_t | x0, x̂) = N(sqrt(abar) x0 + x̂, (1 - abar) I)`` is
Form-1's in y, and so are its x0 prediction ``sqrt(1/abar)(x_t - x̂) - sqrt(1/abar - 1) eps``, its
posterior mean ``c1 x0 + c2 x_t + (1 - c2) x̂``, its DDIM mean and the final subtraction of x̂ —
the network alone sees ``y + x̂``. So one loop serves both forms.

Respacing (the official ``SpacedDiffusion``, after guided-diffusion): for the kept timesteps
t_0 < ... < t_{N-1}, ``beta_i = 1 - abar(t_i) / abar(t_{i-1})``, ``abar_i = cumprod(1 - beta)``,
and every coefficient below is recomputed from these in float64, then cast to float32 where it is
used (the official ``extract``); the network gets the original timestep t_i.

Per step i (from N-1 down to 0), with eps from the network (and guidance, see ``make_eps_fn``)::

    x0   = clamp(sqrt(1/abar_i) y - sqrt(1/abar_i - 1) eps, -1, 1)
    DDPM: y <- c1_i x0 + c2_i y + sqrt(var_i) z_i      (no noise at i = 0)
          c1 = beta sqrt(abar_prev) / (1 - abar),  c2 = sqrt(1 - beta) (1 - abar_prev) / (1 - abar)
          var: "fixedlarge" beta_i (var_0 := posterior var_1), "fixedsmall" the posterior variance
          beta (1 - abar_prev) / (1 - abar), both through exp(0.5 log var) with log var_0 clipped
    DDIM: y <- sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
          sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)

Unlike ``semdiff.sampling.ddim_sample``, the official DDIM keeps the network's eps after clipping
x0 (it does not re-derive eps from the clipped x0); with clipping active the two differ, so the
family has its own loop. The returned sample is y at the end, i.e. x with x̂ subtracted in Form-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from semdiff.sampling import DiffusionSchedule, space_timesteps
from semdiff.utils import progress_bar

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("uniform", "quad")
VARIANCES = ("fixedlarge", "fixedsmall")


def official_betas(beta_1: float = 1e-4, beta_2: float = 0.02, num_timesteps: int = 1000) -> torch.Tensor:
    """``torch.linspace(beta_1, beta_2, T).double()``: the official DDPM computes the linspace in float32
    and only then converts to float64, which moves every beta by up to 1e-9 against a float64 linspace."""
    return torch.linspace(beta_1, beta_2, num_timesteps, dtype=torch.float32, device="cpu").double()


def diffusevae_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The official ``util.space_timesteps``: ascending original timesteps for an N-step sampler.

    - ``uniform``: ``range(0, T, i)`` for the first integer stride i that gives exactly N steps
      (10 -> 0, 100, ..., 900; 30 -> stride 34); no such stride raises the official error. One
      step (stride T, which the official loop stops short of) gives [0].
    - ``quad``: ``int(s)`` for s in ``linspace(0, sqrt(0.8 T), N) ** 2`` (10 -> 0, 9, 39, ..., 800);
      repeated values (very large N) collapse, as the official set lookup does.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; DiffuseVAE has {', '.join(SPACINGS)}")
    return space_timesteps(num_timesteps, steps, spacing)


@dataclass
class RespacedTables:
    """float64 coefficient tables of the respaced process, indexed by step i (see the module doc)."""

    timesteps: list[int]
    betas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_recip: torch.Tensor
    sqrt_recipm1: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    log_var: dict[str, torch.Tensor]

    @classmethod
    def build(cls, schedule: DiffusionSchedule, timesteps: Sequence[int]) -> "RespacedTables":
        keep = set(timesteps)
        alphas_cumprod = schedule.alphas_cumprod
        last, new_betas, kept = 1.0, [], []
        for i, ac in enumerate(alphas_cumprod):  # the official loop, for its float64 rounding
            if i in keep:
                new_betas.append(torch.tensor([1 - ac / last]))
                last = ac
                kept.append(i)
        betas = torch.cat(new_betas).double()
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, dim=0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # var_0 is 0 (and for fixedlarge replaced): both clip it to var_1; a 1-step chain never adds noise.
        first = post_var[1:2] if len(kept) > 1 else post_var[:1].clamp_min(1e-20)
        return cls(
            timesteps=kept,
            betas=betas,
            alpha_bar=ab,
            alpha_bar_prev=ab_prev,
            sqrt_recip=torch.sqrt(1.0 / ab),
            sqrt_recipm1=torch.sqrt(1.0 / ab - 1),
            coef_x0=betas * torch.sqrt(ab_prev) / (1.0 - ab),
            coef_xt=torch.sqrt(alphas) * (1 - ab_prev) / (1 - ab),
            log_var={
                "fixedsmall": torch.log(torch.cat([first, post_var[1:]])),
                "fixedlarge": torch.log(torch.cat([first, betas[1:]])),
            },
        )

    def __len__(self) -> int:
        return len(self.timesteps)


def q_sample(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             shift: torch.Tensor | None = None) -> torch.Tensor:
    """The forward process at original timesteps t (B,): ``sqrt(abar_t) x0 [+ x̂] + sqrt(1 - abar_t) noise``
    (the official ``compute_noisy_input`` of Form-1, and of Form-2 with ``shift`` = x̂)."""
    abar = schedule.alphas_cumprod
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = torch.sqrt(abar)[t.cpu()].float().reshape(shape).to(x0.device)
    b = torch.sqrt(1.0 - abar)[t.cpu()].float().reshape(shape).to(x0.device)
    if shift is None:
        return x0 * a + noise * b
    return x0 * a + shift + noise * b


class _Float32Tables:
    """The tables cast to float32 once and moved to the chain's device (the official ``extract``
    casts each gathered float64 entry to float32 the same way)."""

    def __init__(self, tables: RespacedTables, device: torch.device, variance: str | None = None):
        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.float().to(device)

        self.sqrt_recip = f32(tables.sqrt_recip)
        self.sqrt_recipm1 = f32(tables.sqrt_recipm1)
        self.alpha_bar = f32(tables.alpha_bar)
        self.alpha_bar_prev = f32(tables.alpha_bar_prev)
        self.coef_x0 = f32(tables.coef_x0)
        self.coef_xt = f32(tables.coef_xt)
        self.log_var = f32(tables.log_var[variance]) if variance else None


def make_eps_fn(
    unet: Callable[..., torch.Tensor],
    cond: torch.Tensor,
    *,
    z_emb: torch.Tensor | None = None,
    z_emb_uncond: torch.Tensor | None = None,
    guidance_weight: float = 0.0,
    shift: torch.Tensor | None = None,
) -> EpsFn:
    """``eps(y, t)`` for a sampler in shifted coordinates.

    The network is called on ``y + shift`` with x̂ (``cond``) and the z embedding computed once
    per chain. With guidance weight w, ``eps = (1 + w) eps(x, x̂, z) - w eps(x, 0, 0)``; both
    branches run as one doubled batch (the unconditional one takes ``proj(0)`` as its z embedding,
    as the official code feeds zeros to ``proj``). The shift stays x̂ in both branches.
    """
    w = float(guidance_weight)
    if w != 0.0:
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        z2 = torch.cat([z_emb, z_emb_uncond]) if z_emb is not None else None

    def eps_fn(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = y if shift is None else y + shift
        if w == 0.0:
            return unet(x, t, cond, z_emb=z_emb)
        out = unet(torch.cat([x, x]), torch.cat([t, t]), cond2, z_emb=z2)
        eps_c, eps_u = out.chunk(2)
        return (1 + w) * eps_c - w * eps_u

    return eps_fn


def _noise(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def sample_chain(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    tables: RespacedTables,
    *,
    method: str = "ddim",
    shift: torch.Tensor | None = None,
    variance: str = "fixedlarge",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Run the respaced chain from the actual start ``x_T`` (at ``tables.timesteps[-1]``) to a sample.

    ``noise``: per-step z of shape (>= N, C, H, W), shared by the batch (the official
    ``ddpm_latents``, consumed first to last; also DDIM's noise when eta > 0); otherwise z is drawn
    from ``generator``.
    ``callback(k, x)`` sees the official state after k steps (x̂ still included in Form-2 until the
    last step). Returns the final sample, with x̂ subtracted in Form-2. ``clip_denoised=False`` skips
    the official clamp of x0 to [-1, 1] (what decoding an inverted x_T needs, see ``invert_chain``).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; DiffuseVAE has {', '.join(SAMPLERS)}")
    n = len(tables)
    y = x_T if shift is None else x_T - shift
    c = _Float32Tables(tables, y.device, variance if method == "ddpm" else None)
    for k, i in enumerate(progress_bar(reversed(range(n)), total=n, enabled=progress, desc=method)):
        t = torch.full((y.shape[0],), tables.timesteps[i], dtype=torch.long, device=y.device)
        eps = eps_fn(y, t)
        x0 = c.sqrt_recip[i] * y - c.sqrt_recipm1[i] * eps
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if method == "ddpm":
            mean = c.coef_x0[i] * x0 + c.coef_xt[i] * y
            if i > 0:
                z = noise[k].to(y).expand_as(y) if noise is not None else _noise(y.shape, generator, y)
                y = mean + torch.exp(0.5 * c.log_var[i]) * z
            else:
                y = mean
        else:
            ab, ab_prev = c.alpha_bar[i], c.alpha_bar_prev[i]
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            y = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
            if eta > 0 and i > 0:
                z = noise[k].to(y).expand_as(y) if noise is not None else _noise(y.shape, generator, y)
                y = y + sigma * z
        if callback is not None:
            callback(k + 1, y if (shift is None or i == 0) else y + shift)
    return y


def invert_chain(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    tables: RespacedTables,
    *,
    shift: torch.Tensor | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM inversion (not in the official code): clean image -> the x_T that the
    eta = 0 DDIM of ``sample_chain`` over the same tables maps back to it.

    Each step mirrors one decode step backwards, the network evaluated at the current state::

        k = 0:   eps = eps_fn(x0, t_0),  y_0 = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps   (from abar = 1)
        k >= 1:  eps = eps_fn(y_{k-1}, t_{k-1}),
                 x0' = clamp(sqrt(1/abar_{k-1}) y_{k-1} - sqrt(1/abar_{k-1} - 1) eps, -1, 1),
                 y_k = sqrt(abar_k) x0' + sqrt(1 - abar_k) eps

    (N network calls; exact when eps does not change between neighbouring states). In Form-2 the
    clean *state* is x0 + x̂, so y starts at the image itself. Returns the actual starting state
    at t_{N-1}, x̂ included in Form-2.

    The clamp of x0' (``clip_denoised=True``) mirrors the official decode, but where the network's x0
    leaves [-1, 1] (noisy steps of a model that is not fully trained) it destroys what the round trip
    needs: invert and decode both unclipped (the default here, and what ``reconstruct`` does) for a
    near-exact reconstruction.
    """
    n = len(tables)
    y = x0
    c = _Float32Tables(tables, y.device)
    for k in progress_bar(range(n), total=n, enabled=progress, desc="invert"):
        i = max(k - 1, 0)
        t = torch.full((y.shape[0],), tables.timesteps[i], dtype=torch.long, device=y.device)
        eps = eps_fn(y, t)
        if k > 0:
            y = c.sqrt_recip[i] * y - c.sqrt_recipm1[i] * eps
            if clip_denoised:
                y = y.clamp(-1.0, 1.0)
        ab = c.alpha_bar[k]
        y = y * torch.sqrt(ab) + torch.sqrt(1 - ab) * eps
    return y if shift is None else y + shift
