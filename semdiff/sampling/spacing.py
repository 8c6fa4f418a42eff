"""Which original timesteps a sampler with N steps visits."""

from __future__ import annotations


def _stride_timesteps(num_timesteps: int, steps: int, max_stride: int, name: str) -> list[int]:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    for stride in range(1, max_stride + 1):
        if len(range(0, num_timesteps, stride)) == steps:
            return list(range(0, num_timesteps, stride))
    reachable = sorted({len(range(0, num_timesteps, s)) for s in range(1, max_stride + 1)})
    below = max((n for n in reachable if n < steps), default=None)
    above = min((n for n in reachable if n > steps), default=None)
    near = " or ".join(str(n) for n in (below, above) if n is not None)
    raise ValueError(
        f"cannot create exactly {steps} steps with an integer stride (the official {name} spacing over "
        f"{num_timesteps} timesteps); the closest reachable counts are {near}"
    )


def ddim_stride_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Diff-AE's ``"ddimN"`` respacing: ``range(0, T, stride)`` for the smallest integer stride
    ``< T`` that gives exactly N steps (N=10 -> 0,100,..,900; N=3 -> 0,334,668).

    Raises ``ValueError`` when no integer stride gives N steps (e.g. N=150 or 300 for T=1000),
    like the official ``space_timesteps``.
    """
    return _stride_timesteps(num_timesteps, steps, num_timesteps - 1, f"'ddim{steps}'")


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "ddim") -> list[int]:
    """Ascending original timesteps for an N-step sampler.

    - ``ddim``: the stride rule above (Diff-AE, LRDM DDIM).
    - ``uniform``: DiffuseVAE's rule, the same search over strides up to T (so one step gives [0]).
    - ``quad``: DiffuseVAE's ``int(s)`` for s in ``linspace(0, sqrt(0.8 T), N) ** 2``, repeated values
      collapsed (as the official set lookup does).
    """
    if spacing == "ddim":
        return ddim_stride_timesteps(num_timesteps, steps)
    if spacing == "uniform":
        return _stride_timesteps(num_timesteps, steps, num_timesteps, "uniform")
    if spacing == "quad":
        import numpy as np

        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
            raise ValueError(f"steps must be an integer in 1..{num_timesteps}, got {steps!r}")
        seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(int)
        return sorted({int(s) for s in seq})
    raise ValueError(f"unknown timestep spacing {spacing!r} (ddim, uniform, quad)")
