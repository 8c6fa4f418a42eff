"""Diff-AE (Preechakul et al., CVPR 2022): semantic encoder, z-conditioned UNet, latent DDIM prior."""

from semdiff.families.diffae.family import DiffAE
from semdiff.families.diffae.networks import (
    AutoencUNet,
    DiffAEConfig,
    LatentMLP,
    LatentMLPConfig,
    SemanticEncoder,
)

__all__ = ["AutoencUNet", "DiffAE", "DiffAEConfig", "LatentMLP", "LatentMLPConfig", "SemanticEncoder"]
