"""LRDM (Traub 2022): latent diffusion over a frozen VQ-f4 first stage, conditioned on a jointly trained
representation encoder with an N(0, I) prior; also the time-conditional t-LRDM."""

from semdiff.families.lrdm.family import LRDM
from semdiff.families.lrdm.networks import (
    DecoderConfig,
    EncoderConfig,
    RepresentationAE,
    RepresentationConfig,
    ReprCondUNet,
    UNetConfig,
)

__all__ = ["LRDM", "DecoderConfig", "EncoderConfig", "RepresentationAE", "RepresentationConfig", "ReprCondUNet",
           "UNetConfig"]
