"""FFHQ face alignment: the landmark-based oriented crop that FFHQ, CelebA-HQ-style models and Diff-AE use.

    from semdiff.align import align_face
    aligned = align_face("photo.jpg", output_size=256)   # PIL image, face upright and centred
    model.encode(aligned, resize=True)

The recipe is NVlabs' ``download_ffhq.py: recreate_aligned_images`` (Diff-AE's ``align.py:
image_align``): from 68 facial landmarks take the eye centres and the outer mouth corners, then

* ``eye_to_eye = eye_right - eye_left``, ``eye_to_mouth = mouth_avg - eye_avg``;
* ``x = eye_to_eye - flipud(eye_to_mouth) * [-1, 1]``, normalised and scaled to
  ``max(2 |eye_to_eye|, 1.8 |eye_to_mouth|)``; ``y = flipud(x) * [-1, 1]``;
* centre ``c = eye_avg + 0.1 eye_to_mouth``; the crop is the quad ``c -x -y, c -x +y, c +x +y, c +x -y``;
* shrink big images, crop with a border, reflect-pad with a blurred, median-filled edge where the quad
  leaves the image, QUAD-transform to ``transform_size`` (4096) and downscale to ``output_size``.

Landmarks come from dlib's frontal face detector and 68-point shape predictor, as in the official
code. This is an optional extra: ``pip install "semdiff[align]"``, i.e. ``dlib-bin`` (prebuilt dlib
wheels, nothing to compile) and ``face-recognition-models`` (the predictor file ships inside that
package: nothing is downloaded at run time). Licence note: dlib's 68-point model was trained on the
iBUG 300-W data set, whose licence excludes commercial use. Landmarks from any other detector can be
passed as ``landmarks=`` ((68, 2) in dlib's order, or (4, 2): left eye, right eye, left and right
mouth corner), and then no detector is needed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LandmarkDetectorMissing", "align_face", "align_quad", "detect_landmarks", "image_align", "key_points"]

INSTALL_HINT = ('face alignment needs the dlib landmark detector: pip install "semdiff[align]" '
                '(or: pip install dlib-bin face-recognition-models); the 68-point landmark model ships inside '
                'face-recognition-models, nothing is downloaded at run time. Or pass landmarks= from a detector '
                'of your own.')


class LandmarkDetectorMissing(ImportError):
    """dlib or its landmark model is not installed."""


class NoFaceFound(ValueError):
    """The detector found no face in the image."""


# ---------------------------------------------------------------------------------------------
# Landmarks


def _model_file(name: str) -> Path:
    # face_recognition_models' __init__ imports pkg_resources (gone from recent setuptools): find the
    # package folder without importing it
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarkDetectorMissing(INSTALL_HINT)
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    raise LandmarkDetectorMissing(f"face-recognition-models is installed but has no models/{name}; "
                                  f"reinstall it. {INSTALL_HINT}")


_DETECTOR: Any = None


def _detector():
    global _DETECTOR
    if _DETECTOR is None:
        try:
            import dlib
        except ImportError:
            raise LandmarkDetectorMissing(INSTALL_HINT) from None
        predictor = dlib.shape_predictor(str(_model_file("shape_predictor_68_face_landmarks.dat")))
        _DETECTOR = (dlib.get_frontal_face_detector(), predictor)
    return _DETECTOR


def detector_available() -> bool:
    """Whether :func:`detect_landmarks` can run here (dlib and its landmark model are installed)."""
    try:
        _detector()
    except LandmarkDetectorMissing:
        return False
    return True


def _to_pil(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        from semdiff.images import load_image

        image = load_image(image)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    elif not isinstance(image, Image.Image):
        try:
            import torch

            if isinstance(image, torch.Tensor):
                t = image[0] if image.dim() == 4 else image
                arr = (t.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                return Image.fromarray(arr).convert("RGB")
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"expected a path, PIL image, (H,W,3) array or (3,H,W) tensor, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")


def detect_landmarks(image, *, upsample: int = 1) -> list[np.ndarray]:
    """68-point landmarks (float (68, 2), x-y pixels) of every face dlib finds, in the detector's order.

    ``upsample=1`` as in the official code (finds faces down to about 40 pixels).
    """
    detector, predictor = _detector()
    arr = np.asarray(_to_pil(image))
    faces = detector(arr, upsample)
    return [np.array([[p.x, p.y] for p in predictor(arr, rect).parts()], dtype=np.float64) for rect in faces]


def key_points(landmarks) -> np.ndarray:
    """(4, 2): left eye centre, right eye centre, left and right outer mouth corner.

    From 68 dlib points (eyes = 36..41 and 42..47, mouth corners = 48 and 54) or given directly as (4, 2).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape == (4, 2):
        return lm.copy()
    if lm.shape != (68, 2):
        raise ValueError(f"landmarks must be (68, 2) in dlib's order or (4, 2), got shape {lm.shape}")
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[48], lm[54]])


# ---------------------------------------------------------------------------------------------
# The geometric part


def align_quad(landmarks) -> tuple[np.ndarray, float]:
    """The oriented crop of the FFHQ recipe: (quad (4, 2) corners, qsize side length), in image pixels.

    The corners run top-left, bottom-left, bottom-right, top-right of the upright face.
    """
    eye_left, eye_right, mouth_left, mouth_right = key_points(landmarks)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    norm = np.hypot(*x)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("degenerate landmarks: the eyes and the mouth coincide")
    x = x / norm
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def _gaussian_filter(img: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(img, [sigma, sigma, 0]) (mode 'reflect', truncate 4)."""
    try:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(img, [sigma, sigma, 0])
    except ImportError:
        pass
    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return img.copy()
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            sl = [slice(None)] * 3
            sl[axis] = slice(i, i + out.shape[axis])
            acc += w * padded[tuple(sl)]
        out = acc
    return out.astype(img.dtype)


def image_align(img, quad: np.ndarray, qsize: float, *, output_size: int = 256, transform_size: int = 4096,
                enable_padding: bool = True):
    """Crop the quad out of a PIL image as the FFHQ recipe does: shrink, crop, pad, QUAD transform, resize."""
    from PIL import Image

    quad = np.array(quad, dtype=np.float64)
    transform_size = max(transform_size, output_size)
    # Shrink.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, Image.LANCZOS)
        quad /= shrink
        qsize /= shrink
    # Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]
    # Pad.
    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        y, x, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
                          1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]))
        blur = qsize * 0.02
        arr += (_gaussian_filter(arr, blur) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad += pad[:2]
    # Transform.
    img = img.transform((transform_size, transform_size), Image.QUAD, tuple((quad + 0.5).flatten()), Image.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.LANCZOS)
    return img


def align_face(image, output_size: int = 256, *, landmarks=None, face_index: int = 0, transform_size: int = 4096,
               enable_padding: bool = True, upsample: int = 1):
    """An FFHQ-aligned crop (PIL RGB, ``output_size`` square) of one face in ``image``.

    ``image``: a path, PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1]. Landmarks are
    detected with dlib (the ``align`` extra) unless given: (68, 2) in dlib's order or (4, 2) eyes and
    mouth corners. ``face_index`` picks among several faces in the detector's order (the official
    script keeps the first).

    Raises:
        LandmarkDetectorMissing (an ImportError): no landmarks were given and dlib is not installed;
            the message says what to install.
        NoFaceFound: the detector found no face (or fewer than ``face_index + 1``).
    """
    img = _to_pil(image)
    if landmarks is None:
        faces = detect_landmarks(img, upsample=upsample)
        if len(faces) <= face_index:
            raise NoFaceFound(f"found {len(faces)} face(s) in the image, wanted face {face_index}"
                              + ("; try upsample=2 for small faces" if not faces else ""))
        landmarks = faces[face_index]
    quad, qsize = align_quad(landmarks)
    return image_align(img, quad, qsize, output_size=output_size, transform_size=transform_size,
                       enable_padding=enable_padding)
