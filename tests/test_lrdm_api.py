"""LRDM through the public API: a converted tiny official-layout checkpoint (the parity fixture's
networks + a tiny VQ first stage, 64x64 images, latent 3x16x16, r 4x8x8) loaded with
``SemanticAutoencoder.from_pretrained``, and a tiny t-LRDM."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from lrdm_helpers import INV_SCALE, SCALE, fixture_configs, fixture_meta, load_fixture, official_state, tiny_vq, \
    write_lightning_checkpoint
from semdiff import SemanticAutoencoder
from semdiff.families.base import FeatureNotSupported
from semdiff.families.lrdm import LRDM
from semdiff.families.lrdm.convert import convert_lrdm_checkpoint
from semdiff.families.lrdm.networks import RepresentationAE, RepresentationConfig
from semdiff.io import save_model_folder

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


@pytest.fixture(scope="module")
def vq():
    return tiny_vq()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fx, vq):
    root = tmp_path_factory.mktemp("lrdm_api")
    meta = fixture_meta()
    (root / "run-project.yaml").write_text(json.dumps({"model": {"params": {
        "diffusion_model_config": meta["unet_config (DiffusionUNetReprCond)"],
        "representation_ae_config": meta["encoder_config (RepresentationAE)"]}}}))
    ckpt = write_lightning_checkpoint(root / "last.ckpt", official_state(fx, vq=vq))
    return convert_lrdm_checkpoint(ckpt, root / "model")


@pytest.fixture(scope="module")
def model(folder):
    return SemanticAutoencoder.from_pretrained(folder, progress=False)


@pytest.fixture(scope="module")
def reference(fx):
    """The fixture's representation model, built directly (the parity tests check it against the official one)."""
    _, rep = fixture_configs()
    ae = RepresentationAE(RepresentationConfig.from_dict(rep)).eval()
    ae.load_state_dict({k[len("encoder."):]: v for k, v in fx.items() if k.startswith("encoder.")})
    return ae


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def close(a, b, atol=TOL):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def test_loads_as_lrdm(model):
    assert model.family_name == "lrdm"
    assert model.image_size == 64 and model.code_dim == 4 * 8 * 8 and model.has_prior
    assert model.family.stochastic_shape() == (3, 16, 16)
    assert model.family.decode_options == {"sampler", "eta", "noise", "sample_r"}
    assert model.family.stochastic_interpolation == "slerp" and model.family.code_interpolation == "slerp"


def test_encode_mean_and_sample(model, vq, reference, images):
    x = images * 2 - 1
    with torch.no_grad():
        z0 = vq.encode(x).latents * SCALE
        mean, logvar = reference.encode(z0)
    z = model.encode(images)
    close(z, mean.flatten(1))
    assert torch.equal(model.encode(images), z)  # the mean: deterministic
    zs = model.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    close(zs, (mean + torch.exp(0.5 * logvar) * noise).flatten(1))
    assert (zs - z).abs().max() > 1e-2


def _official_ddpm_latent(model, z, z_T, noise):
    """The official PC sampler (ddpm_x0_sampling, float32 VPSDE tables), written out."""
    betas = torch.linspace(0.1 / 1000, 20 / 1000, 1000)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    feats = model.family.features(z.view(-1, 4, 8, 8))
    x = z_T
    for i, step in enumerate(range(999, -1, -1)):
        x0 = model.family.unet(x, torch.full((x.shape[0],), step), feats)
        w0 = torch.sqrt(abar[step]) * betas[step] / (torch.sqrt(alphas[step]) * (1.0 - abar[step]))
        wx = torch.sqrt(alphas[step]) * (1.0 - abar[step] / alphas[step]) / (1.0 - abar[step])
        mean = w0 * x0 + wx * x
        x = mean + torch.sqrt(betas[step]) * noise[i]
    return mean


def test_decode_ddpm_1000_is_the_official_sampler(model, vq, images):
    z = model.encode(images)
    g = torch.Generator().manual_seed(11)
    z_T = torch.randn(2, 3, 16, 16, generator=g)
    noise = torch.randn(1000, 2, 3, 16, 16, generator=g)
    out = model.decode(z, z_T, steps=1000, sampler="ddpm", noise=noise)
    with torch.no_grad():
        latent = _official_ddpm_latent(model, z, z_T, noise)
        expected = (vq.decode(latent * torch.tensor(INV_SCALE)).sample + 1) / 2
    assert out.shape == (2, 3, 64, 64)
    close(out, expected.clamp(0, 1), 1e-4)
    # without fixed noise the generator drives it, reproducibly
    a = model.decode(z, z_T, steps=20, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    b = model.decode(z, z_T, steps=20, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_decode_ddim_any_step_count(model, vq, images):
    z = model.encode(images)
    z_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = model.decode(z, z_T, steps=10)  # the default sampler: DDIM, eta 0
    # written out: x0 predictor, t = 900, 800, ..., 0; eps from x0; abar_prev = 1 at the end
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    with torch.no_grad():
        feats = model.family.features(z.view(-1, 4, 8, 8))
        x = z_T
        ts = list(range(0, 1000, 100))
        for i in reversed(range(10)):
            a, a_prev = abar[ts[i]].item(), abar[ts[i - 1]].item() if i else 1.0
            x0 = model.family.unet(x, torch.full((2,), ts[i]), feats)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        expected = (vq.decode(x * torch.tensor(INV_SCALE)).sample + 1) / 2
    close(out, expected.clamp(0, 1), 1e-4)
    assert torch.equal(model.decode(z, z_T, steps=10, sampler="ddim"), out)
    odd = model.decode(z, z_T, steps=7)  # not a divisor of 1000: still fine
    assert odd.shape == out.shape and torch.isfinite(odd).all()
    e1 = model.decode(z, z_T, steps=10, eta=1.0, generator=torch.Generator().manual_seed(4))
    e2 = model.decode(z, z_T, steps=10, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(e1, e2) and not torch.equal(e1, out)


def test_decode_option_errors(model, images):
    z = model.encode(images[:1])
    with pytest.raises(FeatureNotSupported, match="no option"):
        model.decode(z, steps=2, guidance=3.0)
    with pytest.raises(FeatureNotSupported, match="sample_r"):
        model.decode(z, steps=2, sample_r=True)
    with pytest.raises(FeatureNotSupported, match="ddpm"):
        model.decode(z, steps=2, noise=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="sampler"):
        model.decode(z, steps=2, sampler="euler")
    with pytest.raises(ValueError, match="noise must have shape"):
        model.decode(z, steps=3, sampler="ddpm", noise=torch.zeros(2, 3, 16, 16))
    with pytest.raises(FeatureNotSupported):
        model.encode_stochastic(images[:1], z, steps=2, clip=True)


def test_encode_stochastic_and_reconstruct(model, images):
    z = model.encode(images)
    x_T = model.encode_stochastic(images, z, steps=8)
    assert x_T.shape == (2, 3, 16, 16) and torch.isfinite(x_T).all()
    assert torch.equal(model.encode_stochastic(images, z, steps=8), x_T)
    rec = model.reconstruct(images, steps=8, inversion_steps=8)
    assert rec.shape == (2, 3, 64, 64)
    assert torch.equal(rec, model.decode(z, x_T, steps=8))


def test_interpolate(model, images):
    a, b = images[:1], images[1:]
    out = model.interpolate(a, b, num=3, steps=4, inversion_steps=4)
    assert out.shape == (3, 3, 64, 64)
    za, zb = model.encode(a), model.encode(b)
    xa, xb = model.encode_stochastic(a, za, steps=4), model.encode_stochastic(b, zb, steps=4)
    close(out[0], model.decode(za, xa, steps=4)[0], 1e-5)
    close(out[-1], model.decode(zb, xb, steps=4)[0], 1e-5)
    # codes: slerp (the official default) or lerp of the representation
    alpha = torch.tensor([0.0, 0.5, 1.0])
    s = model.family.interpolate_codes(za[0], zb[0], alpha)
    lin = model.family.interpolate_codes(za[0], zb[0], alpha, mode="lerp")
    close(s[0], za[0]), close(s[-1], zb[0]), close(lin[1], (za[0] + zb[0]) / 2)
    theta = torch.arccos(torch.nn.functional.cosine_similarity(za[0], zb[0], dim=0))
    close(s[1], (za[0] + zb[0]) * torch.sin(theta / 2) / torch.sin(theta), 1e-4)
    assert (s[1] - lin[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="slerp"):
        model.family.interpolate_codes(za[0], zb[0], alpha, mode="cubic")
    if "mode" in inspect.signature(model.interpolate).parameters:  # the API may expose the choice
        lerped = model.interpolate((za, xa), (zb, xb), num=3, steps=4, mode="lerp")
        slerped = model.interpolate((za, xa), (zb, xb), num=3, steps=4, mode="slerp")
        assert not torch.equal(lerped[1], slerped[1])


def test_sample_draws_r_from_the_prior(model):
    images, z, x_T = model.sample(2, steps=4, generator=torch.Generator().manual_seed(9), return_codes=True)
    assert images.shape == (2, 3, 64, 64) and z.shape == (2, 256)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(x_T, torch.randn(2, 3, 16, 16, generator=g))  # x_T first (the API's order) ...
    assert torch.equal(z, torch.randn(2, 4, 8, 8, generator=g).flatten(1))  # ... then r ~ N(0, I)
    again = model.sample(2, steps=4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(again, images)


def test_save_pretrained_round_trip(model, images, tmp_path):
    model.save_pretrained(tmp_path / "copy")
    other = SemanticAutoencoder.from_pretrained(tmp_path / "copy", progress=False)
    assert torch.equal(other.encode(images), model.encode(images))
    assert float(other.family.scale_factor) == SCALE
    z_T = torch.zeros(2, 3, 16, 16)
    assert torch.equal(other.decode(model.encode(images), z_T, steps=3), model.decode(model.encode(images), z_T, steps=3))


# ---------------------------------------------------------------------------------------------
# t-LRDM


@pytest.fixture(scope="module")
def tlrdm(tmp_path_factory, vq):
    unet, rep = fixture_configs()
    for part in ("encoder", "decoder"):
        rep[part] = {**rep[part], "time_conditional": True, "embedding_type": "positional"}
    config = {"unet": unet, "representation": rep, "first_stage": dict(vq.config)}
    torch.manual_seed(0)
    family = LRDM(config)
    with torch.no_grad():  # official init zeroes the output convs: re-draw so every path matters
        for name, p in family.named_parameters():
            if not name.startswith("first_stage."):
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1 * torch.randn_like(p))
        family.first_stage.load_state_dict(vq.state_dict())
        family.scale_factor.fill_(SCALE)
        family.inverse_scale_factor.fill_(INV_SCALE)
    folder = save_model_folder(family, tmp_path_factory.mktemp("tlrdm") / "model")
    return SemanticAutoencoder.from_pretrained(folder, progress=False)


def test_tlrdm_code_is_the_clean_latent(tlrdm, vq, images):
    assert tlrdm.family.time_conditional and tlrdm.code_dim == 3 * 16 * 16
    z = tlrdm.encode(images)
    with torch.no_grad():
        close(z, (vq.encode(images * 2 - 1).latents * SCALE).flatten(1))
    with pytest.raises(FeatureNotSupported, match="sample_r"):
        tlrdm.encode(images, sample=True)


def test_tlrdm_decode_reencodes_at_every_step(tlrdm, images):
    """decode = the official t-LRDM reconstruct: r_t = mean q(r | z0, t), features D_r(r_t, t) per step."""
    fam = tlrdm.family
    z = tlrdm.encode(images)
    z_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = tlrdm.decode(z, z_T, steps=4)
    abar = fam.schedule.alphas_cumprod
    with torch.no_grad():
        z0 = z.view(2, 3, 16, 16)
        x = z_T
        ts = [0, 250, 500, 750]
        for i in reversed(range(4)):
            t = torch.full((2,), ts[i])
            mean, _ = fam.repr_ae.encode(z0, t)
            x0 = fam.unet(x, t, fam.repr_ae.decode(mean, t))
            a, a_prev = abar[ts[i]].item(), abar[ts[i - 1]].item() if i else 1.0
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        expected = (fam.decode_latent(x) + 1) / 2
    close(out, expected.clamp(0, 1), 1e-4)
    r1 = tlrdm.decode(z, z_T, steps=4, sample_r=True, generator=torch.Generator().manual_seed(1))
    r2 = tlrdm.decode(z, z_T, steps=4, sample_r=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2) and not torch.equal(r1, out)


def test_tlrdm_unconditional_sampling_works(tlrdm, monkeypatch):
    """The official code crashes here; semdiff draws one r ~ N(0, I) and decodes D_r(r, t) at every step."""
    seen = []
    decode = tlrdm.family.repr_ae.decode

    def recording(r, t=None):
        seen.append((r.clone(), None if t is None else int(t[0])))
        return decode(r, t)

    monkeypatch.setattr(tlrdm.family.repr_ae, "decode", recording)
    images, z, x_T = tlrdm.sample(2, steps=3, prior_steps=5, generator=torch.Generator().manual_seed(2),
                                  return_codes=True)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert z.shape == (2, tlrdm.code_dim)
    prior_calls = seen[:5]
    assert [t for _, t in prior_calls] == [800, 600, 400, 200, 0]
    assert all(torch.equal(r, prior_calls[0][0]) for r, _ in prior_calls)  # the same r at every step
    g = torch.Generator().manual_seed(2)
    torch.randn(2, 3, 16, 16, generator=g)  # the API's x_T
    assert torch.equal(prior_calls[0][0], torch.randn(2, 4, 8, 8, generator=g))


def test_tlrdm_reconstruct_and_interpolate(tlrdm, images):
    rec = tlrdm.reconstruct(images, steps=3, inversion_steps=3)
    assert rec.shape == (2, 3, 64, 64) and torch.isfinite(rec).all()
    out = tlrdm.interpolate(images[:1], images[1:], num=3, steps=3, inversion_steps=3)
    assert out.shape == (3, 3, 64, 64)
