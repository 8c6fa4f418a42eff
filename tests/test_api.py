"""The public API: inputs, outputs, errors, batching, save/load, CLI — on the tiny converted Diff-AE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffae_helpers import load_fixture, official_weights, tiny_latent_state
from semdiff import SemanticAutoencoder
from semdiff.cli import main as cli
from semdiff.families.base import FeatureNotSupported
from semdiff.families.diffae import DiffAE
from semdiff.families.diffae.convert import convert_state_dict
from semdiff.images import ImageInputError
from semdiff.io import ModelFolderError, save_model_folder


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


def _family(fx, *, latent=True, classifier=True) -> DiffAE:
    official = official_weights(fx)
    if latent:
        official.update(tiny_latent_state()[1])
        official["conds_mean"], official["conds_std"] = fx["manip.conds_mean"], fx["manip.conds_std"]
    cls = {"classifier.weight": fx["manip.cls_weight"], "classifier.bias": fx["manip.cls_bias"],
           "conds_mean": fx["manip.conds_mean"], "conds_std": fx["manip.conds_std"]} if classifier else None
    config, state = convert_state_dict(official, image_size=32, classifier=cls)
    model = DiffAE(config)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def folder(fx, tmp_path_factory):
    return save_model_folder(_family(fx), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def model(folder):
    return SemanticAutoencoder.from_pretrained(folder, progress=False, batch_size=3)


@pytest.fixture(scope="module")
def images(fx):
    return (fx["x0"] + 1) / 2


def test_save_load_round_trip(model, folder, images, tmp_path):
    out = model.save_pretrained(tmp_path / "again")
    again = SemanticAutoencoder.from_pretrained(out, progress=False)
    assert torch.equal(model.encode(images), again.encode(images))
    assert json.loads((out / "config.json").read_text())["family"] == "diffae"


def test_input_types_agree(model, images):
    z = model.encode(images)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    z_pil = model.encode(pil)
    z_np = model.encode(np.stack([np.asarray(p) for p in pil]))
    assert torch.allclose(z_pil, z_np, atol=1e-4)
    assert (z - z_pil).abs().max() < 0.05  # 8-bit quantisation only
    assert torch.equal(model.encode(images[0]), model.encode(images[:1]))


def test_paths_and_batching(model, images, tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray((images[i % 2].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(p)
        paths.append(str(p))
    z = model.encode(paths)  # batch_size 3: two batches
    assert z.shape == (5, model.code_dim)
    torch.testing.assert_close(z[0], z[2])
    torch.testing.assert_close(z[1], z[3])


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(1, 3, 16, 16), "expects 32x32"),
        (torch.rand(1, 1, 32, 32), "3 channels"),
        (torch.rand(1, 32, 32, 3), "channels-last"),
        ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "divide uint8"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, "looks like \\[-1, 1\\]"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (Image.new("RGBA", (32, 32)), "mode RGBA"),
        (Image.new("L", (32, 32)), "mode L"),
        (Image.new("RGB", (40, 32)), "resize=True"),
        ("/nonexistent/img.png", "not found"),
        (42, "expected images|int"),
    ],
)
def test_bad_images_get_clear_errors(model, bad, message):
    with pytest.raises(ImageInputError, match=message):
        model.encode(bad)


def test_corrupt_image_file_named(model, tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageInputError, match="broken.png"):
        model.encode([str(p)])


def test_resize_is_explicit(model):
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    z = model.encode(img, resize=True)
    assert z.shape == (1, model.code_dim)


def test_output_types(model, fx):
    z, x_T = fx["z_sem"], fx["ddim5.xT_random"]
    pt = model.decode(z, x_T, steps=2)
    arr = model.decode(z, x_T, steps=2, output_type="np")
    pil = model.decode(z, x_T, steps=2, output_type="pil")
    assert pt.shape == (2, 3, 32, 32) and arr.shape == (2, 32, 32, 3)
    assert np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    assert pil[0].size == (32, 32) and pil[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        model.decode(z, x_T, steps=2, output_type="jpg")


def test_bad_codes_and_steps(model, fx):
    with pytest.raises(ValueError, match=r"shape \(B, 64\)"):
        model.decode(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="x_T must have shape"):
        model.decode(fx["z_sem"], torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        model.decode(torch.full((1, 64), float("nan")))
    with pytest.raises(ValueError, match="closest reachable counts are 143 or 167"):
        model.decode(fx["z_sem"], steps=150)
    with pytest.raises(ValueError, match="positive integer"):
        model.decode(fx["z_sem"], steps=0)
    with pytest.raises(FeatureNotSupported, match="no option"):
        model.decode(fx["z_sem"], steps=2, guidance_weight=1.0)


def test_random_decode_is_seeded(model, fx):
    a = model.decode(fx["z_sem"], steps=2, generator=torch.Generator().manual_seed(3))
    b = model.decode(fx["z_sem"], steps=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_manipulate_errors_and_multi(model, fx):
    codes = (fx["z_sem"], fx["ddim5.xT_inverted"])
    with pytest.raises(KeyError, match="did you mean Smiling"):
        model.manipulate(codes, "Smilling", steps=2)
    base = model.family.normalize_codes(fx["z_sem"])
    z2 = model.family.edit_codes(fx["z_sem"], {"Smiling": 0.3, "Young": -0.2})
    w = model.family.classifier.weight
    moved = model.family.normalize_codes(z2) - base
    expected = 0.3 * 8 * w[31] / w[31].norm() - 0.2 * 8 * w[39] / w[39].norm()
    torch.testing.assert_close(moved, expected.expand_as(moved), atol=1e-5, rtol=0)


def test_keep_attributes_orthogonal(model, fx):
    z = model.family.edit_codes(fx["z_sem"], {"Smiling": 1.0}, keep=["Male", "Young"])
    logits_before = model.family.classify(fx["z_sem"])
    logits_after = model.family.classify(z)
    for name in ("Male", "Young"):
        i = model.attributes.index(name)
        torch.testing.assert_close(logits_after[:, i], logits_before[:, i], atol=1e-4, rtol=0)
    i = model.attributes.index("Smiling")
    assert (logits_after[:, i] - logits_before[:, i]).min() > 1.0


def test_classify_probabilities(model, images):
    probs = model.classify(images)
    assert len(probs) == 40 and probs["Smiling"].shape == (2,)
    assert all(((p >= 0) & (p <= 1)).all() for p in probs.values())


def test_no_prior_no_classifier_errors(fx, tmp_path):
    m = SemanticAutoencoder(_family(fx, latent=False, classifier=False), progress=False)
    with pytest.raises(FeatureNotSupported, match="no representation prior"):
        m.sample(2)
    with pytest.raises(FeatureNotSupported, match="no attribute classifier"):
        m.manipulate((fx["z_sem"], fx["ddim5.xT_inverted"]), "Smiling")


def test_bf16_close_to_fp32(folder, images):
    from semdiff.api import cpu_has_bf16

    if not cpu_has_bf16():
        with pytest.raises(ValueError, match="bfloat16"):
            SemanticAutoencoder.from_pretrained(folder, dtype=torch.bfloat16)
        return
    fp32 = SemanticAutoencoder.from_pretrained(folder, progress=False)
    bf16 = SemanticAutoencoder.from_pretrained(folder, dtype="bf16", progress=False)
    z32, z16 = fp32.encode(images), bf16.encode(images)
    assert (z32 - z16).abs().max() / z32.abs().max() < 0.05
    # one denoiser pass (the randomly re-initialised fixture net amplifies rounding through a chain;
    # the reconstruction-quality check of bf16 runs on the trained bundled model)
    t = torch.tensor([37, 812])
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e32 = fp32.family.unet(x_t, t, z32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            e16 = bf16.family.unet(x_t, t, z32).float()
    rel = ((e32 - e16).norm() / e32.norm()).item()
    assert rel < 0.03, f"bf16 eps relative error {rel:.3f}"


def test_corrupt_and_mismatched_folders(folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFolderError, match="corrupt or truncated"):
        SemanticAutoencoder.from_pretrained(bad)
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["network"]["model_channels"] = 64
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="shape"):
        SemanticAutoencoder.from_pretrained(wrong)
    nan = tmp_path / "nan"
    shutil.copytree(folder, nan)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(nan / "model.safetensors"))
    sd["encoder.out.3.bias"][0] = float("nan")
    save_file(sd, str(nan / "model.safetensors"))
    with pytest.raises(ModelFolderError, match="NaN"):
        SemanticAutoencoder.from_pretrained(nan)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        SemanticAutoencoder.from_pretrained(empty)


# ---- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i, im in enumerate(images):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(d / f"face{i}.png")
    return d


def test_cli_encode(folder, image_files, tmp_path, model):
    from safetensors import safe_open

    out = tmp_path / "codes.safetensors"
    assert cli(["encode", str(image_files), "-o", str(out), "-m", str(folder), "--stochastic",
                "--inversion-steps", "2", "--no-progress"]) == 0
    with safe_open(str(out), "pt") as f:
        z, x_T = f.get_tensor("z"), f.get_tensor("x_T")
        files = f.metadata()["files"].splitlines()
    assert z.shape == (2, 64) and x_T.shape == (2, 3, 32, 32)
    assert [p.rsplit("/", 1)[-1] for p in files] == ["face0.png", "face1.png"]
    torch.testing.assert_close(z[0:1], model.encode(files[0]))


def test_cli_image_commands(folder, image_files, tmp_path):
    m = ["-m", str(folder), "--no-progress"]
    assert cli(["reconstruct", str(image_files), "-o", str(tmp_path / "rec"), "--steps", "2",
                "--inversion-steps", "2", *m]) == 0
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["face0.png", "face1.png"]
    a, b = str(image_files / "face0.png"), str(image_files / "face1.png")
    assert cli(["interpolate", a, b, "--num", "4", "-o", str(tmp_path / "i.png"), "--steps", "2",
                "--inversion-steps", "2", *m]) == 0
    assert Image.open(tmp_path / "i.png").size == (4 * 34 + 2, 36)
    assert cli(["sample", "3", "-o", str(tmp_path / "s.png"), "--steps", "2", "--prior-steps", "2", *m]) == 0
    assert cli(["manipulate", a, "-a", "Smiling", "-o", str(tmp_path / "e.png"), "--steps", "2",
                "--inversion-steps", "2", *m]) == 0
    assert Image.open(tmp_path / "e.png").size == (2 * 34 + 2, 36)
    assert cli(["manipulate", a, b, "-a", "Smiling", "--sweep=-0.5,0,0.5", "-o", str(tmp_path / "sw.png"),
                "--steps", "2", "--inversion-steps", "2", *m]) == 0
    assert Image.open(tmp_path / "sw.png").size == (3 * 34 + 2, 2 * 34 + 2)


def test_cli_errors(folder, image_files, tmp_path, capsys):
    m = ["-m", str(folder), "--no-progress"]
    assert cli(["manipulate", str(image_files), "-a", "Smilling", "-o", str(tmp_path / "e.png"), *m]) == 2
    assert "did you mean Smiling" in capsys.readouterr().err
    assert cli(["encode", str(tmp_path / "none*.png"), "-o", str(tmp_path / "c.safetensors"), *m]) == 2
    assert "no image files match" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert cli(["reconstruct", str(bad), "-o", str(tmp_path / "r"), *m]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_fast_recipes_through_the_high_level_api(model, images):
    """inversion_options / decode options reach encode_stochastic / decode unchanged."""
    z = model.encode(images)
    x_T = model.encode_stochastic(images, z, steps=4, inverter="fixed-point", iterations=2)
    direct = model.decode(z, x_T, steps=4, sampler="dpmsolver++")
    rec = model.reconstruct(images, steps=4, inversion_steps=4,
                            inversion_options={"inverter": "fixed-point", "iterations": 2}, sampler="dpmsolver++")
    assert torch.equal(rec, direct)
    official = model.reconstruct(images, steps=4, inversion_steps=4)
    assert not torch.equal(rec, official)  # the options were not dropped
    mid = model.interpolate(images[:1], images[1:2], num=3, steps=4, inversion_steps=4,
                            inversion_options={"inverter": "fixed-point"}, sampler="unipc")
    plain = model.interpolate(images[:1], images[1:2], num=3, steps=4, inversion_steps=4)
    assert mid.shape == plain.shape and not torch.equal(mid, plain)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    s_unipc, zs, xs = model.sample(2, steps=4, prior_steps=2, generator=g(), return_codes=True,
                                   decode_options={"sampler": "unipc"})
    assert torch.equal(s_unipc, model.decode(zs, xs, steps=4, sampler="unipc"))
    with pytest.raises(FeatureNotSupported, match="no option"):
        model.reconstruct(images, steps=2, inversion_steps=2, temperature=0.5)


def test_cli_fast_recipe_options(folder, image_files, tmp_path):
    m = ["-m", str(folder), "--no-progress"]
    args = [str(image_files), "--steps", "3", "--inversion-steps", "3", *m]
    assert cli(["reconstruct", *args, "-o", str(tmp_path / "a.png")]) == 0
    assert cli(["reconstruct", *args, "-o", str(tmp_path / "b.png"), "--inverter", "fixed-point",
                "--sampler", "dpmsolver++"]) == 0
    a = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() > 0


def test_bf16_on_cpu_is_channels_last_and_fp32_is_not(folder):
    from semdiff.api import cpu_has_bf16

    fp32 = SemanticAutoencoder.from_pretrained(folder, progress=False)
    conv = next(p for p in fp32.family.unet.parameters() if p.dim() == 4)
    assert conv.is_contiguous()
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16")
    fp32.to(dtype="bf16")
    conv = next(p for p in fp32.family.unet.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fp32.to(dtype=torch.float32)
    assert next(p for p in fp32.family.unet.parameters() if p.dim() == 4).is_contiguous()


def test_keep_others(model, fx):
    fam = model.family
    others = fam.resolve_keep({"Smiling": 1.0}, "others")
    assert "Smiling" not in others and len(others) == len(model.attributes) - 1
    # one-hot siblings of the edited label are not held (they must move for the edit to happen)
    saved = dict(fam.config)
    fam.config["attribute_groups"] = {"hair": ["Black_Hair", "Blond_Hair", "Brown_Hair"]}
    try:
        kept = fam.resolve_keep({"Blond_Hair": 1.0}, "others")
        assert "Black_Hair" not in kept and "Brown_Hair" not in kept and "Smiling" in kept
    finally:
        fam.config.clear()
        fam.config.update(saved)
    assert fam.resolve_keep({"Smiling": 1.0}, ["Male"]) == ["Male"]
    if model.code_dim <= len(others):
        # 39 kept directions span (nearly) the whole code space: the user is told, not silently given a no-op
        with pytest.warns(UserWarning, match="leaves only"):
            fam.edit_codes(fx["z_sem"], {"Smiling": 1.0}, keep="others")
    else:
        z = fam.edit_codes(fx["z_sem"], {"Smiling": 1.0}, keep="others")
        before, after = fam.classify(fx["z_sem"]), fam.classify(z)
        for name in others:
            i = model.attributes.index(name)
            torch.testing.assert_close(after[:, i], before[:, i], atol=1e-3, rtol=0)


def test_reconstruct_default_steps_key(folder, images, tmp_path):
    """``default_steps["reconstruct"]`` (when a model sets it) is the decode grid of inverted codes."""
    import shutil

    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["default_steps"] = {"encode_stochastic": 4, "decode": 2, "reconstruct": 4, "manipulate": 4, "prior": 2}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    m = SemanticAutoencoder.from_pretrained(tmp_path / "m", progress=False)
    z = m.encode(images)
    x_T = m.encode_stochastic(images, z)
    assert torch.equal(m.reconstruct(images), m.decode(z, x_T, steps=4))
    assert not torch.equal(m.decode(z, x_T), m.decode(z, x_T, steps=4))  # decode keeps its own default
    assert m._steps("reconstruct", None) == 4 and m._steps("decode", None) == 2
    del cfg["default_steps"]["reconstruct"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert SemanticAutoencoder.from_pretrained(tmp_path / "m", progress=False)._steps("reconstruct", None) == 2


def test_save_image_needs_an_image_suffix(tmp_path):
    from semdiff.images import save_image

    with pytest.raises(ValueError, match="image suffix"):
        save_image(torch.zeros(3, 4, 4), tmp_path / "no_suffix")
    assert not (tmp_path / "no_suffix").exists()
    out = save_image(torch.ones(3, 4, 4), tmp_path / "a.png")
    assert np.asarray(Image.open(out)).min() == 255
