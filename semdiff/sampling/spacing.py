"""Which original timesteps a sampler with N steps visits."""

from __future__ import annotations


def ddim_stride_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Diff-AE's ``"ddimN"`` respacing: ``range(0, T, stride)`` for the smallest integer stride
    that gives exactly N steps (N=10 -> 0,100,..,900; N=3 -> 0,334,668).

    Raises ``ValueError`` when no integer stride gives N steps (e.g. N=150 or 300 for T=1000),
    like the official ``space_timesteps``.
    """
    if steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {steps}")
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == steps:
            return list(range(0, num_timesteps, stride))
    if steps == num_timesteps:
        return list(range(num_timesteps))
    reachable = sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)})
    near = min(reachable, key=lambda n: abs(n - steps))
    raise ValueError(
        f"cannot take exactly {steps} DDIM steps out of {num_timesteps} with an integer stride "
        f"(the official 'ddim{steps}' spacing); the closest reachable count is {near}"
    )


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "ddim") -> list[int]:
    """Ascending original timesteps for an N-step sampler.

    - ``ddim``: the stride rule above (Diff-AE, LRDM DDIM).
    - ``uniform``: DiffuseVAE's ``range(0, T, T // N)`` — must give exactly N steps
      (raises ``ValueError`` otherwise, like the official code).
    - ``quad``: DiffuseVAE's ``(linspace(0, sqrt(0.8 T), N) ** 2).astype(int)``.
    """
    if spacing == "ddim":
        return ddim_stride_timesteps(num_timesteps, steps)
    if spacing == "uniform":
        if steps < 1 or steps > num_timesteps:
            raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
        c = num_timesteps // steps
        seq = list(range(0, num_timesteps, c))
        if len(seq) != steps:
            raise ValueError(
                f"uniform spacing of {steps} steps over {num_timesteps} gives {len(seq)} steps "
                f"(stride {c}); choose a count that divides {num_timesteps}"
            )
        return seq
    if spacing == "quad":
        import numpy as np

        seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(int)
        return [int(s) for s in seq]
    raise ValueError(f"unknown timestep spacing {spacing!r} (ddim, uniform, quad)")
