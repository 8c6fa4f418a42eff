"""Interpolation between codes: linear, and spherical over flattened tensors (Diff-AE, LRDM)."""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation over the flattened tensors (Diff-AE's interpolate.ipynb).

    ``theta = arccos(<a/|a|, b/|b|>)``, ``x = (sin((1-alpha) theta) a + sin(alpha theta) b) / sin theta``.
    ``a``, ``b``: one item each; ``alpha``: (N,). Returns (N, *a.shape).
    """
    fa, fb = a.flatten(), b.flatten()
    cos = (torch.nn.functional.normalize(fa, dim=0) * torch.nn.functional.normalize(fb, dim=0)).sum()
    theta = torch.arccos(cos)
    alpha = alpha.to(fa)[:, None]
    out = (torch.sin((1 - alpha) * theta) * fa[None] + torch.sin(alpha * theta) * fb[None]) / torch.sin(theta)
    return out.view(-1, *a.shape)


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(1 - alpha) a + alpha b`` for every alpha; returns (N, *a.shape)."""
    shape = (-1,) + (1,) * a.dim()
    alpha = alpha.to(a).view(shape)
    return a[None] * (1 - alpha) + b[None] * alpha
