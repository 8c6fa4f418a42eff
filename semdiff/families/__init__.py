"""Model families. Each sub-package holds its networks, its sampler glue and its official-checkpoint
converter, and registers a ``Family`` subclass under its name (see ``semdiff.families.base``)."""

from semdiff.families.base import FAMILIES, Family, get_family_class

__all__ = ["FAMILIES", "Family", "get_family_class"]
