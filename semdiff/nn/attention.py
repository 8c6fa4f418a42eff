"""Self-attention over the pixels of a feature map, with the guided-diffusion ("legacy") QKV layout."""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from semdiff.nn.layers import conv_nd, normalization, zero_module

# ``reference`` does exactly the official arithmetic (q and k each scaled by ch^-1/4, softmax in fp32);
# ``sdpa`` uses F.scaled_dot_product_attention, which agrees to float rounding; ``auto`` (the default)
# takes SDPA on GPUs and the official einsum on CPUs, where it is both bitwise equal to SDPA in float32
# and faster (benchmarks/README.md: LRDM's 1024-token attention 21 vs 31 ms fp32, 4.6 vs 20 ms bf16).
ATTENTION_BACKENDS = ("auto", "sdpa", "reference")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Choose how attention is computed everywhere: ``"auto"`` (default), ``"sdpa"`` or ``"reference"``."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def legacy_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Attention on a packed (B, 3*H*C, T) tensor laid out per head as [q, k, v] ("QKVAttentionLegacy").

    Returns (B, H*C, T).
    """
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(batch * num_heads, ch * 3, length).split(ch, dim=1)
    if _backend == "sdpa" or (_backend == "auto" and not qkv.is_cpu):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
        return out.reshape(batch, -1, length)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(GN(x)))) over the flattened pixels; (B, C, *spatial) -> same shape.

    ``num_head_channels`` (if not -1) fixes channels per head instead of the head count.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        *,
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by {num_head_channels} per head")
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels, norm_groups, norm_eps)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = legacy_qkv_attention(self.qkv(self.norm(x)), self.num_heads)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)
