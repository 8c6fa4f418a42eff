"""DiffuseVAE (Pandey et al., TMLR 2022): a VAE's 1x1 latent z and blurry x̂, refined by a DDPM conditioned on x̂."""

from semdiff.families.diffusevae.family import DiffuseVAE
from semdiff.families.diffusevae.networks import (
    VAE,
    ArchitectureStringError,
    ConditionalUNet,
    UNetConfig,
    VAEConfig,
    parse_block_string,
    parse_channel_string,
)

__all__ = [
    "VAE",
    "ArchitectureStringError",
    "ConditionalUNet",
    "DiffuseVAE",
    "UNetConfig",
    "VAEConfig",
    "parse_block_string",
    "parse_channel_string",
]
