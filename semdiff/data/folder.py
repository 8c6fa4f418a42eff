"""A data set of your own images: every image file under a folder (or matching a glob pattern)."""

from __future__ import annotations

import glob
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

LICENSE_INFO = "Your own images: whatever licence they carry applies to models trained on them."

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


class UnreadableImageError(OSError):
    """An image file that Pillow cannot decode; the message names the file."""


def list_image_files(root_or_glob: str | Path, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> list[Path]:
    """Image files under a folder (recursively) or matching a glob pattern (``**`` allowed), sorted.

    A single image file is also accepted. Extensions are compared case-insensitively.
    """
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    source = Path(root_or_glob).expanduser()
    if source.is_dir():
        candidates: Iterable[Path] = source.rglob("*")
    elif source.is_file():
        candidates = [source]
    else:
        candidates = (Path(p) for p in glob.glob(str(source), recursive=True))
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in exts)


def load_image(
    path: str | Path,
    image_size: int,
    *,
    resample: str = "bicubic",
    background: tuple[int, int, int] = (255, 255, 255),
) -> torch.Tensor:
    """Load one image as float32 ``(3, S, S)`` in [0, 1]: RGB, shorter side resized to S, centre crop.

    Transparent images are composited over ``background``; EXIF orientation is applied.

    Raises:
        UnreadableImageError: Pillow cannot decode the file.
    """
    try:
        with Image.open(path) as opened:
            # JPEG can decode at a reduced scale directly, much faster for big photos
            opened.draft("RGB", (image_size, image_size))
            im = ImageOps.exif_transpose(opened)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"cannot read image {path}: {exc}") from exc
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        # dropping alpha would expose whatever colour the transparent pixels hold (often black)
        im = Image.new("RGBA", rgba.size, (*background, 255))
        im.alpha_composite(rgba)
    im = im.convert("RGB")
    width, height = im.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    im = im.resize((new_w, new_h), _RESAMPLE[resample])
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _check_readable(path: Path) -> Exception | None:
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() misses truncated image data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return exc
    return None


class ImageFolderDataset(Dataset):
    """Every image file under a folder (recursive, sorted) or matching a glob, resized and centre-cropped.

    ``dataset[i]`` is ``(image, path)``: float32 ``(3, S, S)`` in [0, 1] and the file path as a string.
    """

    def __init__(
        self,
        root_or_glob: str | Path,
        image_size: int,
        *,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        skip_unreadable: bool = False,
        resample: str = "bicubic",
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        """
        Args:
            root_or_glob: a folder (searched recursively), a glob pattern such as ``"photos/**/*.jpg"``,
                or a single image file.
            image_size: side of the square output.
            extensions: file name endings to take, case-insensitive.
            skip_unreadable: decode every file now and leave out the ones Pillow cannot read, with a
                warning naming them (they are listed in ``.skipped``). When False, files are read lazily
                and an unreadable one raises ``UnreadableImageError`` naming it when it is indexed.
            resample: "bicubic", "bilinear" or "lanczos".
            background: RGB that transparent images are composited over.

        Raises:
            FileNotFoundError: no image file was found.
        """
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        self.root = str(root_or_glob)
        self.image_size = image_size
        self.resample = resample
        self.background = tuple(background)
        files = list_image_files(root_or_glob, extensions)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(extensions)}) found at {root_or_glob}")
        self.skipped: list[Path] = []
        if skip_unreadable:
            errors = {path: _check_readable(path) for path in files}
            self.skipped = [path for path, error in errors.items() if error is not None]
            if self.skipped:
                detail = "; ".join(f"{path}: {errors[path]}" for path in self.skipped[:10])
                more = f" (and {len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
                warnings.warn(f"skipped {len(self.skipped)} unreadable image(s): {detail}{more}", stacklevel=2)
            files = [path for path in files if errors[path] is None]
            if not files:
                raise FileNotFoundError(f"no readable image files found at {root_or_glob}")
        self.files: list[Path] = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.files[index]
        image = load_image(path, self.image_size, resample=self.resample, background=self.background)  # type: ignore[arg-type]
        return image, str(path)

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset({self.root!r}, image_size={self.image_size}, n={len(self)}, "
            f"skipped={len(self.skipped)})"
        )
