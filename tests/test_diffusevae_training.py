"""DiffuseVAE trained by ``semdiff train``: the objective's stages, the export, and the bundled emoji model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NAME = "semdiff-emoji32-diffusevae"
BUNDLE = ROOT / "semdiff" / "pretrained" / NAME

needs_bundle = pytest.mark.skipif(not (BUNDLE / "model.safetensors").is_file(),
                                  reason=f"the bundled {NAME} is not in this checkout")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------
# the objective on the tiny preset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from semdiff.training.config import TrainConfig
    from semdiff.training.data import load_data
    from semdiff.training.objectives import get_objective
    from semdiff.training.trainer import train

    out = tmp_path_factory.mktemp("dvtrain") / "run"
    cfg = TrainConfig.from_preset("tiny-diffusevae", out=str(out), num_threads=1, progress=False)
    data = load_data(cfg.data, cfg.image_size, split="train", holdout=cfg.holdout, limit=cfg.data_limit, seed=cfg.seed)
    objective = get_objective("diffusevae")
    torch.manual_seed(cfg.seed)
    initial = objective.build_model(cfg, data)  # the trainer's initialisation (same seed)
    folder = train(cfg)
    return {"cfg": cfg, "data": data, "initial": initial, "folder": folder, "out": out}


def _loss_on(fn, model, images, seed=123, repeats=4):
    """The loss on a fixed batch with fixed noise (averaged over a few fixed draws of t / eps)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(sum(fn(model, None, images)[0] for _ in range(repeats)) / repeats)


def test_preset_and_objective_are_registered():
    from semdiff.training.config import TrainConfig
    from semdiff.training.objectives import get_objective

    cfg = TrainConfig.from_preset("emoji32-diffusevae")
    assert cfg.family == "diffusevae" and cfg.data == "emoji" and cfg.image_size == 32
    assert [s.name for s in get_objective("diffusevae").stages(cfg)] == ["vae", "ddpm"]
    base = TrainConfig.from_preset("emoji32-diffusevae-uncond")
    assert base.model["unet"] == cfg.model["unet"] and base.prior_steps == cfg.prior_steps
    assert base.model["train"]["condition"] == "none"
    from semdiff.families.diffusevae.training import split_model_spec

    with pytest.raises(ValueError, match="condition"):
        split_model_spec({"train": {"condition": "bogus"}})
    with pytest.raises(ValueError, match="unknown"):
        split_model_spec({"train": {"kl": 1}})


def test_tiny_preset_trains_both_stages_and_losses_decrease(tiny_run):
    from semdiff.families.diffusevae.training import ddpm_loss, vae_loss
    from semdiff.io import load_model_folder

    initial, data = tiny_run["initial"], tiny_run["data"]
    final = load_model_folder(tiny_run["folder"]).eval()
    batch = data.images[:16]
    # stage 1: the VAE's ELBO on a fixed batch
    before, after = _loss_on(vae_loss, initial, batch), _loss_on(vae_loss, final, batch)
    assert after < 0.8 * before, (before, after)
    # stage 2: the UNet's eps-MSE given the (final, frozen) VAE: initial UNet vs trained UNet
    mixed = load_model_folder(tiny_run["folder"]).eval()
    mixed.unet.load_state_dict(initial.unet.state_dict())
    before, after = _loss_on(ddpm_loss, mixed, batch), _loss_on(ddpm_loss, final, batch)
    assert after < 0.7 * before, (before, after)
    # the log has both stages, and the previews were written
    log = [json.loads(line) for line in (tiny_run["out"] / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vae", "ddpm"}
    assert (tiny_run["out"] / "samples" / "ddpm-0000030.png").is_file()


def test_the_ddpm_stage_fits_the_mixture_prior_on_the_frozen_vae(tiny_run):
    from semdiff.io import load_model_folder

    final = load_model_folder(tiny_run["folder"])
    assert final.prior_gmm and final.prior_gmm["components"] == 2
    assert final.available_priors == ["normal", "gmm"]
    # fitted, not the N(0, I) placeholder: means away from 0, variances away from 1
    assert final.prior_gmm_means.abs().max() > 1e-3
    assert (final.prior_gmm_covs - 1).abs().max() > 1e-3
    assert torch.allclose(final.prior_gmm_weights.sum(), torch.tensor(1.0), atol=1e-5)
    # the frozen VAE of stage 2 is the stage-1 result: the export's VAE reproduces its codes' mixture
    from semdiff.families.diffusevae.training import encode_samples

    z = encode_samples(final, tiny_run["data"].images, torch.Generator().manual_seed(tiny_run["cfg"].seed))
    assert torch.allclose(z.mean(0), (final.prior_gmm_weights[:, None] * final.prior_gmm_means).sum(0), atol=1e-3)


def test_export_loads_by_api_and_round_trips(tiny_run, tmp_path):
    from semdiff import SemanticAutoencoder
    from semdiff.io import load_model_folder, save_model_folder
    from semdiff.training.export import export_bundled, sha256_file

    folder = tiny_run["folder"]
    ae = SemanticAutoencoder.from_pretrained(str(folder), device="cpu", progress=False)
    assert ae.family_name == "diffusevae"
    x = tiny_run["data"].float_images()[:4]
    z = ae.encode(x)
    x_T = ae.encode_stochastic(x, z, steps=5)
    rec = ae.decode(z, x_T, steps=5)
    assert rec.shape == x.shape and torch.isfinite(rec).all()
    # inversion + decoding beats decoding the same code from random noise
    noise = ae.family.random_stochastic(len(x), generator=torch.Generator().manual_seed(0))
    rec_z = ae.decode(z, ae.family.start_state(z.to(ae.device), noise), steps=5)
    assert _psnr(rec, x).mean() > _psnr(rec_z, x).mean()
    # save -> load gives the same model
    again = save_model_folder(load_model_folder(folder), tmp_path / "again")
    ae2 = SemanticAutoencoder.from_pretrained(str(again), device="cpu", progress=False)
    assert torch.equal(ae2.decode(z, x_T, steps=5), rec)
    # the bundle export: files, manifest fragment with this family's entry, card
    dest = export_bundled(folder, name="tiny-dv", dest_root=tmp_path / "pretrained")
    entry = json.loads((tmp_path / "pretrained" / "manifest_entries.json").read_text())["tiny-dv"]
    assert entry["family"] == "diffusevae" and entry["status"] == "bundled"
    assert entry["paper"]["arxiv"] == "2201.00308"
    for name, info in entry["source"]["files"].items():
        assert sha256_file(dest / name) == info["sha256"]
    card = (dest / "README.md").read_text()
    assert "DiffuseVAE" in card and "CC BY-SA 4.0" in card and "| vae | 30 |" in card


def test_unconditional_baseline_ignores_the_condition(tmp_path):
    from semdiff.training.config import TrainConfig
    from semdiff.training.data import load_data
    from semdiff.training.objectives import get_objective

    cfg = TrainConfig.from_preset("tiny-diffusevae", model={"train": {"condition": "none", "gmm_components": 0}})
    data = load_data(cfg.data, cfg.image_size, split="train", limit=32)
    objective = get_objective("diffusevae")
    model = objective.build_model(cfg, data)
    assert model.prior_gmm is None
    seen = []
    real_forward = model.unet.forward
    model.unet.forward = lambda x, t, cond, *a, **k: (seen.append(cond.abs().max().item()), real_forward(x, t, cond))[1]
    objective.loss_module(objective.stages(cfg)[1], model)(images=data.images[:4])
    assert seen == [0.0]


# ------------------------------------------------------------------------------------------------
# the bundled model


@needs_bundle
def test_bundled_entry_matches_its_files():
    from semdiff.manifest import validate_entry
    from semdiff.training.export import sha256_file

    manifest = json.loads((ROOT / "semdiff" / "weights_manifest.json").read_text())
    entry = manifest["models"][NAME]
    assert entry["family"] == "diffusevae" and entry["status"] == "bundled"
    assert validate_entry(NAME, entry) == []
    total = 0
    for name, info in entry["source"]["files"].items():
        path = ROOT / "semdiff" / entry["source"]["path"] / name
        assert path.stat().st_size == info["size"]
        assert sha256_file(path) == info["sha256"]
        total += info["size"]
    assert total < 6_500_000  # the wheel has to stay small
    assert "DiffuseVAE" in (BUNDLE / "README.md").read_text()


@pytest.fixture(scope="module")
def bundled(monkeypatch_module):
    from semdiff import SemanticAutoencoder

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("SEMDIFF_OFFLINE", "1")
    return SemanticAutoencoder.from_pretrained(NAME, device="cpu", progress=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@needs_bundle
def test_bundled_model_reconstructs_held_out_emoji(bundled):
    from semdiff.training.data import load_data

    ae = bundled
    assert ae.family_name == "diffusevae" and ae.image_size == 32
    test = load_data("emoji", 32, split="test", holdout=0.1)
    x = test.float_images()[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:8]]
    z = ae.encode(x)
    assert z.shape == (8, ae.family.code_dim)
    # inversion and decode both unclipped (what reconstruct() does): near-exact, better with more steps
    rec10 = ae.reconstruct(x, steps=10, inversion_steps=10)
    rec = ae.reconstruct(x, steps=50, inversion_steps=50)
    x_T = ae.encode_stochastic(x, z, steps=50)
    assert torch.equal(rec, ae.decode(z, x_T, steps=50, clip_denoised=False))
    clipped = ae.decode(z, x_T, steps=50)  # the official clamp of x0 breaks the round trip of this model
    noise = ae.family.random_stochastic(len(x), generator=torch.Generator().manual_seed(1))
    rec_z = ae.decode(z, ae.family.start_state(z.to(ae.device), noise), steps=50)
    p_inv, p_z = _psnr(rec, x), _psnr(rec_z, x)
    assert p_inv.min() > 28.0, p_inv
    assert p_inv.mean() > _psnr(rec10, x).mean() + 3.0
    assert p_inv.mean() > _psnr(clipped, x).mean() + 10.0
    # the inverted x_T carries what the 1x1 latent cannot hold: it beats a random start on the same code
    assert p_inv.mean() > p_z.mean() + 10.0, (p_inv, p_z)
    # and the VAE's x̂ = VAE(z) is a (blurry) reconstruction: far better than another image's x̂
    with torch.no_grad():
        xhat = (ae.family.vae_reconstruction(z.to(ae.device)).cpu().clamp(-1, 1) + 1) / 2
    assert _psnr(xhat, x).mean() > _psnr(xhat.roll(1, 0), x).mean() + 2.0


@needs_bundle
@pytest.mark.parametrize("prior", ["normal", "gmm"])
def test_bundled_model_samples_with_both_priors(bundled, prior):
    ae = bundled
    assert prior in ae.family.available_priors
    images = ae.sample(4, steps=10, prior=prior, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a flat image
    assert not math.isnan(float(images.mean()))


@needs_bundle
def test_example_runs_on_the_bundled_model(tmp_path):
    import os
    import re
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "dv.png"
    env = dict(os.environ, SEMDIFF_PROGRESS="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "diffusevae_emoji.py"), "--steps", "30",
                           "--sample-steps", "5", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x_hat, z_only, rec = map(float, re.search(
        r"x_hat ([\d.]+) dB, z with random x_T ([\d.]+) dB, reconstruction ([\d.]+) dB", proc.stdout).groups())
    assert rec > x_hat + 10 and rec > z_only + 10  # the inverted x_T carries the detail
    width, height = Image.open(out).size
    assert width > 8 * 32 and height > 7 * 32


def test_evaluate_reports_sample_quality_for_both_priors(tiny_run):
    from semdiff import SemanticAutoencoder
    from semdiff.evaluation import sample_quality
    from semdiff.training.data import load_data
    from semdiff.training.export import compact_metrics

    ae = SemanticAutoencoder.from_pretrained(str(tiny_run["folder"]), device="cpu", progress=False)
    assert ae.family.available_priors == ["normal", "gmm"]
    cfg = tiny_run["cfg"]
    test = load_data(cfg.data, cfg.image_size, split="test", holdout=cfg.holdout, limit=cfg.data_limit, seed=cfg.seed)
    sq = sample_quality(ae, tiny_run["data"], test, num_samples=16, steps=2)
    by_prior = sq["semdiff_fd_samples_vs_heldout_by_prior"]
    assert set(by_prior) == {"normal", "gmm"} and all(v >= 0 for v in by_prior.values())
    assert by_prior["normal"] != by_prior["gmm"]  # different codes, different samples
    # the default prior's figure is the same computation as its entry by prior (same seed): sampling
    # without ``prior`` is sampling from ``default_prior``
    default = ae.family.default_prior
    assert default == ("gmm" if ae.family.prior_gmm else "normal") == "gmm"
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(ae.sample(4, steps=2, generator=g(), progress=False),
                       ae.sample(4, steps=2, generator=g(), prior=default, progress=False))
    assert abs(by_prior[default] - sq["semdiff_fd_samples_vs_heldout"]) < 1e-6
    compact = compact_metrics({"data": {"split": "test", "items": len(test)}, "sample_quality": sq})
    assert compact["semdiff_fd_samples_vs_heldout_gmm"] == round(by_prior["gmm"], 3)
