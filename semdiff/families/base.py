"""The contract between the public API and a model family.

A family is an ``nn.Module`` that works on tensors only: images in [-1, 1], codes as tensors. The
public ``SemanticAutoencoder`` does everything else (image I/O, validation, batching, dtypes,
output types), so that where families differ, the difference lives here and not in ``if family``
branches of the API.

Every family may carry a linear attribute classifier on *normalised* codes
(``(z - codes_mean) / codes_std``, the official Diff-AE recipe); editing and ``fit-attributes``
work through it for all families alike.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

FAMILIES: dict[str, type["Family"]] = {}


class FeatureNotSupported(ValueError):
    """A family was asked for something it does not have (a prior, a classifier, an option)."""


def register_family(cls: type["Family"]) -> type["Family"]:
    FAMILIES[cls.family_name] = cls
    return cls


def get_family_class(name: str) -> type["Family"]:
    if name not in FAMILIES:
        # families register on import; import them lazily so the API module stays light
        import importlib

        try:
            importlib.import_module(f"semdiff.families.{name}")
        except ModuleNotFoundError:
            pass
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES) or ['diffae', 'diffusevae', 'lrdm']}")
    return FAMILIES[name]


class Family(nn.Module):
    """Base class of the families. Subclasses set ``family_name`` and implement the methods below."""

    family_name: ClassVar[str] = ""
    #: options ``decode`` accepts beyond (z, x_T, steps, generator, progress)
    decode_options: ClassVar[frozenset[str]] = frozenset()
    #: decode options for x_T that came from ``encode_stochastic`` (``reconstruct``, ``interpolate``,
    #: ``manipulate`` use them; the caller's options win)
    inverted_decode_options: ClassVar[dict[str, Any]] = {}
    #: how ``interpolate`` blends stochastic codes: "slerp" or "fixed" (x_T held fixed)
    stochastic_interpolation: ClassVar[str] = "slerp"
    #: how ``interpolate`` blends semantic codes by default: "lerp" or "slerp"
    code_interpolation: ClassVar[str] = "lerp"
    #: the family's own default step counts
    default_steps: ClassVar[dict[str, int]] = {"encode_stochastic": 250, "decode": 20, "manipulate": 100, "prior": 200}

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        attributes = list(self.config.get("attributes") or [])
        self.attribute_names: list[str] = attributes
        if attributes:
            self.classifier: nn.Linear | None = nn.Linear(self.code_dim, len(attributes))
        else:
            self.classifier = None
        if self.config.get("has_code_stats") or attributes:
            self.register_buffer("codes_mean", torch.zeros(1, self.code_dim))
            self.register_buffer("codes_std", torch.ones(1, self.code_dim))
        else:
            self.codes_mean = None
            self.codes_std = None

    # ---- what the API needs to know ---------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def code_dim(self) -> int:
        raise NotImplementedError

    def stochastic_shape(self) -> tuple[int, ...]:
        """Shape of one item's stochastic code x_T."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config = dict(self.config)
        config["family"] = self.family_name
        config["attributes"] = list(self.attribute_names)
        config["has_code_stats"] = self.codes_mean is not None
        return config

    # ---- the three parts ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Semantic code of images in [-1, 1]."""
        raise NotImplementedError

    def encode_stochastic(self, x: torch.Tensor, z: torch.Tensor, *, steps: int, progress: bool = False, **options) -> torch.Tensor:
        raise FeatureNotSupported(f"{self.family_name} has no stochastic encoder")

    def decode(
        self,
        z: torch.Tensor,
        x_T: torch.Tensor,
        *,
        steps: int,
        generator: torch.Generator | None = None,
        progress: bool = False,
        **options,
    ) -> torch.Tensor:
        """Images in [-1, 1] from codes and stochastic codes."""
        raise NotImplementedError

    @property
    def has_prior(self) -> bool:
        return False

    def sample_codes(self, n: int, *, steps: int | None = None, generator: torch.Generator | None = None,
                     progress: bool = False, **options) -> torch.Tensor:
        raise FeatureNotSupported(f"this {self.family_name} model has no representation prior to sample codes from")

    def random_stochastic(self, n: int, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
        """N(0, I) noise of the stochastic code's shape for n items."""
        return torch.randn((n, *self.stochastic_shape()), generator=generator, device=device, dtype=dtype)

    def start_state(self, z: torch.Tensor, noise: torch.Tensor, /, **options) -> torch.Tensor:
        """The chain's starting state x_T for N(0, I) ``noise`` that the API drew because no x_T was
        given (``options`` are decode's). It is the noise itself unless a family says otherwise."""
        return noise

    def interpolate_codes(self, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor,
                          mode: str | None = None) -> torch.Tensor:
        """Codes between ``a`` and ``b`` (one each) for every alpha in (N,): (N, code_dim)."""
        from semdiff.interpolation import lerp, slerp

        mode = mode or self.code_interpolation
        if mode == "slerp":
            return slerp(a, b, alpha)
        if mode == "lerp":
            return lerp(a, b, alpha)
        raise ValueError(f"mode must be 'slerp' or 'lerp', got {mode!r}")

    # ---- attribute classifier on normalised codes ------------------------------------------------
    def normalize_codes(self, z: torch.Tensor) -> torch.Tensor:
        if self.codes_mean is None:
            return z
        return (z - self.codes_mean) / self.codes_std

    def denormalize_codes(self, z: torch.Tensor) -> torch.Tensor:
        if self.codes_mean is None:
            return z
        return z * self.codes_std + self.codes_mean

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Attribute logits (B, num_attributes) of raw codes."""
        if self.classifier is None:
            raise FeatureNotSupported("this model has no attribute classifier (see `semdiff fit-attributes`)")
        return self.classifier(self.normalize_codes(z))

    def attribute_direction(self, name: str) -> torch.Tensor:
        """Unit direction (code_dim,) of an attribute in the normalised code space."""
        if self.classifier is None:
            raise FeatureNotSupported("this model has no attribute classifier (see `semdiff fit-attributes`)")
        if name not in self.attribute_names:
            import difflib

            close = difflib.get_close_matches(name, self.attribute_names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(self.attribute_names)}"
            raise KeyError(f"unknown attribute {name!r}{hint}")
        w = self.classifier.weight[self.attribute_names.index(name)]
        return w / w.norm()

    def attribute_label_of(self, name: str) -> str:
        """The label an attribute was made from (one-hot siblings such as ``skin_tone_dark`` share
        ``skin_tone``); the attribute's own name when it stands alone."""
        for label, names in (self.config.get("attribute_groups") or {}).items():
            if name in names:
                return label
        return name

    def resolve_keep(self, scales: dict[str, float], keep: str | list[str] | None) -> list[str]:
        """``keep="others"``: every known attribute of another label than the edited ones."""
        if keep is None:
            return []
        if isinstance(keep, str):
            if keep != "others":
                return [keep]
            edited = {self.attribute_label_of(name) for name in scales}
            return [n for n in self.attribute_names if self.attribute_label_of(n) not in edited]
        return list(keep)

    def edit_codes(self, z: torch.Tensor, scales: dict[str, float], *,
                   keep: str | list[str] | None = None) -> torch.Tensor:
        """``z_n + sum_a s_a * sqrt(d) * w_a / |w_a|`` in the normalised space (Diff-AE's recipe).

        ``keep`` names attributes whose classifier outputs should not move (or ``"others"``: all those
        of other labels): each edit direction is projected orthogonal to their weight vectors. A
        direction that the projection nearly cancels is reported with a warning.
        """
        zn = self.normalize_codes(z)
        delta = torch.zeros_like(zn[0])
        keep = self.resolve_keep(scales, keep)
        keep_dirs = [self.attribute_direction(k) for k in keep if k not in scales]
        basis = None
        if keep_dirs:
            basis, _ = torch.linalg.qr(torch.stack(keep_dirs, dim=1))  # (d, k) orthonormal
        for name, scale in scales.items():
            d = self.attribute_direction(name).to(zn)
            if basis is not None:
                b = basis.to(zn)
                d = d - b @ (b.T @ d)
                left = float(d.norm())
                if left < 0.2:
                    warnings.warn(f"keeping {len(keep_dirs)} attributes leaves only {left:.0%} of the direction of "
                                  f"{name!r}: the edit is mostly along directions it was asked to keep; keep fewer "
                                  "attributes or raise the scale", stacklevel=3)
                d = d / d.norm().clamp_min(1e-12)
            delta = delta + scale * math.sqrt(self.code_dim) * d
        return self.denormalize_codes(zn + delta)
