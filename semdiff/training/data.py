"""Training data: a built-in data set or an image folder, held in memory, split train / held-out.

The split is deterministic and independent of the data set's order or size: an item is held out
when the SHA-256 of its *key* falls below ``holdout``. Keys:

- emoji: the codepoint sequence **with the skin-tone modifiers removed**, so that all skin-tone
  variants of one emoji land on the same side; the held-out emoji are designs the model never saw.
- image folders: the file's path relative to the folder.
- everything else (shapes): the item's index.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SPLITS = ("train", "test", "all")
_SKIN_TONE_CODEPOINTS = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}


@dataclass
class TrainData:
    """Images (N,3,H,W) uint8 or float in [0, 1], with optional labels and their value names."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    label_names: dict[str, list[str]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    name: str = ""
    license: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        x = self.images if index is None else self.images[index]
        return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()

    def subset(self, index: torch.Tensor) -> "TrainData":
        idx = index.tolist()
        return TrainData(
            images=self.images[index],
            labels={k: v[index] for k, v in self.labels.items()},
            label_names=dict(self.label_names),
            keys=[self.keys[i] for i in idx] if self.keys else [],
            name=self.name,
            license=self.license,
        )


def split_key_hash(key: str) -> float:
    """Position in [0, 1) of a split key: the first 32 bits of its SHA-256."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def emoji_split_key(codepoints: str) -> str:
    """``"1F44B 1F3FD"`` -> ``"1F44B"``: the skin-tone-free base of an emoji sequence."""
    return " ".join(c for c in codepoints.split() if c.upper() not in _SKIN_TONE_CODEPOINTS)


def holdout_mask(keys: list[str], holdout: float) -> torch.Tensor:
    """Bool (N,) mask of the held-out items."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    return torch.tensor([split_key_hash(k) < holdout for k in keys], dtype=torch.bool)


def select_split(data: TrainData, split: str, holdout: float) -> TrainData:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all" or holdout <= 0:
        if split == "test":
            raise ValueError("split 'test' needs holdout > 0")
        return data
    mask = holdout_mask(data.keys, holdout)
    if split == "train":
        mask = ~mask
    index = torch.nonzero(mask).flatten()
    if len(index) == 0:
        raise ValueError(f"the {split!r} split of {data.name!r} is empty (holdout={holdout}, {len(data)} items)")
    return data.subset(index)


def load_data(name: str | Path, image_size: int = 32, *, split: str = "train", holdout: float = 0.1,
              limit: int | None = None, shapes_n: int = 10_000, seed: int = 0) -> TrainData:
    """Load ``"emoji"``, ``"shapes"`` or a folder / glob of images into memory and select a split.

    ``limit`` keeps the first ``limit`` items *before* splitting (for quick tests). Folder images are
    held as uint8 to keep memory low; the built-in sets as float32.
    """
    text = str(name)
    if text == "emoji":
        from semdiff.data import load_emoji

        ds = load_emoji(image_size)
        data = TrainData(ds.images, dict(ds.labels), dict(ds.label_names),
                         [emoji_split_key(c) for c in ds.codepoints], "emoji", getattr(ds, "license", ""))
    elif text == "shapes":
        from semdiff.data import make_shapes

        n = limit if limit is not None else shapes_n
        ds = make_shapes(n, image_size, seed=seed)
        labels = {k: v for k, v in ds.labels.items() if k in ds.label_names}  # the categorical factors
        data = TrainData(ds.images, labels, dict(ds.label_names), [str(i) for i in range(n)], "shapes",
                         getattr(ds, "license", ""))
    else:
        from semdiff.data import get_dataset

        ds = get_dataset(text, image_size=image_size)
        n = len(ds) if limit is None else min(limit, len(ds))
        images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
        keys = []
        root = Path(text[len("folder:"):] if text.startswith("folder:") else text).expanduser()
        for i in range(n):
            img, path = ds[i]
            images[i] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
            p = Path(path)
            try:
                keys.append(p.relative_to(root).as_posix())
            except ValueError:
                keys.append(p.name)
        data = TrainData(images, {}, {}, keys, text, getattr(ds, "license", ""))
        limit = None
    if limit is not None:
        data = data.subset(torch.arange(min(limit, len(data))))
    if data.image_size != image_size:
        raise ValueError(f"{text} gave {data.image_size}px images, expected {image_size}")
    return select_split(data, split, holdout)


# ------------------------------------------------------------------------------------------------
# attribute targets for the linear classifier


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def attribute_targets(data: TrainData, labels: list[str] | None = None, *, min_count: int = 20,
                      max_classes: int = 16, groups: dict[str, list[str]] | None = None
                      ) -> tuple[list[str], torch.Tensor]:
    """Binary attribute names and a float (N, A) target matrix from the data set's labels.

    Categorical labels become one-hot attributes ``<label>_<value name>`` (a value named "none" is
    the absence of the attribute and gets no column), bool labels become ``<label>``. Values seen
    fewer than ``min_count`` times, and categorical labels with more than ``max_classes`` values
    (unless listed in ``labels``), are left out. ``groups``, if given, is filled with
    ``{label: [its attribute names]}`` (attributes of one label are mutually exclusive or nested).
    """
    names: list[str] = []
    columns: list[torch.Tensor] = []
    min_count = min(min_count, max(1, len(data) // 10))  # small data sets (tests) still get attributes
    chosen = labels if labels is not None else sorted(data.labels)
    for label in chosen:
        if label not in data.labels:
            raise ValueError(f"label {label!r} is not in the data set (it has {sorted(data.labels)})")
        y = data.labels[label]
        if y.dtype == torch.bool:
            if int(y.sum()) >= min_count and int((~y).sum()) >= min_count:
                names.append(_slug(label))
                columns.append(y.float())
                if groups is not None:
                    groups.setdefault(label, []).append(names[-1])
            continue
        if y.is_floating_point() or label not in data.label_names:
            continue
        values = data.label_names[label]
        if labels is None and len(values) > max_classes:
            continue
        for v, value_name in enumerate(values):
            if value_name.lower() == "none":
                continue
            col = (y == v)
            if int(col.sum()) >= min_count:
                names.append(f"{_slug(label)}_{_slug(value_name)}")
                columns.append(col.float())
                if groups is not None:
                    groups.setdefault(label, []).append(names[-1])
    if not columns:
        return [], torch.zeros(len(data), 0)
    return names, torch.stack(columns, dim=1)


def describe(data: TrainData) -> dict[str, Any]:
    return {"name": data.name, "items": len(data), "image_size": data.image_size, "labels": sorted(data.labels)}
