"""The README's demo on the shipped model: offline, CPU, one PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "semdiff" / "pretrained"
MODEL = PRETRAINED / "semdiff-emoji32-diffae"
INPUTS = PRETRAINED / "demo-emoji"

needs_model = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(),
                                 reason="the shipped model semdiff-emoji32-diffae is not in this checkout")


@needs_model
def test_shipped_model_is_small_and_complete():
    from semdiff.io import load_model_folder

    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size < 20_000_000
    model = load_model_folder(MODEL)
    assert model.has_prior
    assert "skin_tone_dark" in model.attribute_names and "group_flags" in model.attribute_names
    assert model.config["training"]["data"] == "emoji"
    card = (MODEL / "README.md").read_text()
    assert "CC BY-SA 4.0" in card and "OpenMoji" in card


@needs_model
def test_manifest_entry_matches_the_files():
    from semdiff.training.export import sha256_file

    manifest = json.loads((ROOT / "semdiff" / "weights_manifest.json").read_text())
    assert manifest["default"] == "semdiff-emoji32-diffae"
    entry = manifest["models"]["semdiff-emoji32-diffae"]
    assert entry["status"] == "bundled" and entry["source"]["type"] == "bundled"
    for name, info in entry["source"]["files"].items():
        path = ROOT / "semdiff" / entry["source"]["path"] / name
        assert path.stat().st_size == info["size"]
        assert sha256_file(path) == info["sha256"]
    from semdiff.manifest import validate_entry

    assert validate_entry("semdiff-emoji32-diffae", entry) == []


def test_demo_inputs_are_held_out():
    from semdiff.training.data import emoji_split_key, split_key_hash

    meta = json.loads((INPUTS / "inputs.json").read_text())
    assert len(meta["items"]) == 8
    for item in meta["items"]:
        assert split_key_hash(emoji_split_key(item["codepoints"])) < 0.1, item
    roles = [item["role"] for item in meta["items"]]
    assert "interp_a" in roles and "interp_b" in roles and "edit" in roles


@needs_model
def test_demo_writes_one_png_offline(tmp_path):
    out = tmp_path / "demo.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1", SEMDIFF_OFFLINE="1", PYTHONPATH=str(ROOT), SEMDIFF_PROGRESS="0")
    t0 = time.time()
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    elapsed = time.time() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    from PIL import Image

    img = Image.open(out)
    assert img.width > 8 * 96 and img.height > 6 * 96
    # "well under a minute" on two idle cores; generous here because CI machines are shared
    assert elapsed < 150, elapsed
