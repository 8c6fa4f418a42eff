"""PNG grids with one labelled row per image set (training previews, the demo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "Arial.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def labelled_grid(rows: Sequence[tuple[str, torch.Tensor]], *, scale: int = 3, padding: int = 4,
                  label_width: int | None = None, title: str | None = None, footer: str | None = None,
                  background=(255, 255, 255)):
    """A PIL image: each row is ``(label, images (B,3,H,W) in [0, 1])``, images upscaled ``scale`` x
    (nearest neighbour, so pixels stay crisp), the label in the left margin."""
    from PIL import Image, ImageDraw

    rows = [(label, imgs.detach().float().clamp(0, 1).cpu()) for label, imgs in rows]
    if not rows:
        raise ValueError("no rows to draw")
    h = max(int(x.shape[-2]) for _, x in rows) * scale
    w = max(int(x.shape[-1]) for _, x in rows) * scale
    ncols = max(len(x) for _, x in rows)
    font = _font(max(11, min(18, h // 5)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if label_width is None:
        label_width = max(int(measure.multiline_textbbox((0, 0), label, font=font)[2]) for label, _ in rows) + 3 * padding
    title_h = (h // 3 + 2 * padding) if title else 0
    footer_h = (h // 4 + 2 * padding) if footer else 0
    width = label_width + ncols * (w + padding) + padding
    height = title_h + len(rows) * (h + padding) + padding + footer_h
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((padding, padding), title, fill=(0, 0, 0), font=_font(max(12, min(22, h // 4))))
    for r, (label, imgs) in enumerate(rows):
        y = title_h + padding + r * (h + padding)
        lines = label.split("\n")
        line_h = font.size + 2 if hasattr(font, "size") else 12
        ty = y + (h - line_h * len(lines)) // 2
        for i, line in enumerate(lines):
            draw.text((padding, ty + i * line_h), line, fill=(40, 40, 40), font=font)
        arr = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for c, a in enumerate(arr):
            tile = Image.fromarray(a).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (w + padding), y))
    if footer:
        draw.text((padding, height - footer_h + padding // 2), footer, fill=(90, 90, 90),
                  font=_font(max(10, min(14, h // 6))))
    return canvas


def save_labelled_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`labelled_grid` to ``path`` (PNG), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = labelled_grid(rows, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
