"""DiffuseVAE through the public API, on models converted from official-layout checkpoints."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from diffusevae_helpers import convert_fixture, fixture_json, load_fixture
from semdiff import SemanticAutoencoder
from semdiff.families.base import FeatureNotSupported
from semdiff.families.diffusevae import DiffuseVAE
from semdiff.families.diffusevae.prior import fit_gmm, sample_gmm
from semdiff.io import load_model_folder, save_model_folder

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

J = fixture_json()
TOL = J["tolerances"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusevae")
    return {
        ("form1", "unet"): convert_fixture(tmp / "f1", "form1"),
        ("form2", "unet"): convert_fixture(tmp / "f2", "form2"),
        ("form1", "unet_z"): convert_fixture(tmp / "f1z", "form1", unet="unet_z"),
    }


def _model(folders, form="form1", unet="unet") -> SemanticAutoencoder:
    return SemanticAutoencoder.from_pretrained(folders[(form, unet)], progress=False)


def _z() -> torch.Tensor:
    return load_fixture()["out.vae.z"].flatten(1)


# ---------------------------------------------------------------------------------------------
# encode


def test_encode_returns_the_posterior_mean_or_a_draw(folders):
    d, m = load_fixture(), _model(folders)
    z = m.encode(d["in.x01"])
    assert z.shape == (2, 48)
    assert (z - d["out.vae.mu"].flatten(1)).abs().max() <= TOL["out.vae.mu"]
    a = m.encode(d["in.x01"], sample=True, generator=torch.Generator().manual_seed(3))
    b = m.encode(d["in.x01"], sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, z)
    eps = torch.randn((2, 48, 1, 1), generator=torch.Generator().manual_seed(3))
    mu, logvar = d["out.vae.mu"], d["out.vae.logvar"]
    assert torch.allclose(a, (mu + eps * torch.exp(0.5 * logvar)).flatten(1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# decode with a given x_T: every run of the fixture, with each sampler option


# every sampler option in both forms (all eleven runs are checked at family level in the parity tests)
API_RUNS = ["form1_ddpm_fixedsmall", "form2_ddpm_fixedlarge_guided", "form2_ddim_temp", "form1_ddim_quad_guided",
            "form1_ddim_zcond"]


@pytest.mark.parametrize("name", API_RUNS)
def test_decode_with_given_x_T_matches_the_official_run(folders, name):
    run = J["runs"][name]
    d = load_fixture()
    m = _model(folders, f"form{run['form']}", run["network"])
    options = dict(sampler=run["method"], spacing=run["skip"], guidance_weight=run["guidance_weight"],
                   temperature=run["temp"], variance=run["variance"])
    if run["method"] == "ddpm":
        options["ddpm_noise"] = d["in.ddpm_latents"]
    out = m.decode(_z(), d[f"out.{name}.x_T"], steps=run["steps"], **options)
    assert out.shape == (2, 3, 32, 32)
    diff = (out * 2 - 1 - d[f"out.{name}.sample"]).abs().max().item()
    assert diff <= TOL[f"out.{name}.sample"] + 1e-6, diff


@pytest.mark.parametrize("form", ["form1", "form2"])
def test_decode_without_x_T_starts_where_the_official_code_does(folders, form):
    m = _model(folders, form)
    z = _z()
    drawn = m.decode(z, steps=2, temperature=0.5, generator=torch.Generator().manual_seed(7))
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    cond = m.family.vae_reconstruction(z)
    x_T = 0.5 * noise + (cond if form == "form2" else 0)
    assert torch.equal(drawn, m.decode(z, x_T, steps=2))
    torch.testing.assert_close(m.family.start_state(z, noise, temperature=0.5), x_T, atol=1e-6, rtol=0)


def test_ancestral_sampler_draws_from_the_generator(folders):
    m, z = _model(folders, "form2"), _z()
    x_T = load_fixture()["out.form2_ddim.x_T"]
    a = m.decode(z, x_T, steps=5, sampler="ddpm", variance="fixedsmall", generator=torch.Generator().manual_seed(1))
    b = m.decode(z, x_T, steps=5, sampler="ddpm", variance="fixedsmall", generator=torch.Generator().manual_seed(1))
    c = m.decode(z, x_T, steps=5, sampler="ddpm", variance="fixedsmall", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    e1 = m.decode(z, x_T, steps=5, eta=1.0, generator=torch.Generator().manual_seed(1))
    e0 = m.decode(z, x_T, steps=5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(e1, e0)
    fixed = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    f1 = m.decode(z, x_T, steps=5, eta=1.0, ddpm_noise=fixed, generator=torch.Generator().manual_seed(1))
    f2 = m.decode(z, x_T, steps=5, eta=1.0, ddpm_noise=fixed, generator=torch.Generator().manual_seed(2))
    assert torch.equal(f1, f2)  # fixed per-step noise replaces the generator's


def test_z_conditioned_model_decodes_a_batch_of_one(folders):
    m = _model(folders, "form1", "unet_z")
    x_T = load_fixture()["out.form1_ddim_zcond.x_T"]
    one = m.decode(_z()[:1], x_T[:1], steps=2)
    assert one.shape == (1, 3, 32, 32)
    assert torch.allclose(one, m.decode(_z(), x_T, steps=2)[:1], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# encode_stochastic: DDIM inversion around x̂


@pytest.fixture(scope="module")
def constant_eps_folders(folders, tmp_path_factory):
    """The tiny models with eps(x, t) = constant: DDIM inversion is then exact, in both forms."""
    out = {}
    for form in ("form1", "form2"):
        family = load_model_folder(folders[(form, "unet")])
        for name, p in family.unet.named_parameters():
            p.data.zero_()
            if name == "out.2.bias":
                p.data.copy_(torch.tensor([0.1, -0.2, 0.05]))
        out[form] = save_model_folder(family, tmp_path_factory.mktemp(f"const_{form}"))
    return out


@pytest.mark.parametrize("form", ["form1", "form2"])
@pytest.mark.parametrize("options", [dict(), dict(spacing="quad", guidance_weight=0.5)])
def test_encode_stochastic_inverts_decode(constant_eps_folders, form, options):
    m = SemanticAutoencoder.from_pretrained(constant_eps_folders[form], progress=False)
    x01 = load_fixture()["in.x01"] * 0.9 + 0.05
    z = m.encode(x01)
    x_T = m.encode_stochastic(x01, z, steps=5, **options)
    cond = m.family.vae_reconstruction(z)
    expected_centre = cond if form == "form2" else 0  # the actual start state contains x̂ in Form-2
    assert (x_T - expected_centre).abs().mean() < 0.5
    rec = m.decode(z, x_T, steps=5, **options)
    assert (rec - x01).abs().max() < 2e-5


def test_reconstruct_interpolate_with_x_T_fixed(folders):
    m = _model(folders, "form2")
    d = load_fixture()
    rec = m.reconstruct(d["in.x01"], steps=2, inversion_steps=2)
    assert rec.shape == (2, 3, 32, 32) and 0 <= rec.min() and rec.max() <= 1
    z = m.encode(d["in.x01"])
    x_T = m.encode_stochastic(d["in.x01"], z, steps=2)
    frames = m.interpolate((z[0], x_T[0]), (z[1], x_T[1]), num=3, steps=2)
    assert frames.shape == (3, 3, 32, 32)
    # inverted codes are decoded without the official x0 clamp (the round trip needs it)
    assert m.family.inverted_decode_options == {"clip_denoised": False}
    exact = {"clip_denoised": False}
    assert torch.allclose(frames[0], m.decode(z[:1], x_T[:1], steps=2, **exact)[0], atol=1e-5)
    assert torch.allclose(frames[2], m.decode(z[1:], x_T[:1], steps=2, **exact)[0], atol=1e-5)  # x_T of the first end
    mid = m.decode(((z[0] + z[1]) / 2)[None], x_T[:1], steps=2, **exact)[0]
    assert torch.allclose(frames[1], mid, atol=1e-5)
    assert torch.equal(rec, m.decode(z, x_T, steps=2, **exact))


def test_manipulate_with_an_attached_classifier(folders, tmp_path):
    family = load_model_folder(folders[("form1", "unet")])
    config = {**family.get_config(), "attributes": ["smiling", "young"], "has_code_stats": True}
    edited = DiffuseVAE(config)
    missing, unexpected = edited.load_state_dict(family.state_dict(), strict=False)
    assert set(missing) == {"classifier.weight", "classifier.bias", "codes_mean", "codes_std"} and not unexpected
    g = torch.Generator().manual_seed(0)
    edited.classifier.weight.data = torch.randn(2, 48, generator=g)
    edited.classifier.bias.data.zero_()
    edited.codes_mean.copy_(torch.randn(1, 48, generator=g) * 0.1)
    edited.codes_std.copy_(torch.rand(1, 48, generator=g) + 0.5)
    folder = save_model_folder(edited, tmp_path / "with_cls")
    m = SemanticAutoencoder.from_pretrained(folder, progress=False)
    assert m.attributes == ["smiling", "young"]
    z, x_T = _z(), load_fixture()["out.form1_ddim.x_T"]
    out = m.manipulate((z, x_T), "smiling", scale=0.5, steps=2)
    z_edit = m.family.edit_codes(z, {"smiling": 0.5})
    assert torch.allclose(out, m.decode(z_edit, x_T, steps=2, clip_denoised=False), atol=1e-6)
    assert (m.classify(z_edit)["smiling"] > m.classify(z)["smiling"]).all()
    kept = m.family.edit_codes(z, {"smiling": 0.5}, keep=["young"])
    assert torch.allclose(m.family.classify(kept)[:, 1], m.family.classify(z)[:, 1], atol=1e-4)
    from_images = m.manipulate(load_fixture()["in.x01"], "smiling", scale=0.5, steps=2, inversion_steps=2)
    assert from_images.shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Priors: N(0, I) and the Ex-PDE Gaussian mixture


def test_fit_gmm_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=g) * 0.3 + torch.tensor([3.0, 0, 0, 0])
    b = torch.randn(100, 4, generator=g) * torch.tensor([0.5, 1.0, 0.2, 0.2]) - torch.tensor([3.0, 0, 0, 0])
    for ct in ("full", "diag"):
        gmm = fit_gmm(torch.cat([a, b]), 2, covariance_type=ct, seed=0)
        order = gmm.means[:, 0].argsort(descending=True)
        assert torch.allclose(gmm.weights[order], torch.tensor([0.75, 0.25]), atol=0.02)
        assert torch.allclose(gmm.means[order][:, 0], torch.tensor([3.0, -3.0]), atol=0.15)
        draws = gmm.sample(4000, generator=torch.Generator().manual_seed(1))
        assert abs(draws[:, 0].mean().item() - 1.5) < 0.15
        assert gmm.converged
    with pytest.raises(ValueError, match="at least one latent per component"):
        fit_gmm(torch.randn(3, 4), 5)
    full = fit_gmm(torch.cat([a, b]), 2, covariance_type="full", seed=0)
    assert torch.equal(sample_gmm(full.weights, full.means, full.covariances, "full", 5,
                                  generator=torch.Generator().manual_seed(2)),
                       full.sample(5, generator=torch.Generator().manual_seed(2)))


def _write_images(folder, n=12):
    folder.mkdir()
    d = load_fixture()
    g = torch.Generator().manual_seed(0)
    imgs = torch.cat([d["in.x01"], torch.rand(n - 2, 3, 32, 32, generator=g)])
    for i, img in enumerate(imgs):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
    return folder


def _fit_prior_cli(argv) -> int:
    from semdiff.cli import prior

    parser = argparse.ArgumentParser(prog="semdiff")
    prior.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_fit_prior_and_sample_with_both_priors(folders, tmp_path, covariance):
    images = _write_images(tmp_path / "images")
    out = tmp_path / "with_prior"
    assert _fit_prior_cli(["fit-prior", str(folders[("form2", "unet")]), str(images), "--out", str(out),
                           "--components", "2", "--covariance", covariance, "--seed", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prior_gmm"]["components"] == 2 and config["prior_gmm"]["covariance_type"] == covariance
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        covs = f.get_tensor("prior_gmm_covs")
    assert {"prior_gmm_weights", "prior_gmm_means", "prior_gmm_covs"} <= keys
    assert covs.shape == ((2, 48, 48) if covariance == "full" else (2, 48))
    assert not any(p.suffix in (".pkl", ".joblib") for p in out.iterdir())

    m = SemanticAutoencoder.from_pretrained(out, progress=False)
    fam = m.family
    assert fam.available_priors == ["normal", "gmm"]
    gmm_z = fam.sample_codes(3000, generator=torch.Generator().manual_seed(0))  # default: the mixture
    expected_mean = (fam.prior_gmm_weights[:, None] * fam.prior_gmm_means).sum(0)
    assert (gmm_z.mean(0) - expected_mean).abs().max() < 0.25
    normal_z = fam.sample_codes(3000, generator=torch.Generator().manual_seed(0), prior="normal")
    assert normal_z.mean().abs() < 0.05 and (normal_z.std() - 1).abs() < 0.05
    images_gmm, z, x_T = m.sample(2, steps=2, generator=torch.Generator().manual_seed(5), prior="gmm",
                                  return_codes=True)
    assert images_gmm.shape == (2, 3, 32, 32)
    assert torch.equal(images_gmm, m.decode(z, x_T, steps=2))  # the drawn x_T decodes the same again
    images_normal = m.sample(2, steps=2, generator=torch.Generator().manual_seed(5), prior="normal")
    assert not torch.equal(images_gmm, images_normal)
    # the original folder is untouched and has only the normal prior
    plain = _model(folders, "form2")
    with pytest.raises(FeatureNotSupported, match="fit-prior"):
        plain.sample(1, steps=2, prior="gmm")
    assert plain.sample(1, steps=2, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Options a family does not have, and wrong ones


def test_options_are_validated_not_ignored(folders):
    m, z = _model(folders), _z()
    x_T = load_fixture()["out.form1_ddim.x_T"]
    with pytest.raises(FeatureNotSupported, match="no option"):
        m.decode(z, x_T, steps=2, clip_noise=True)
    with pytest.raises(ValueError, match="variance applies to the ancestral sampler"):
        m.decode(z, x_T, steps=2, sampler="ddim", variance="fixedsmall")
    with pytest.raises(ValueError, match="eta applies to the DDIM sampler"):
        m.decode(z, x_T, steps=2, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        m.decode(z, x_T, steps=2, sampler="euler")
    with pytest.raises(ValueError, match="variance must be one of"):
        m.decode(z, x_T, steps=2, sampler="ddpm", variance="learned")
    with pytest.raises(ValueError, match="cannot create exactly 60 steps with an integer stride"):
        m.decode(z, x_T, steps=60)
    with pytest.raises(ValueError, match="spacing must be one of"):
        m.decode(z, x_T, steps=2, spacing="ddim")
    with pytest.raises(ValueError, match=r"ddpm_noise must have shape \(10, 3, 32, 32\)"):
        m.decode(z, x_T, steps=10, sampler="ddpm", ddpm_noise=torch.zeros(10, 2, 3, 32, 32))
    with pytest.raises(FeatureNotSupported, match="cannot be inverted|only the deterministic DDIM"):
        m.encode_stochastic(load_fixture()["in.x01"], z, steps=2, sampler="ddpm")
    with pytest.raises(FeatureNotSupported, match="temperature"):
        m.encode_stochastic(load_fixture()["in.x01"], z, steps=2, temperature=0.5)
    with pytest.raises(ValueError, match="prior must be one of"):
        m.family.sample_codes(2, prior="flow")
    with pytest.raises(ValueError, match="temperature"):
        m.decode(z, steps=2, temperature=-1.0)


def test_config_round_trip_and_meta_construction(folders):
    family = load_model_folder(folders[("form2", "unet")])
    config = family.get_config()
    assert config["form"] == "form2" and config["family"] == "diffusevae"
    with torch.device("meta"):
        again = DiffuseVAE(config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in family.state_dict().items()}
    assert family.schedule.betas.device.type == "cpu" and again.schedule.betas.device.type == "cpu"
    assert family.stochastic_shape() == (3, 32, 32) and family.code_dim == 48
