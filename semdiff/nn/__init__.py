"""Building blocks shared by every family: embeddings, normalisation, attention, convolutions."""

from semdiff.nn.attention import AttentionBlock, legacy_qkv_attention
from semdiff.nn.embeddings import timestep_embedding
from semdiff.nn.layers import GroupNorm32, conv_nd, normalization, zero_module

__all__ = [
    "AttentionBlock",
    "GroupNorm32",
    "conv_nd",
    "legacy_qkv_attention",
    "normalization",
    "timestep_embedding",
    "zero_module",
]
