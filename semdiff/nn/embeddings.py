"""Sinusoidal timestep embeddings."""

from __future__ import annotations

import math

import torch


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    order: str = "cos_sin",
    freq_shift: float = 0.0,
) -> torch.Tensor:
    """Embed integer (or real) timesteps ``t`` of shape (B,) into (B, dim).

    ``freqs_i = exp(-ln(max_period) * i / (half - freq_shift))`` for ``i < half = dim // 2`` and the
    embedding is ``[cos(t*freqs), sin(t*freqs)]`` (``order="cos_sin"``: Diff-AE, guided-diffusion,
    DiffuseVAE) or ``[sin, cos]`` (``order="sin_cos"``: LRDM uses this with ``freq_shift=1``).
    An odd ``dim`` gets one zero column at the end, as in the official code.
    """
    if order not in ("cos_sin", "sin_cos"):
        raise ValueError(f"order must be 'cos_sin' or 'sin_cos', got {order!r}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    if order == "sin_cos":
        parts.reverse()
    embedding = torch.cat(parts, dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
