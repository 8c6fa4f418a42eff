"""semdiff: semantic diffusion autoencoders (Diff-AE, DiffuseVAE, LRDM) behind one API."""

__version__ = "0.1.0"

from semdiff.api import SemanticAutoencoder  # noqa: E402

__all__ = ["SemanticAutoencoder", "__version__"]
