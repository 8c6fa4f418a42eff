"""semdiff.features and `semdiff features`: streaming, skipping, resuming, formats, batch sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffae_helpers import load_fixture, official_weights
from semdiff import SemanticAutoencoder
from semdiff.cli import main as cli
from semdiff.families.diffae import DiffAE
from semdiff.families.diffae.convert import convert_state_dict
from semdiff.features import (
    FolderCodes,
    auto_batch_size,
    extract_features,
    iter_folder_codes,
    list_images,
    load_features,
    read_image_file,
)
from semdiff.images import ImageInputError
from semdiff.io import save_model_folder

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config, state = convert_state_dict(official_weights(load_fixture()), image_size=32)
    family = DiffAE(config)
    family.load_state_dict(state)
    return save_model_folder(family.eval(), tmp_path_factory.mktemp("feat") / "tiny")


@pytest.fixture(scope="module")
def model(folder):
    return SemanticAutoencoder.from_pretrained(folder, progress=False)


def _smooth(seed: int, size: int = 32) -> np.ndarray:
    g = np.random.default_rng(seed)
    small = g.uniform(0, 255, (4, 4, 3))
    img = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """10 readable images (RGB, a subfolder, RGBA, grey, 48x40) and 2 unreadable ones."""
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub").mkdir()
    for i in range(6):
        Image.fromarray(_smooth(i)).save(root / f"rgb_{i}.png")
    Image.fromarray(_smooth(6)).save(root / "sub" / "deep.png")
    rgba = np.concatenate([_smooth(7), np.full((32, 32, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.fromarray(_smooth(8)[..., 0], "L").save(root / "grey.png")
    Image.fromarray(_smooth(9, 48)[:40]).save(root / "big.jpg", quality=95)
    (root / "broken.png").write_bytes(b"this is not an image")
    good = (root / "rgb_0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not an image file: ignored")
    return root


def _count_encoded(model, monkeypatch) -> list[int]:
    """Sizes of the batches the encoder network sees."""
    calls: list[int] = []
    real = model.family.encode

    def counting(x, **kw):
        calls.append(len(x))
        return real(x, **kw)

    monkeypatch.setattr(model.family, "encode", counting)
    return calls


def test_list_images_sorted_recursive_and_errors(images, tmp_path):
    files = list_images(images)
    names = [f.relative_to(images).as_posix() for f in files]
    assert names == sorted(names) and "sub/deep.png" in names and "notes.txt" not in names
    assert len(files) == 12
    assert [f.name for f in list_images(str(images / "rgb_*.png"))] == [f"rgb_{i}.png" for i in range(6)]
    assert len(list_images([images / "rgb_0.png", str(images / "rgb_*.png")])) == 6  # no duplicates
    with pytest.raises(FileNotFoundError, match="no such image"):
        list_images(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="no image files match"):
        list_images(str(tmp_path / "*.png"))


def test_extract_matches_encode_and_skips_unreadable(model, images, tmp_path):
    out = tmp_path / "codes.safetensors"
    with pytest.warns(UserWarning) as record:
        result = extract_features(model, images, out, batch_size=4)
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "truncated.png" in messages
    assert sorted(Path(p).name for p, _ in result.skipped) == ["broken.png", "truncated.png"]
    assert len(result.files) == 10 and result.z.shape == (10, model.code_dim)
    assert result.files == sorted(result.files)
    # rows are the codes of exactly those files, preprocessed as model.encode(resize=True) does
    expected = model.encode(torch.stack([read_image_file(f, 32) for f in result.files]))
    torch.testing.assert_close(result.z, expected, atol=1e-5, rtol=1e-5)
    rgb = [f for f in result.files if Path(f).name.startswith("rgb_")]
    torch.testing.assert_close(result.z[[result.files.index(f) for f in rgb]], model.encode(rgb), atol=1e-5, rtol=1e-5)
    assert torch.unique(result.z, dim=0).shape[0] == 10  # the codes depend on the image
    # the big JPEG went through resize + centre crop
    assert read_image_file(images / "big.jpg", 32).shape == (3, 32, 32)
    # the file reads back with names, model and root in the metadata; no partial folder left
    again = load_features(out)
    assert again.files == result.files and torch.equal(again.z, result.z)
    assert again.metadata["family"] == "diffae" and again.metadata["root"] == str(images)
    assert not out.with_name(out.name + ".partial").exists()


def test_no_resize_skips_other_sizes(model, images, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_features(model, images, tmp_path / "c.safetensors", resize=False, batch_size=8)
    skipped = {Path(p).name: r for p, r in result.skipped}
    assert "big.jpg" in skipped and "48x40" in skipped["big.jpg"] and len(result.files) == 9


def test_resume_after_exception_recomputes_nothing(model, images, tmp_path, monkeypatch):
    files = sorted(str(f) for f in (images).glob("rgb_*.png")) + [str(images / "sub" / "deep.png")]
    reference = extract_features(model, files, tmp_path / "ref.safetensors", batch_size=2)
    out = tmp_path / "codes.safetensors"
    calls = _count_encoded(model, monkeypatch)

    def stop_after_two_batches(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(model, files, out, batch_size=2, callback=stop_after_two_batches, shard_size=100)
    assert sum(calls) == 4 and not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert len(list(partial.glob("shard_*.safetensors"))) == 1  # the buffer was saved on the way out
    calls.clear()
    result = extract_features(model, files, out, batch_size=2)
    assert sum(calls) == 3 and result.computed == 3 and result.reused == 4
    assert result.files == reference.files
    torch.testing.assert_close(result.z, reference.z, atol=1e-6, rtol=1e-6)
    assert not partial.exists()
    # resume=False starts afresh
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, files, out, batch_size=2, callback=stop_after_two_batches)
    calls.clear()
    extract_features(model, files, out, batch_size=2, resume=False)
    assert sum(calls) == 7


def test_resume_after_sigkill(folder, model, images, tmp_path, monkeypatch):
    """A run killed with SIGKILL keeps every shard it wrote; the resumed run encodes only the rest."""
    out = tmp_path / "killed.safetensors"
    partial = out.with_name(out.name + ".partial")
    script = textwrap.dedent(f"""
        import time, warnings
        warnings.simplefilter("ignore")
        from semdiff import SemanticAutoencoder
        from semdiff.features import extract_features
        model = SemanticAutoencoder.from_pretrained({str(folder)!r}, progress=False)
        def slow(done, total):
            print("done", done, flush=True)
            time.sleep(60 if done >= 4 else 0)
        extract_features(model, {str(images)!r}, {str(out)!r}, batch_size=2, shard_size=2, callback=slow)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if int(line.split()[1]) >= 4 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    shards = sorted(partial.glob("shard_*.safetensors"))
    # batches [alpha, big], [broken, grey] (1 readable), [rgb_0, rgb_1]: shards of 2 and 3 images
    assert len(shards) == 2 and not list(partial.glob("*.tmp"))
    calls = _count_encoded(model, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_features(model, images, out, batch_size=2)
    assert result.reused == 5 and sum(calls) == 5 == result.computed  # 10 readable - 5 done
    expected = model.encode(torch.stack([read_image_file(f, 32) for f in result.files]))
    torch.testing.assert_close(result.z, expected, atol=1e-5, rtol=1e-5)
    assert len(result.files) == 10 and not partial.exists()


def test_partial_of_other_settings_is_refused(model, images, tmp_path):
    files = sorted(images.glob("rgb_*.png"))
    out = tmp_path / "c.safetensors"

    def stop(done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        extract_features(model, files, out, batch_size=2, callback=stop)
    with pytest.raises(ValueError, match="other settings.*stochastic.*resume=False"):
        extract_features(model, files, out, batch_size=2, stochastic=True, steps=2)


def test_npy_with_stochastic_codes(model, images, tmp_path):
    files = sorted(images.glob("rgb_*.png"))[:3]
    out = tmp_path / "feats.npy"
    result = extract_features(model, files, out, stochastic=True, steps=2, batch_size=2)
    assert (tmp_path / "feats.files.txt").read_text().splitlines() == [str(f) for f in files]
    z = torch.from_numpy(np.load(out))
    x_T = torch.from_numpy(np.load(tmp_path / "feats.x_T.npy"))
    assert z.shape == (3, model.code_dim) and x_T.shape == (3, 3, 32, 32)
    assert torch.equal(result.x_T, x_T)
    torch.testing.assert_close(x_T, model.encode_stochastic([str(f) for f in files], steps=2), atol=1e-4, rtol=1e-4)
    loaded = load_features(out)
    assert loaded.files == [str(f) for f in files] and loaded.has_x_T


def test_large_file_lists_go_to_a_sidecar(model, images, tmp_path, monkeypatch):
    import semdiff.features as features

    monkeypatch.setattr(features, "MAX_METADATA_BYTES", 10)
    files = sorted(images.glob("rgb_*.png"))[:2]
    out = tmp_path / "c.safetensors"
    extract_features(model, files, out)
    sidecar = tmp_path / "c.files.json"
    assert json.loads(sidecar.read_text()) == [str(f) for f in files]
    assert load_features(out).files == [str(f) for f in files]


def test_auto_batch_size_and_oom_halving(model, images, monkeypatch):
    bs = auto_batch_size(model)
    assert bs & (bs - 1) == 0 and 1 <= bs <= 64
    assert auto_batch_size(model, n=5) == 8
    small = auto_batch_size(model, budget_bytes=3 * 4 * 32 * 32 * 32 * 12)
    assert small == 2
    files = sorted(images.glob("rgb_*.png"))
    reference = torch.cat([z for _, z, _ in iter_folder_codes(model, files, batch_size=6)])
    real = model.family.encode
    seen: list[int] = []

    def fragile(x, **kw):
        seen.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, **kw)

    monkeypatch.setattr(model.family, "encode", fragile)
    stream = iter_folder_codes(model, files, batch_size=8)
    with pytest.warns(UserWarning, match="batch size lowered to"):
        z = torch.cat([z for _, z, _ in stream])
    assert stream.batch_size == 2 and max(seen) == 6 and seen[-1] <= 2
    torch.testing.assert_close(z, reference, atol=1e-5, rtol=1e-5)
    assert model.batch_size == 16  # restored


def test_iterator_with_worker_processes(model, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = iter_folder_codes(model, images, batch_size=4, num_workers=1)
        batches = list(stream)
    assert isinstance(stream, FolderCodes) and len(stream.skipped) == 2
    assert sum(len(p) for p, _, _ in batches) == 10 and all(x is None for _, _, x in batches)


def test_cli_features_exit_codes(folder, images, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli(["features", str(images), "--out", str(out), "--model", str(folder), "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 3
    assert "skipped 2 unreadable image(s)" in captured.err and "broken.png" in captured.err
    assert "wrote semantic codes of 10 images" in captured.out
    assert len(load_features(out).files) == 10
    code = cli(["features", str(images / "rgb_*.png"), "-o", str(tmp_path / "ok.npy"), "--model", str(folder)])
    assert code == 0 and (tmp_path / "ok.files.txt").is_file()
    code = cli(["features", str(tmp_path / "missing"), "-o", str(out), "--model", str(folder)])
    assert code == 2 and "no such image file or folder" in capsys.readouterr().err


def test_read_image_file_converts_modes(tmp_path):
    rgb = _smooth(3)
    grey8 = Image.fromarray(rgb).convert("L")
    Image.fromarray(np.asarray(grey8).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    grey8.save(tmp_path / "grey8.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    ref8 = read_image_file(tmp_path / "grey8.png", 32)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    torch.testing.assert_close(read_image_file(tmp_path / "grey16.png", 32), ref8, atol=1 / 255, rtol=0)  # not clipped
    cmyk = read_image_file(tmp_path / "cmyk.jpg", 32)
    assert cmyk.shape == (3, 32, 32) and (cmyk - torch.tensor(rgb).permute(2, 0, 1) / 255).abs().mean() < 0.05
    with pytest.raises(ImageInputError, match="cannot read image .*nothing.png"):
        read_image_file(tmp_path / "nothing.png", 32)
