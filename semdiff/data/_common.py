"""Pieces shared by the built-in data sets: the labelled in-memory data set and the cache folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset


def dataset_cache_dir() -> Path:
    """Folder where rendered data sets are cached.

    ``$SEMDIFF_CACHE/datasets`` when ``SEMDIFF_CACHE`` is set, else ``$XDG_CACHE_HOME/semdiff/datasets``
    (``~/.cache/semdiff/datasets`` by default). The folder is not created here.
    """
    root = os.environ.get("SEMDIFF_CACHE")
    if root:
        return Path(root).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "semdiff" / "datasets"


@dataclass(eq=False, repr=False)
class LabelledImageDataset(Dataset):
    """Images held in memory with one label tensor per factor.

    ``images`` is float32 ``(N, 3, H, W)`` in [0, 1]; ``labels[k]`` is a tensor with first dimension N
    (int64 for categorical factors, float32 for continuous ones, bool for flags); ``label_names[k]``
    maps the integer values of categorical factor ``k`` to names. Indexing gives
    ``(image, {factor: value})``, which the default ``DataLoader`` collate turns into batches.
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    label_names: dict[str, list[str]]

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(self.images.shape)}")
        for key, value in self.labels.items():
            if value.shape[0] != n:
                raise ValueError(f"label {key!r} has {value.shape[0]} rows for {n} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[index], {key: value[index] for key, value in self.labels.items()}

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        return f"{type(self).__name__}(n={n}, image_size={h}x{w}, labels={sorted(self.labels)})"

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def label_name(self, factor: str, index: int) -> str:
        """Name of the categorical value of ``factor`` for item ``index``."""
        return self.label_names[factor][int(self.labels[factor][index])]
