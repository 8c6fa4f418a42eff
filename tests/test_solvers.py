"""Fast samplers and inverters (semdiff.sampling.solvers) against the official DDIM.

Checks use the closed-form denoiser of Gaussian data (exact answers, no network) and the tiny
Diff-AE of the parity fixtures. Tolerances (relative L2):

- DPM-Solver++ at order 1 *is* DDIM (clipped x0 included): 1e-5.
- At 200 steps every solver is within 2.5e-2 of the exact ODE solution and DPM-Solver++ / UniPC
  within 1e-2 (second order); solvers agree with DDIM at 200 steps within 3e-2 (analytic), and
  at 50 steps within 2e-2 on the tiny model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffae_helpers import load_fixture, official_weights
from semdiff import SemanticAutoencoder
from semdiff.families.diffae import DiffAE
from semdiff.families.diffae.convert import convert_state_dict
from semdiff.sampling import DiffusionSchedule, ddim_invert, ddim_sample, space_timesteps
from semdiff.sampling.solvers import (INVERTERS, SAMPLERS, fixed_point_invert, invert_with_solver, passes,
                                      sample_with_solver)

SCHEDULE = DiffusionSchedule.from_name("linear", 1000)


class Gaussian:
    """eps*(x, t) of data N(mu, diag(s^2)) and the exact probability-flow ODE solution."""

    def __init__(self, dim: int = 768, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(dim, generator=g) - 0.5
        self.s = torch.rand(dim, generator=g) * 0.4 + 0.1
        self.abar = SCHEDULE.alphas_cumprod.float()
        self.g = g

    def __call__(self, x, t):
        a = self.abar[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def exact(self, x_T, t_T):
        a = SCHEDULE.abar(t_T)
        return self.mu + self.s * (x_T - math.sqrt(a) * self.mu) / (a * self.s**2 + 1 - a).sqrt()

    def noise(self, n=4):
        return torch.randn(n, len(self.mu), generator=self.g)

    def data(self, n=4):
        return self.mu + self.s * torch.randn(n, len(self.mu), generator=self.g)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gauss():
    return Gaussian()


@pytest.fixture(scope="module")
def tiny():
    config, state = convert_state_dict(official_weights(load_fixture()), image_size=32)
    fam = DiffAE(config)
    fam.load_state_dict(state, strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32px network: one thread is as fast, and robust to a busy machine
    yield fam.eval()
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("bad", ["euler", "DDIM", "dpm"])
def test_unknown_names_are_refused_clearly(gauss, bad):
    ts = space_timesteps(1000, 5)
    with pytest.raises(ValueError, match="unknown sampler .* choose one of ddim, dpmsolver\\+\\+, unipc"):
        sample_with_solver(bad, gauss, gauss.noise(), SCHEDULE, ts)
    with pytest.raises(ValueError, match="unknown inverter .* choose one of ddim, fixed-point, dpmsolver\\+\\+"):
        invert_with_solver(bad, gauss, gauss.data(), SCHEDULE, ts)


def test_api_validates_names_and_options(tiny):
    model = SemanticAutoencoder(tiny, progress=False)
    z = torch.randn(1, model.code_dim)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        model.decode(z, steps=2, sampler="heun")
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown inverter 'newton'"):
        model.encode_stochastic(x, z, steps=2, inverter="newton")
    with pytest.raises(ValueError, match="only available with sampler='ddim'"):
        model.decode(z, steps=2, sampler="dpmsolver++", eta=0.5)


def test_pass_counts():
    assert passes("decode", "dpmsolver++", 10) == 10
    assert passes("invert", "ddim", 250) == 250
    assert passes("invert", "fixed-point", 10, iterations=3) == 30
    assert passes("invert", "dpmsolver++", 10) == 9
    assert set(SAMPLERS) == {"ddim", "dpmsolver++", "unipc"} and "fixed-point" in INVERTERS


# ---------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("clip", [False, True])
def test_first_order_dpm_solver_is_ddim(gauss, clip):
    """Same grid, same noise levels, same (clipped) x0: the wiring into diffusers is exact."""
    ts = space_timesteps(1000, 10)
    x_T = gauss.noise()
    ddim = sample_with_solver("ddim", gauss, x_T, SCHEDULE, ts, clip_x0=clip)
    dpm1 = sample_with_solver("dpmsolver++", gauss, x_T, SCHEDULE, ts, clip_x0=clip, order=1)
    assert rel(dpm1, ddim) < 1e-5


def test_solvers_converge_to_the_exact_ode_solution(gauss):
    x_T = gauss.noise()
    err = {}
    for n in (50, 200):
        ts = space_timesteps(1000, n)
        exact = gauss.exact(x_T, ts[-1])
        for name in SAMPLERS:
            err[name, n] = rel(sample_with_solver(name, gauss, x_T, SCHEDULE, ts), exact)
    assert err["ddim", 200] < 2.5e-2
    for name in ("dpmsolver++", "unipc"):
        assert err[name, 200] < 1e-2, err
        assert err[name, 200] < err[name, 50] / 4, err  # faster than first order
        assert err[name, 200] < err["ddim", 200], err


def test_solvers_agree_with_ddim_at_high_step_counts(gauss):
    ts = space_timesteps(1000, 200)
    x_T = gauss.noise()
    ddim = sample_with_solver("ddim", gauss, x_T, SCHEDULE, ts, clip_x0=True)
    for name in ("dpmsolver++", "unipc"):
        assert rel(sample_with_solver(name, gauss, x_T, SCHEDULE, ts, clip_x0=True), ddim) < 3e-2


def test_default_decode_and_inversion_are_the_official_loops(tiny):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 64, generator=g)
    x_T = torch.randn(2, 3, 32, 32, generator=g)
    x0 = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    ts = space_timesteps(1000, 5)
    with torch.no_grad():
        ref = ddim_sample(tiny._eps_model(z), x_T, tiny.schedule, ts, clip_x0=True)
        assert torch.equal(tiny.decode(z, x_T, steps=5), ref)
        assert torch.equal(tiny.decode(z, x_T, steps=5, sampler="ddim"), ref)
        inv = ddim_invert(tiny._eps_model(z), x0, tiny.schedule, ts, clip_x0=True)
        assert torch.equal(tiny.encode_stochastic(x0, z, steps=5), inv)
        assert torch.equal(tiny.encode_stochastic(x0, z, steps=5, inverter="ddim"), inv)


def test_tiny_model_solvers_agree_with_ddim_at_high_step_counts(tiny):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 64, generator=g)
    x_T = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ddim = tiny.decode(z, x_T, steps=50)
        for name in ("dpmsolver++", "unipc"):
            out = tiny.decode(z, x_T, steps=50, sampler=name)
            assert rel(out, ddim) < 2e-2, name


# ---------------------------------------------------------------------------------------------
# inversion


def round_trip(gauss, inverter, n, **kw):
    ts = space_timesteps(1000, n)
    x0 = Gaussian().data()  # the same images every call
    x_T = invert_with_solver(inverter, gauss, x0, SCHEDULE, ts, **kw)
    return rel(sample_with_solver("ddim", gauss, x_T, SCHEDULE, ts), x0)


def test_inversion_round_trip_improves_with_steps(gauss):
    for inverter, kw in (("ddim", {}), ("fixed-point", {"iterations": 2}), ("dpmsolver++", {})):
        errors = [round_trip(gauss, inverter, n, **kw) for n in (5, 10, 20, 50)]
        assert all(b < a for a, b in zip(errors, errors[1:])), (inverter, errors)


def test_fixed_point_inversion_beats_ddim_inversion_per_step(gauss):
    for n in (10, 20):
        ddim = round_trip(gauss, "ddim", n)
        fp = [round_trip(gauss, "fixed-point", n, iterations=k) for k in (1, 2, 3)]
        assert fp[0] < ddim and fp[1] < fp[0] and fp[2] < fp[1], (n, ddim, fp)
    # and it beats the official 250-step inversion + 20-step decode with 3 x 20 = 60 passes
    x0 = Gaussian().data()
    official = sample_with_solver("ddim", gauss, invert_with_solver(
        "ddim", gauss, x0, SCHEDULE, space_timesteps(1000, 250)), SCHEDULE, space_timesteps(1000, 20))
    assert round_trip(gauss, "fixed-point", 20, iterations=2) < rel(official, x0) / 3


def test_fixed_point_reports_residuals_and_stops_early(gauss):
    ts = space_timesteps(1000, 10)
    stats = {}
    fixed_point_invert(gauss, gauss.data(), SCHEDULE, ts, iterations=6, tol=1e-3, stats=stats)
    assert len(stats["residuals"]) == 10 and stats["passes"] == sum(stats["iterations"]) < 60
    for res, used in zip(stats["residuals"], stats["iterations"]):
        assert res < 1e-3 or used == 6


def test_tiny_model_fixed_point_round_trip(tiny):
    """On a network (random weights, clipping on): the inverse of the 10-step DDIM decoder."""
    g = torch.Generator().manual_seed(2)
    x0 = (torch.rand(1, 3, 8, 8, generator=g) * 1.6 - 0.8).repeat_interleave(4, -1).repeat_interleave(4, -2)
    z = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        errs = {}
        for inverter in ("ddim", "fixed-point"):
            x_T = tiny.encode_stochastic(x0, z, steps=10, inverter=inverter, iterations=3)
            errs[inverter] = rel(tiny.decode(z, x_T, steps=10), x0)
    assert errs["fixed-point"] < 0.7 * errs["ddim"], errs


def test_config_chooses_the_default_sampler_and_inverter(tiny):
    """A model folder may choose faster defaults (config keys); converted official models keep DDIM."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, 64, generator=g)
    x_T = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        official = tiny.encode_stochastic(x0, z, steps=4), tiny.decode(z, x_T, steps=4)
        fast = tiny.encode_stochastic(x0, z, steps=4, inverter="fixed-point", iterations=1), \
            tiny.decode(z, x_T, steps=4, sampler="unipc")
        tiny.config.update(default_inverter="fixed-point", inversion_iterations=1, default_sampler="unipc")
        try:
            chosen = tiny.encode_stochastic(x0, z, steps=4), tiny.decode(z, x_T, steps=4)
            assert tiny.get_config()["default_sampler"] == "unipc"
        finally:
            for k in ("default_inverter", "inversion_iterations", "default_sampler"):
                tiny.config.pop(k)
    assert torch.equal(chosen[0], fast[0]) and torch.equal(chosen[1], fast[1])
    assert not torch.equal(chosen[0], official[0]) and not torch.equal(chosen[1], official[1])


SHIPPED = Path(__file__).resolve().parent.parent / "semdiff" / "pretrained" / "semdiff-emoji32-diffae"


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="the shipped emoji model is not there yet")
def test_shipped_model_fast_recipe_and_bf16():
    """On the trained model: the fast reconstruction (fixed-point x2 on 10 steps + DDIM 10, 31 passes)
    is at least as good as the official 250 + 20 recipe (271 passes), and bf16 stays within 40 dB
    PSNR of float32."""
    from semdiff.api import cpu_has_bf16
    from semdiff.evaluation import psnr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = SemanticAutoencoder.from_pretrained(SHIPPED, progress=False)
        g = torch.Generator().manual_seed(0)
        images = model.sample(2, steps=20, prior_steps=20, generator=g)  # in-distribution images
        z = model.encode(images)
        official = model.decode(z, model.encode_stochastic(images, z, steps=250), steps=20)
        x_T = model.encode_stochastic(images, z, steps=10, inverter="fixed-point", iterations=2)
        fast = model.decode(z, x_T, steps=10)
        assert psnr(fast, images).mean() > psnr(official, images).mean() - 0.5
        if cpu_has_bf16():
            bf16 = SemanticAutoencoder(model.family, dtype=torch.bfloat16, progress=False)
            fast16 = bf16.decode(z, bf16.encode_stochastic(images, z, steps=10, inverter="fixed-point"), steps=10)
            assert psnr(fast16, fast).mean() > 40
    finally:
        torch.set_num_threads(threads)


def test_auto_attention_is_the_official_einsum_on_cpu_and_bitwise_equal_to_sdpa():
    from semdiff.nn import attention

    qkv = torch.randn(2, 3 * 4 * 16, 64, generator=torch.Generator().manual_seed(0))
    previous = attention.get_attention_backend()
    try:
        out = {}
        for name in ("auto", "reference", "sdpa"):
            attention.set_attention_backend(name)
            out[name] = attention.legacy_qkv_attention(qkv, 4)
    finally:
        attention.set_attention_backend(previous)
    assert previous == "auto"
    assert torch.equal(out["auto"], out["reference"])
    assert torch.allclose(out["sdpa"], out["reference"], atol=1e-6, rtol=0)


def test_schedule_cumprod_is_computed_once():
    from semdiff.sampling import DiffusionSchedule

    s = DiffusionSchedule.from_name("linear", 1000)
    assert s.alphas_cumprod is s.alphas_cumprod
    assert torch.equal(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert s.abar(-1) == 1.0 and s.abar(1000) == 0.0 and s.abar(10) == float(torch.cumprod(1 - s.betas, 0)[10])
