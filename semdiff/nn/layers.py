"""Small layers with the exact numerics of the guided-diffusion code base that all three families use."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        # Under autocast the weight may be fp32 while x is bf16: normalise in fp32 explicitly.
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def normalization(channels: int, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    """GroupNorm with ``min(groups, channels)`` groups, the official ``normalization()``."""
    return GroupNorm32(min(groups, channels), channels, eps=eps)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D convolution."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (output convolutions start as the identity of the residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module
