"""semdiff.attributes, `semdiff fit-attributes`, and editing with several attributes / keep / codes or images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffae_helpers import load_fixture, official_weights
from semdiff import SemanticAutoencoder
from semdiff.attributes import (
    add_attributes_to_model,
    fit_attributes,
    fit_linear_heads,
    parse_labels,
    read_labels_csv,
)
from semdiff.cli import main as cli
from semdiff.families.diffae import DiffAE
from semdiff.families.diffae.convert import CELEBA_ATTRIBUTES, convert_state_dict
from semdiff.io import save_model_folder


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


def _family(fx, classifier: bool) -> DiffAE:
    cls = {"classifier.weight": fx["manip.cls_weight"], "classifier.bias": fx["manip.cls_bias"],
           "conds_mean": fx["manip.conds_mean"], "conds_std": fx["manip.conds_std"]} if classifier else None
    config, state = convert_state_dict(official_weights(fx), image_size=32, classifier=cls)
    family = DiffAE(config)
    family.load_state_dict(state)
    return family.eval()


@pytest.fixture()
def celeba_model(fx, tmp_path):
    """The tiny Diff-AE with an official-layout CelebA-40 classifier, converted, saved and loaded."""
    folder = save_model_folder(_family(fx, True), tmp_path / "celeba")
    return SemanticAutoencoder.from_pretrained(folder, progress=False), folder


@pytest.fixture()
def bare_model(fx, tmp_path):
    """The same network with no classifier and no code statistics."""
    folder = save_model_folder(_family(fx, False), tmp_path / "bare")
    return SemanticAutoencoder.from_pretrained(folder, progress=False), folder


def _planted(n: int, d: int, seed: int = 0):
    """Codes with a known linear rule in the normalised space, in the model's raw-code scale."""
    g = torch.Generator().manual_seed(seed)
    zn = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    w2 = 0.6 * w + 0.8 * torch.randn(d, generator=g)  # a correlated second attribute
    return zn, w / w.norm(), w2 / w2.norm()


# ---- label parsing ---------------------------------------------------------------------------


def test_parse_labels_kinds():
    heads = parse_labels({
        "zero_one": ["0", "1", "1", ""],
        "celeba": ["-1", "1", "-1", "1"],
        "yes": ["yes", "no", "Yes", "NA"],
        "flag": torch.tensor([True, False, True, False]),
        "animal": ["cat", "dog", "none", "cat"],
        "tone": torch.tensor([0, 1, 5, 3]),
        "age": ["21.5", "30", "44", "58.25"],
    }, label_names={"tone": ["none", "light", "medium-light", "medium", "medium-dark", "dark"]})
    by = {h.column: h for h in heads}
    assert {k: h.kind for k, h in by.items()} == {"zero_one": "binary", "celeba": "binary", "yes": "binary",
                                                   "flag": "binary", "animal": "categorical", "tone": "categorical",
                                                   "age": "continuous"}
    t = by["zero_one"].targets[:, 0]
    assert t[:3].tolist() == [0, 1, 1] and math.isnan(t[3])
    assert by["celeba"].targets[:, 0].tolist() == [0, 1, 0, 1]  # the official rule: > 0 is positive
    assert by["yes"].targets[:3, 0].tolist() == [1, 0, 1]
    assert by["animal"].names == ["animal_cat", "animal_dog"]  # "none" gets no head
    assert by["animal"].targets.tolist() == [[1, 0], [0, 1], [0, 0], [1, 0]]
    assert by["tone"].names == ["tone_light", "tone_medium", "tone_dark"]  # only the values present
    age = by["age"].targets[:, 0]
    assert abs(float(age.mean())) < 1e-6 and abs(float(age.std()) - 1) < 1e-5
    assert by["age"].target_mean == pytest.approx((21.5 + 30 + 44 + 58.25) / 4)
    assert parse_labels({"n": [1, 2, 3]}, kind="continuous")[0].kind == "continuous"
    assert [h.names for h in parse_labels({"n": [1, 2, 3]})] == [["n_1", "n_2", "n_3"]]
    with pytest.raises(ValueError, match="text values"):
        parse_labels({"a": ["x", "y"]}, kind="continuous")
    with pytest.raises(ValueError, match="more than max_classes"):
        parse_labels({"a": [f"v{i}" for i in range(5)]}, max_classes=4)


def test_read_labels_csv(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("file;smiling;group\na.png;1;x\nsub/b.png;0;y\n")
    files, cols = read_labels_csv(p)
    assert files == ["a.png", "sub/b.png"] and cols == {"smiling": ["1", "0"], "group": ["x", "y"]}
    p.write_text("file,a\nx.png,1,2\n")
    with pytest.raises(ValueError, match="row 2: 3 fields"):
        read_labels_csv(p)
    p.write_text("file\nx.png\n")
    with pytest.raises(ValueError, match="at least one label column"):
        read_labels_csv(p)


# ---- fitting ---------------------------------------------------------------------------------


def test_fit_recovers_planted_directions(celeba_model):
    model, _ = celeba_model
    d = model.code_dim
    zn, w, _ = _planted(1500, d)
    mean, std = model.family.codes_mean, model.family.codes_std
    z = zn * std + mean  # raw codes whose normalised form is zn
    y = zn @ w > 0.3
    value = 2.0 * (zn @ w) + 5.0 + 0.05 * torch.randn(1500, generator=torch.Generator().manual_seed(3))
    report = fit_attributes(model, z, {"my_label": y, "score": value}, steps=2000, apply=False)
    assert report.names == ["my_label", "score"] and report.kinds == {"my_label": "binary", "score": "continuous"}
    assert report.n_test == 300 and report.n_train == 1200
    m = report.metrics["my_label"]
    assert m["accuracy"] > 0.93 and m["auc"] > 0.98 and m["accuracy"] > m["baseline_accuracy"] + 0.2
    assert report.metrics["score"]["r2"] > 0.97
    cos = torch.nn.functional.cosine_similarity(report.weight, w[None], dim=1)
    assert cos[0] > 0.85 and cos[1] > 0.97  # the stored directions are the planted ones
    assert torch.equal(report.codes_mean, mean.cpu()) and not report.codes_stats_computed
    again = fit_attributes(model, z, {"my_label": y, "score": value}, steps=2000, apply=False)
    assert torch.equal(again.weight, report.weight)  # deterministic for a seed
    assert "my_label" in report.table() and "R2" in report.table()
    assert json.loads(json.dumps(report.to_dict()))["n_train"] == 1200


def test_edit_moves_an_independent_classifier(celeba_model):
    """Edit along a fitted direction; judge with a classifier fitted on other codes and labels."""
    model, _ = celeba_model
    fam = model.family
    d = model.code_dim
    zn, w, w2 = _planted(3000, d, seed=1)
    z = fam.denormalize_codes(zn)
    label = (zn @ w > 0)
    other = (zn @ w2 > 0)
    fit_attributes(model, z[:1500], {"my_label": label[:1500], "other": other[:1500]}, steps=2000, holdout=0.1)
    assert model.attributes[-2:] == ["my_label", "other"]
    # the judge: trained on the other half only, with another seed, never seen by the edit
    judge_w, judge_b = fit_linear_heads(zn[1500:], label[1500:, None].float(), torch.tensor([False]), steps=1500,
                                        seed=7)
    judge = lambda codes: torch.sigmoid(fam.normalize_codes(codes) @ judge_w.T + judge_b)[:, 0]  # noqa: E731
    test = z[1500:1700][~label[1500:1700]]  # negatives
    before = judge(test).mean()
    up = judge(fam.edit_codes(test, {"my_label": 0.3})).mean()
    assert before < 0.2 and up > 0.8
    pos = z[1500:1700][label[1500:1700]]
    assert judge(fam.edit_codes(pos, {"my_label": -0.3})).mean() < 0.2
    # keep=: the kept attribute's logit does not move; without keep it does (the directions correlate)
    logits = lambda codes: fam.classify(codes)[:, model.attributes.index("other")]  # noqa: E731
    kept = fam.edit_codes(test, {"my_label": 0.3}, keep=["other"])
    torch.testing.assert_close(logits(kept), logits(test), atol=1e-3, rtol=0)
    assert (logits(fam.edit_codes(test, {"my_label": 0.3})) - logits(test)).abs().mean() > 0.5
    assert judge(kept).mean() > 0.6  # and the edit still works
    # two attributes at once = the sum of the steps in the normalised space
    both = fam.normalize_codes(fam.edit_codes(test, {"my_label": 0.3, "other": -0.2}))
    one = fam.normalize_codes(fam.edit_codes(test, {"my_label": 0.3}))
    two = fam.normalize_codes(fam.edit_codes(test, {"other": -0.2}))
    torch.testing.assert_close(both - fam.normalize_codes(test), (one - fam.normalize_codes(test)) +
                               (two - fam.normalize_codes(test)), atol=1e-4, rtol=0)
    step = (one - fam.normalize_codes(test)).norm(dim=1)
    torch.testing.assert_close(step, torch.full_like(step, 0.3 * math.sqrt(d)), atol=1e-3, rtol=0)


def test_merge_keeps_official_heads_and_round_trips(celeba_model, tmp_path):
    model, folder = celeba_model
    assert model.attributes == CELEBA_ATTRIBUTES  # the official CelebA-40 layout loads through the converter
    old_w = model.family.classifier.weight.clone()
    mean = model.family.codes_mean.clone()
    d = model.code_dim
    zn, w, _ = _planted(600, d, seed=2)
    z = model.family.denormalize_codes(zn)
    report = fit_attributes(model, z, {"my_label": (zn @ w > 0).float().numpy()}, steps=500)
    assert len(model.attributes) == 41 and model.attributes[-1] == "my_label"
    assert torch.equal(model.family.classifier.weight[:40], old_w)
    assert torch.equal(model.family.codes_mean, mean)  # the model's statistics are kept
    # a refit replaces the head in place
    fit_attributes(model, z, {"my_label": (zn @ w > 0)}, steps=300)
    assert len(model.attributes) == 41
    out = report.save(model, tmp_path / "with_label")
    loaded = SemanticAutoencoder.from_pretrained(out, progress=False)
    assert loaded.attributes == model.attributes
    assert loaded.config["attribute_info"]["my_label"]["kind"] == "binary"
    torch.testing.assert_close(loaded.family.classifier.weight, model.family.classifier.weight)
    probs = loaded.classify(z[:4])
    assert set(probs) >= {"my_label", "Wavy_Hair"} and probs["my_label"].shape == (4,)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    edited = loaded.manipulate((z[:2], x_T), attribute={"my_label": 0.3, "Smiling": -0.2}, steps=2,
                               keep=["Male"])
    assert edited.shape == (2, 3, 32, 32) and 0 <= float(edited.min()) and float(edited.max()) <= 1
    with pytest.raises(ValueError, match="8-d codes"):
        add_attributes_to_model(model, ["x"], torch.zeros(1, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="hflip needs images"):
        fit_attributes(model, z, {"my_label": (zn @ w > 0)}, hflip=True)


def test_model_without_statistics_gets_them_from_the_data(bare_model, tmp_path):
    model, folder = bare_model
    assert model.family.codes_mean is None and model.attributes == []
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, model.code_dim, generator=g) * 4 + 2
    y = z[:, 0] > 2
    report = fit_attributes(model, z, {"first": y}, steps=1500)
    assert report.codes_stats_computed and report.metrics["first"]["accuracy"] > 0.85
    torch.testing.assert_close(model.family.codes_mean, z.mean(0, keepdim=True))
    torch.testing.assert_close(model.family.codes_std, z.std(0, keepdim=True))
    out = report.save(model, folder)
    loaded = SemanticAutoencoder.from_pretrained(out, progress=False)
    assert loaded.attributes == ["first"] and loaded.config["has_code_stats"]
    torch.testing.assert_close(loaded.family.codes_std, z.std(0, keepdim=True))
    assert loaded.family.attribute_direction("first")[0] > 0.9  # the label is dimension 0


def test_manipulate_from_images_equals_from_codes(celeba_model, fx):
    model, _ = celeba_model
    images = (fx["x0"] + 1) / 2
    from_images = model.manipulate(images, {"Smiling": 0.4, "Young": -0.2}, steps=2, inversion_steps=2,
                                   keep=["Male"])
    z = model.encode(images)
    x_T = model.encode_stochastic(images, z, steps=2)
    from_codes = model.manipulate((z, x_T), {"Smiling": 0.4, "Young": -0.2}, steps=2, keep=["Male"])
    torch.testing.assert_close(from_images, from_codes, atol=1e-5, rtol=0)
    plain = model.decode(z, x_T, steps=2)
    assert (from_codes - plain).abs().mean() > 1e-3  # the edit changed something
    with pytest.raises(KeyError, match="did you mean Smiling"):
        model.manipulate((z, x_T), "Smilling", steps=2)


# ---- the command line --------------------------------------------------------------------------


@pytest.fixture()
def labelled_images(fx, tmp_path):
    """24 small images in two folders with a CSV (relative names), a label the pixels determine."""
    root = tmp_path / "imgs"
    (root / "b").mkdir(parents=True)
    rows = ["file,bright,kind"]
    g = np.random.default_rng(0)
    for i in range(24):
        bright = i % 2
        base = 170 if bright else 70
        arr = np.clip(g.normal(base, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        name = f"{'b/' if i % 3 == 0 else ''}img{i:02d}.png"
        Image.fromarray(arr).save(root / name)
        rows.append(f"{name},{bright},{['round', 'square', 'none'][i % 3]}")
    rows.append("gone.png,1,round")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, tmp_path / "labels.csv"


def test_cli_fit_attributes_then_manipulate(celeba_model, labelled_images, tmp_path, capsys):
    model, folder = celeba_model
    root, labels = labelled_images
    out = tmp_path / "mine"
    code = cli(["fit-attributes", str(folder), str(root), str(labels), "--out", str(out), "--steps", "400",
                "--holdout", "0.25", "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "bright" in captured.out and "kind_round" in captured.out and "saved 3 attribute(s)" in captured.out
    assert "gone.png" in captured.err  # a label row without an image is named
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_train"] == 18 and report["n_test"] == 6
    assert report["metrics"]["bright"]["accuracy"] >= 5 / 6  # brightness is easy, even for random weights
    loaded = SemanticAutoencoder.from_pretrained(out, progress=False)
    assert loaded.attributes == CELEBA_ATTRIBUTES + ["bright", "kind_round", "kind_square"]
    strip = tmp_path / "strip.png"
    code = cli(["manipulate", str(root / "img01.png"), str(root / "img02.png"), "--model", str(out), "-a", "bright",
                "--scale", "0.5", "--keep", "kind_round", "--steps", "2", "--inversion-steps", "2", "-o", str(strip)])
    assert code == 0
    assert Image.open(strip).size == (2 * 34 + 2, 2 * 34 + 2)  # before | after, one row per image
    sweep = tmp_path / "sweep.png"
    code = cli(["manipulate", str(root / "img01.png"), "--model", str(out), "-a", "bright", "-a", "kind_square",
                "--sweep=-0.5,0,0.5", "--steps", "2", "--inversion-steps", "2", "-o", str(sweep)])
    assert code == 0 and Image.open(sweep).size == (3 * 34 + 2, 34 + 2)
    # a model folder given as MODEL without --out is updated in place; named models need --out
    code = cli(["fit-attributes", str(out), str(root), str(labels), "--steps", "50", "--columns", "bright", "--hflip"])
    assert code == 0
    assert "encode" not in capsys.readouterr().err
    code = cli(["fit-attributes", "diffae-ffhq256", str(root), str(labels)])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_cli_fit_attributes_from_a_features_file(celeba_model, labelled_images, tmp_path, capsys):
    model, folder = celeba_model
    root, labels = labelled_images
    feats = tmp_path / "f.safetensors"
    assert cli(["features", str(root), "-o", str(feats), "--model", str(folder)]) == 0
    code = cli(["fit-attributes", str(folder), str(feats), str(labels), "--dry-run", "--steps", "200",
                "--kind", "kind=categorical", "--columns", "kind"])
    out = capsys.readouterr().out
    assert code == 0 and "kind (3-way)" in out and "saved" not in out
    assert SemanticAutoencoder.from_pretrained(folder).attributes == CELEBA_ATTRIBUTES  # dry run: unchanged


def test_hflip_trains_on_mirror_images_too(celeba_model, labelled_images, monkeypatch):
    model, _ = celeba_model
    root, labels = labelled_images
    seen = []
    real = model.family.encode
    monkeypatch.setattr(model.family, "encode", lambda x, **kw: seen.append(x.clone()) or real(x, **kw))
    with pytest.warns(UserWarning, match="gone.png"):
        plain = fit_attributes(model, root, labels, columns=["bright"], steps=100, apply=False)
    n_plain = sum(len(x) for x in seen)
    seen.clear()
    with pytest.warns(UserWarning, match="gone.png"):
        flipped = fit_attributes(model, root, labels, columns=["bright"], steps=100, apply=False, hflip=True)
    assert n_plain == 24 and sum(len(x) for x in seen) == 48
    first, mirrored = torch.cat(seen[: len(seen) // 2]), torch.cat(seen[len(seen) // 2:])
    torch.testing.assert_close(mirrored, first.flip(-1))
    assert flipped.n_train == plain.n_train == 19 and not torch.equal(flipped.weight, plain.weight)
