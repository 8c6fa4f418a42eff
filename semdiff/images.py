"""Turning what users pass (PIL images, paths, tensors, arrays) into model input, and back.

Nothing is silently altered: an image of the wrong size is refused unless ``resize=True`` is given
(then it is resized on its shorter side and centre-cropped, the official preprocessing), a non-RGB
PIL image is refused with the conversion to apply, and tensors must be float in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageInputError(ValueError):
    """An input image has the wrong type, size, mode, range or values."""


def load_image(path: str | os.PathLike):
    """Open an image file with Pillow, fully decoded; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"cannot read image {path}: {err}") from None


def resize_center_crop(img, size: int):
    """Resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop to size x size."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _pil_to_tensor(img, index: int, size: int, resize: bool, name: str) -> torch.Tensor:
    if img.mode != "RGB":
        hint = "img.convert('RGB')" if img.mode in ("L", "P", "CMYK", "YCbCr", "I", "I;16", "F") else \
            "img.convert('RGB') (this drops the alpha channel; composite it on a background first if it matters)"
        raise ImageInputError(f"{name} has mode {img.mode}, the model needs RGB: use {hint}")
    if img.size != (size, size):
        if not resize:
            raise ImageInputError(
                f"{name} is {img.size[0]}x{img.size[1]}, the model expects {size}x{size}; "
                "pass resize=True to resize and centre-crop it (the official preprocessing)"
            )
        img = resize_center_crop(img, size)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, 3).permute(2, 0, 1).float() / 255.0


def _check_tensor(x: torch.Tensor, size: int, channels: int, resize: bool) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ImageInputError(f"image tensors must be (B,{channels},H,W) or ({channels},H,W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ImageInputError(
            f"image tensors must be float in [0, 1], got dtype {x.dtype}"
            + (" (divide uint8 images by 255)" if x.dtype == torch.uint8 else "")
        )
    if x.shape[1] != channels:
        hint = " (channels-last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == channels else ""
        raise ImageInputError(f"image tensors need {channels} channels in dim 1, got shape {tuple(x.shape)}{hint}")
    if not torch.isfinite(x).all():
        raise ImageInputError("image tensor contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        hint = " (it looks like [-1, 1]: pass (x + 1) / 2)" if lo >= -1 - 1e-4 and hi <= 1 + 1e-4 else ""
        raise ImageInputError(f"image tensor values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")
    if x.shape[-2:] != (size, size):
        if not resize:
            raise ImageInputError(
                f"image tensor is {x.shape[-1]}x{x.shape[-2]}, the model expects {size}x{size}; "
                "pass resize=True to resize and centre-crop"
            )
        import torch.nn.functional as F

        s = size / min(x.shape[-2:])
        x = F.interpolate(x.float(), scale_factor=s, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x.float()


def to_model_input(images: Any, size: int, *, channels: int = 3, resize: bool = False) -> torch.Tensor:
    """Images -> float tensor (B, 3, size, size) in [0, 1] on the CPU.

    Accepts a PIL image, a path, a float tensor (B,3,H,W) or (3,H,W) in [0, 1], a numpy array
    (H,W,3) / (B,H,W,3) float in [0, 1] or uint8, or a list of PIL images and paths.
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        return _check_tensor(images, size, channels, resize)
    if type(images).__module__ == "numpy":
        import numpy as np

        arr = np.asarray(images)
        if arr.dtype == np.uint8:
            arr = arr.astype("float32") / 255.0
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if t.dim() in (3, 4) and t.shape[-1] == channels:
            t = t.movedim(-1, -3)
        return _check_tensor(t, size, channels, resize)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ImageInputError(f"expected images (PIL, paths, tensors or a non-empty list of them), got {type(images).__name__}")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            name = f"image {item}"
            item = load_image(item)
        elif isinstance(item, Image.Image):
            name = f"image {i}"
        elif isinstance(item, torch.Tensor):
            out.append(_check_tensor(item, size, channels, resize))
            continue
        else:
            raise ImageInputError(f"image {i} is a {type(item).__name__}; expected a PIL image, a path or a tensor")
        out.append(_pil_to_tensor(item, i, size, resize, name)[None])
    return torch.cat(out)


def to_output(x01: torch.Tensor, output_type: str):
    """Float images in [0, 1] (B,3,H,W) -> ``"pt"`` tensor, ``"np"`` (B,H,W,3) array or ``"pil"`` list."""
    x01 = x01.detach().float().clamp(0, 1).cpu()
    if output_type == "pt":
        return x01
    if output_type == "np":
        return x01.permute(0, 2, 3, 1).numpy()
    if output_type == "pil":
        from PIL import Image

        arr = (x01 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]
    raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (B,3,H,W) images in [0, 1] into one (3, H', W') image, ``nrow`` images per row."""
    b, c, h, w = images.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[:, padding + r * (h + padding): padding + r * (h + padding) + h,
             padding + q * (w + padding): padding + q * (w + padding) + w] = images[i]
    return grid


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save a (3,H,W) tensor in [0, 1] as PNG (or whatever the suffix says)."""
    path = Path(path)
    from PIL import Image

    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"cannot save an image to {str(path)!r}: the file name needs an image suffix "
                         "such as .png or .jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    to_output(image[None], "pil")[0].save(path)
    return path
