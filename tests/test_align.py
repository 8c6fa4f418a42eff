"""semdiff.align: the FFHQ crop geometry (always) and the dlib landmark detector (when installed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

import semdiff.align as align
from semdiff.align import (
    LandmarkDetectorMissing,
    NoFaceFound,
    align_face,
    align_quad,
    detector_available,
    key_points,
)

# an upright face: eyes at y=50, mouth corners at y=75
UPRIGHT = np.array([[40.0, 50.0], [60.0, 50.0], [42.0, 75.0], [58.0, 75.0]])


def _rotate_points(points: np.ndarray, degrees: float, centre) -> np.ndarray:
    """Where PIL's ``Image.rotate(degrees)`` (counter-clockwise on screen) moves pixel positions."""
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # y points down
    return (points - centre) @ rot.T + centre


def test_quad_of_an_upright_face():
    quad, qsize = align_quad(UPRIGHT)
    # x = e2e - flipud(e2m) * [-1, 1] = (45, 0), scaled to max(2 * 20, 1.8 * 25) = 45; c = (50, 52.5)
    np.testing.assert_allclose(quad, [[5, 7.5], [5, 97.5], [95, 97.5], [95, 7.5]])
    assert qsize == pytest.approx(90)
    # wide-set eyes: the side is 2 |e2e| * 2
    wide = UPRIGHT.copy()
    wide[:, 0] = [20, 80, 45, 55]
    assert align_quad(wide)[1] == pytest.approx(4 * 60)


@pytest.mark.parametrize("degrees", [-40.0, 17.0, 90.0])
def test_quad_rotates_with_the_face(degrees):
    centre = np.array([123.0, 77.0])
    quad, qsize = align_quad(UPRIGHT)
    rquad, rqsize = align_quad(_rotate_points(UPRIGHT, degrees, centre))
    np.testing.assert_allclose(rquad, _rotate_points(quad, degrees, centre), atol=1e-9)
    assert rqsize == pytest.approx(qsize)


def test_key_points_from_68_landmarks():
    lm = np.zeros((68, 2))
    lm[36:42] = [10, 20]
    lm[42:48] = [30, 20]
    lm[48], lm[54] = [12, 40], [28, 40]
    np.testing.assert_allclose(key_points(lm), [[10, 20], [30, 20], [12, 40], [28, 40]])
    with pytest.raises(ValueError, match="68, 2"):
        key_points(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        align_quad(np.zeros((4, 2)))


def _drawn_face(degrees: float) -> tuple[Image.Image, np.ndarray]:
    """A 200 px canvas with black eye disks, a red mouth and a blue forehead mark, rotated."""
    img = Image.new("RGB", (200, 200), (230, 200, 170))
    d = ImageDraw.Draw(img)
    eyes = UPRIGHT + [50, 40]  # (90, 90), (110, 90); mouth corners (92, 115), (108, 115)
    for x, y in eyes[:2]:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(0, 0, 0))
    d.rectangle([92, 113, 108, 117], fill=(220, 0, 0))
    d.ellipse([97, 70, 103, 76], fill=(0, 0, 255))
    return img.rotate(degrees, resample=Image.BICUBIC, fillcolor=(230, 200, 170)), \
        _rotate_points(eyes, degrees, np.array([100.0, 100.0]))


def _blob(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_rotated_drawn_face_comes_out_upright():
    size = 64
    upright, lm0 = _drawn_face(0)
    ref = np.asarray(align_face(upright, size, landmarks=lm0, transform_size=256), dtype=np.float64)
    tilted, lm = _drawn_face(33)
    out = np.asarray(align_face(tilted, size, landmarks=lm, transform_size=256), dtype=np.float64)
    assert out.shape == (size, size, 3)
    assert np.abs(out - ref).mean() < 6  # the same picture, up to resampling
    # the eyes: quad corner (5, 7.5) + (50, 40) -> output (x - 55) / 90 * 64
    dark = out.sum(2) < 200
    left = _blob(out, dark & (np.arange(size)[None, :] < size // 2))
    right = _blob(out, dark & (np.arange(size)[None, :] >= size // 2))
    np.testing.assert_allclose(left, [(90 - 55) / 90 * size, (90 - 47.5) / 90 * size], atol=1.0)
    np.testing.assert_allclose(right, [(110 - 55) / 90 * size, (90 - 47.5) / 90 * size], atol=1.0)
    blue = _blob(out, (out[..., 2] > 150) & (out[..., 0] < 100))
    red = _blob(out, (out[..., 0] > 150) & (out[..., 1] < 100))
    assert blue[1] < left[1] < red[1]  # forehead above the eyes above the mouth
    assert abs(blue[0] - size / 2) < 1.5 and abs(red[0] - size / 2) < 1.5


def test_a_face_near_the_border_is_padded_not_cut():
    img, lm = _drawn_face(0)
    corner = img.crop((60, 60, 200, 200))  # the quad now leaves the image at the top and left
    out = np.asarray(align_face(corner, 48, landmarks=lm - 60, transform_size=192), dtype=np.float64)
    assert out.shape == (48, 48, 3) and out.min() >= 0
    assert (out.sum(2) < 200).sum() > 0  # the eyes are still there


def test_missing_detector_says_what_to_install(monkeypatch):
    monkeypatch.setattr(align, "_DETECTOR", None)
    monkeypatch.setitem(sys.modules, "dlib", None)  # "import dlib" raises ImportError
    img, lm = _drawn_face(0)
    with pytest.raises(LandmarkDetectorMissing, match=r'pip install "semdiff\[align\]".*dlib-bin face-recognition-models'):
        align_face(img)
    assert isinstance(LandmarkDetectorMissing("x"), ImportError)
    assert align_face(img, 32, landmarks=lm, transform_size=64).size == (32, 32)  # given landmarks need no detector


def _emoji_face(degrees: float) -> Image.Image:
    from PIL import ImageFont

    from semdiff.data.emoji import find_emoji_font

    try:
        font = ImageFont.truetype(str(find_emoji_font().path), 109)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no emoji font to draw a face with: {err}")
    img = Image.new("RGBA", (400, 400), (255, 255, 255, 255))
    ImageDraw.Draw(img).text((200, 200), "\U0001F469", font=font, embedded_color=True, anchor="mm")  # woman
    return img.convert("RGB").rotate(degrees, resample=Image.BICUBIC, fillcolor=(255, 255, 255))


@pytest.mark.skipif(not detector_available(),
                    reason='dlib landmark detector not installed (pip install "semdiff[align]")')
def test_detector_aligns_a_tilted_face():
    from semdiff.align import detect_landmarks

    size = 128
    out = align_face(_emoji_face(-25), size)
    assert out.size == (size, size)
    faces = detect_landmarks(out.resize((2 * size, 2 * size), Image.BICUBIC))
    assert len(faces) == 1
    eye_l, eye_r = key_points(faces[0])[:2] / 2
    angle = np.degrees(np.arctan2(eye_r[1] - eye_l[1], eye_r[0] - eye_l[0]))
    assert abs(angle) < 3  # upright
    assert abs(np.hypot(*(eye_r - eye_l)) - size / 4) < size * 0.04  # eyes a quarter of the width apart
    assert abs((eye_l[0] + eye_r[0]) / 2 - size / 2) < size * 0.04
    with pytest.raises(NoFaceFound, match="found 0 face"):
        align_face(Image.new("RGB", (100, 100), (255, 255, 255)))


@pytest.mark.skipif(not detector_available(),
                    reason='dlib landmark detector not installed (pip install "semdiff[align]")')
def test_cli_align(tmp_path, capsys):
    from semdiff.cli import main as cli

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    _emoji_face(15).save(src / "sub" / "tilted.jpg", quality=95)
    Image.new("RGB", (80, 80), (255, 255, 255)).save(src / "blank.png")
    code = cli(["align", str(src), "--out", str(tmp_path / "aligned"), "--size", "64", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3 and "blank.png (no face found)" in captured.err
    assert Image.open(tmp_path / "aligned" / "sub" / "tilted.png").size == (64, 64)
