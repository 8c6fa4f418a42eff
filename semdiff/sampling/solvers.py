"""Fewer network passes: fast ODE solvers for decoding and a better inversion, selectable by name.

Every sampler here works on the same timestep grid as the official DDIM of the family (for Diff-AE
the ``"ddimN"`` stride grid ``t_0 < ... < t_{N-1}``) and treats ``x_T`` as the state at
``t_{N-1}``, exactly like the official decoder. So stochastic codes from any inverter can be decoded
by any sampler, and ``"ddim"`` is bit-identical to :func:`semdiff.sampling.ddim_sample` /
:func:`semdiff.sampling.ddim_invert`.

Decoding (``sample_with_solver``)

- ``"ddim"``: the official DDIM (eta = 0 unless given), one pass per step.
- ``"dpmsolver++"``: DPM-Solver++(2M) (Lu et al. 2022), diffusers' ``DPMSolverMultistepScheduler``.
- ``"unipc"``: UniPC (bh2, order 2; Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler``.

  Both run in data prediction (x0) mode: the network output is turned into ``x0_hat`` with the
  family's arithmetic (``clip_x0`` clamps it to [-1, 1], the official Diff-AE recipe) and handed to
  the scheduler with ``prediction_type="sample"``. With clipping, DDIM *is* the first-order
  DPM-Solver++ on the clipped x0 (both give ``x_s = sigma_s/sigma_t x_t + (alpha_s - sigma_s
  alpha_t/sigma_t) x0``), so all three solve the same ODE and agree as the step count grows. The
  scheduler's noise levels are overwritten from the family's float64 ``alphas_cumprod`` (diffusers
  would rebuild them in float32 from the betas), its timesteps with the family's grid, and the last
  step goes to sigma = 0 (``final_sigmas_type="zero"``), where DDIM also returns x0_hat.

Inversion (``invert_with_solver``)

- ``"ddim"``: the official DDIM inversion (eps at the current step, ``abar_N = 0``).
- ``"fixed-point"``: exact inversion *of the DDIM decoder on the same N-step grid*. DDIM inversion
  approximates eps at ``t_i`` by eps at ``t_{i-1}``; here each step solves ``D_i(x_i) = x_{i-1}``
  (``D_i`` = one DDIM decode step, clipping included) by the fixed-point iteration
  ``x <- x + sqrt(abar_i / abar_{i-1}) (x_{i-1} - D_i(x))`` from the DDIM-inversion guess
  (``iterations`` network passes per step; without clipping this is the classical fixed-point
  inversion of Pan et al. 2023 / Garibi et al. 2024). Decoding the result with ``"ddim"`` and the
  same step count reproduces the input up to the remaining residual, so a 10-step grid with 2-3
  iterations replaces the official 250-step inversion (see benchmarks/README.md for measurements).
  Its x_T is tied to that grid: decode it with the same sampler and step count.
- ``"dpmsolver++"``: diffusers' ``DPMSolverMultistepInverseScheduler`` (2M) on the same grid
  (opt-in; ``N - 1`` passes, the image taken as the state at ``t_0`` like the official inversion).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

from semdiff.sampling.ddim import ModelFn, _f32, _timestep_batch, ddim_invert, ddim_sample, predict_x0_eps
from semdiff.sampling.schedules import DiffusionSchedule
from semdiff.utils import progress_bar

SAMPLERS = ("ddim", "dpmsolver++", "unipc")
INVERTERS = ("ddim", "fixed-point", "dpmsolver++")


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def check_inverter(name: str) -> str:
    if name not in INVERTERS:
        raise ValueError(f"unknown inverter {name!r}; choose one of {', '.join(INVERTERS)}")
    return name


def _sigmas(schedule: DiffusionSchedule, timesteps_desc: Sequence[int], last: float | None) -> torch.Tensor:
    """diffusers' sigma = sqrt((1 - abar) / abar) from the float64 schedule, cast to float32 last."""
    values = [math.sqrt((1.0 - schedule.abar(t)) / schedule.abar(t)) for t in timesteps_desc]
    if last is not None:
        values.append(last)
    return torch.tensor(values, dtype=torch.float64).float()


def _make_scheduler(name: str, schedule: DiffusionSchedule, timesteps_desc: Sequence[int], order: int):
    """A diffusers multistep scheduler on our grid and our float64 noise levels."""
    import numpy as np

    common: dict[str, Any] = dict(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=np.asarray(schedule.betas, dtype=np.float64),
        prediction_type="sample",
        solver_order=order,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    with warnings.catch_warnings():
        # diffusers calls np.array on a torch tensor (a NumPy 2 DeprecationWarning, harmless)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _build_scheduler(name, schedule, timesteps_desc, common)


def _build_scheduler(name, schedule, timesteps_desc, common):
    n = len(timesteps_desc)
    if name == "dpmsolver++":
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", thresholding=False, **common)
        sched.set_timesteps(timesteps=list(timesteps_desc))
    elif name == "unipc":
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", thresholding=False, **common)
        sched.set_timesteps(num_inference_steps=n)  # resets the solver state; the grid is replaced below
        sched.timesteps = torch.tensor(list(timesteps_desc), dtype=torch.int64)
        sched.num_inference_steps = n
    else:  # pragma: no cover - guarded by check_sampler
        raise ValueError(name)
    sched.sigmas = _sigmas(schedule, timesteps_desc, 0.0)
    return sched


def sample_with_solver(
    name: str,
    model: ModelFn,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    timesteps: Sequence[int],
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
    eta: float = 0.0,
    order: int = 2,
    first_order_final: int = 2,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "decode",
) -> torch.Tensor:
    """Decode ``x_T`` (the state at ``timesteps[-1]``) to x0 with the named solver, one pass per step.

    ``timesteps`` are the ascending original timesteps of the grid (``space_timesteps``). ``eta``
    is only available for ``"ddim"``; ``order`` (1-3) and ``first_order_final`` only for the
    multistep solvers: the last ``first_order_final`` steps are first order. The official grid ends
    with t = 0 (abar = 0.9999), so the step into it spans a large log-SNR interval next to a
    short previous one; a multistep extrapolation over it amplifies the difference of the last two
    x0 estimates (measured on the analytic model: 2 halves the error at 20-200 steps).
    """
    check_sampler(name)
    if name == "ddim":
        return ddim_sample(model, x_T, schedule, timesteps, prediction=prediction, clip_x0=clip_x0, eta=eta,
                           generator=generator, progress=progress, desc=desc)
    if eta:
        raise ValueError(f"eta > 0 (stochastic sampling) is only available with sampler='ddim', not {name!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    desc_ts = list(reversed(list(timesteps)))
    sched = _make_scheduler(name, schedule, desc_ts, order)
    x = x_T
    n = len(desc_ts)
    for i, t in enumerate(progress_bar(desc_ts, total=n, enabled=progress, desc=desc)):
        if i >= n - first_order_final:
            sched.lower_order_nums = 0  # this step first order (diffusers' warm-up rule)
        output = model(x, _timestep_batch(t, x))
        x0, _ = predict_x0_eps(output, x, schedule.abar(t), prediction=prediction, clip_x0=clip_x0)
        x = sched.step(x0.float(), t, x.float()).prev_sample.to(x_T.dtype)
    return x


def _ddim_step_arith(x0: torch.Tensor, eps: torch.Tensor, abar_to: float, like: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar_to) x0 + sqrt(1 - abar_to) eps`` with the float32 casts of ddim_sample (eta = 0)."""
    a = _f32(abar_to, like)
    return x0 * a.sqrt() + (1 - a).sqrt() * eps


def fixed_point_invert(
    model: ModelFn,
    x0: torch.Tensor,
    schedule: DiffusionSchedule,
    timesteps: Sequence[int],
    *,
    iterations: int = 2,
    tol: float = 0.0,
    anderson: bool = True,
    prediction: str = "eps",
    clip_x0: bool = False,
    progress: bool = False,
    desc: str = "invert",
    stats: dict | None = None,
) -> torch.Tensor:
    """Exact inversion of the eta = 0 DDIM decoder on ``timesteps`` (see the module docstring).

    Passes: ``iterations * N`` at most; a step stops
    early when the relative residual ``|x_{i-1} - D_i(x)| / |x_{i-1}|`` of every item is below ``tol``.
    ``stats`` (a dict), if given, receives ``passes``, and per step the relative residual of the last
    evaluated iterate (``residuals``) and the passes it took (``iterations``).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations!r}")
    ts = list(timesteps)
    n = len(ts)
    abars = [schedule.abar(t) for t in ts]
    passes = 0
    residuals: list[float] = []
    used_per_step: list[int] = []
    target = x0
    # First guess of x_0: the clean image scaled (eps = 0); the first iteration adds the noise part.
    x0_hat, eps = x0, torch.zeros_like(x0)
    for i in progress_bar(range(n), total=n, enabled=progress, desc=desc):
        abar_prev = abars[i - 1] if i > 0 else 1.0
        if i > 0:
            # eps consistent with the solved state x_{i-1} and the latest x0_hat, then the DDIM guess
            eps = (target - _f32(abar_prev, target).sqrt() * x0_hat) / (1 - _f32(abar_prev, target)).sqrt()
        x = _ddim_step_arith(x0_hat, eps, abars[i], target)
        step = _f32(math.sqrt(abars[i] / abar_prev), target)
        norm = target.flatten(1).norm(dim=1).clamp_min(1e-12)
        rel = None
        x_last = r_last = None
        used = 0
        for _ in range(iterations):
            used += 1
            out = model(x, _timestep_batch(ts[i], x))
            passes += 1
            x0_hat, eps_i = predict_x0_eps(out, x, abars[i], prediction=prediction, clip_x0=clip_x0)
            decoded = _ddim_step_arith(x0_hat, eps_i, abar_prev, target)
            r = target - decoded
            rel = r.flatten(1).norm(dim=1) / norm
            if tol > 0 and bool((rel < tol).all()):
                x = x + step * r
                break
            x_next = x + step * r
            if anderson and r_last is not None:
                # Anderson acceleration, memory 1 (a secant step per item): the combination of the
                # last two iterates whose linearised residual is smallest.
                d_r = (r - r_last).flatten(1)
                gamma = (r.flatten(1) * d_r).sum(1) / (d_r * d_r).sum(1).clamp_min(1e-30)
                gamma = gamma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
                x_next = x_next - gamma * ((x - x_last) + step * (r - r_last))
            x_last, r_last = x, r
            x = x_next
        residuals.append(float(rel.max()) if rel is not None else float("nan"))
        used_per_step.append(used)
        target = x
    if stats is not None:
        stats["passes"] = passes
        stats["residuals"] = residuals
        stats["iterations"] = used_per_step
    return target


def _dpm_invert(model, x0, schedule, timesteps, *, order, prediction, clip_x0, progress, desc):
    from diffusers import DPMSolverMultistepInverseScheduler
    import numpy as np

    ts = list(timesteps)
    n = len(ts)
    if n < 2:
        raise ValueError("dpmsolver++ inversion needs at least 2 steps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sched = DPMSolverMultistepInverseScheduler(
            num_train_timesteps=schedule.num_timesteps, trained_betas=np.asarray(schedule.betas, dtype=np.float64),
            prediction_type="sample", algorithm_type="dpmsolver++", solver_order=order, lower_order_final=True,
            thresholding=False)
        sched.set_timesteps(n - 1)
    sched.timesteps = torch.tensor(ts[:-1], dtype=torch.int64)
    sched.num_inference_steps = n - 1
    sched.sigmas = _sigmas(schedule, ts, None)
    x = x0
    for t in progress_bar(ts[:-1], total=n - 1, enabled=progress, desc=desc):
        out = model(x, _timestep_batch(t, x))
        x0_hat, _ = predict_x0_eps(out, x, schedule.abar(t), prediction=prediction, clip_x0=clip_x0)
        x = sched.step(x0_hat.float(), t, x.float()).prev_sample.to(x0.dtype)
    return x


def invert_with_solver(
    name: str,
    model: ModelFn,
    x0: torch.Tensor,
    schedule: DiffusionSchedule,
    timesteps: Sequence[int],
    *,
    prediction: str = "eps",
    clip_x0: bool = False,
    iterations: int = 2,
    tol: float = 0.0,
    order: int = 2,
    progress: bool = False,
    desc: str = "invert",
) -> torch.Tensor:
    """Stochastic code x_T of a clean ``x0`` with the named inverter (see the module docstring).

    ``iterations``/``tol`` apply to ``"fixed-point"``, ``order`` to ``"dpmsolver++"``.
    """
    check_inverter(name)
    if name == "ddim":
        return ddim_invert(model, x0, schedule, timesteps, prediction=prediction, clip_x0=clip_x0,
                           progress=progress, desc=desc)
    if name == "fixed-point":
        return fixed_point_invert(model, x0, schedule, timesteps, iterations=iterations, tol=tol,
                                  prediction=prediction, clip_x0=clip_x0, progress=progress, desc=desc)
    return _dpm_invert(model, x0, schedule, timesteps, order=order, prediction=prediction, clip_x0=clip_x0,
                       progress=progress, desc=desc)


def passes(kind: str, name: str, steps: int, *, iterations: int = 2) -> int:
    """Network passes a sampler (``kind="decode"``) or inverter (``kind="invert"``) makes for N steps."""
    if kind == "decode":
        check_sampler(name)
        return steps
    check_inverter(name)
    if name == "fixed-point":
        return iterations * steps
    if name == "dpmsolver++":
        return steps - 1
    return steps
