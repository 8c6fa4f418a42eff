"""LRDM training (first stage + LRDM stages), export, and the bundled semdiff-emoji32-lrdm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semdiff.training import TrainConfig, train
from semdiff.training.data import load_data
from semdiff.training.objectives import get_objective

ROOT = Path(__file__).resolve().parents[1]
NAME = "semdiff-emoji32-lrdm"
BUNDLE = ROOT / "semdiff" / "pretrained" / NAME

needs_bundle = pytest.mark.skipif(not (BUNDLE / "model.safetensors").is_file(),
                                  reason=f"the bundled {NAME} is not in this checkout")


pytestmark = pytest.mark.usefixtures("one_thread")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = (a.float().clamp(0, 1) - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


# ------------------------------------------------------------------------------------------------
# the objective


def test_presets_register_through_the_family_module():
    cfg = TrainConfig.from_preset("lrdm-emoji32")
    assert cfg.family == "lrdm" and cfg.data == "emoji" and cfg.image_size == 32
    assert type(get_objective("lrdm")).__name__ == "LRDMObjective"
    stages = get_objective("lrdm").stages(cfg)
    assert [s.name for s in stages] == ["first_stage", "lrdm"]
    with pytest.raises(ValueError, match="unknown LRDM training option"):
        from semdiff.families.lrdm.training import _train_options

        _train_options({"train": {"first_stage_stpes": 3}})


def test_each_stage_lowers_its_loss_on_a_fixed_batch():
    cfg = TrainConfig.from_preset("lrdm-tiny")
    data = load_data("shapes", 16, limit=16, holdout=0.0, split="all")
    objective = get_objective("lrdm")
    torch.manual_seed(0)
    model = objective.build_model(cfg, data)
    device = torch.device("cpu")
    for stage, steps, lr in zip(objective.stages(cfg), (50, 50), (3e-3, 2e-3)):
        batch = objective.stage_data(stage, model, data, device)
        module = objective.loss_module(stage, model)
        params = list(objective.trainable_parameters(stage, model))
        opt = torch.optim.Adam(params, lr=lr)
        model.train()

        def fixed_loss():
            state = torch.get_rng_state()
            torch.manual_seed(123)  # the same t, noise and r every time
            model.eval()  # no codebook bookkeeping
            with torch.no_grad():
                loss = module(**batch)[0].item()
            model.train()
            torch.set_rng_state(state)
            return loss

        before = fixed_loss()
        for _ in range(steps):
            loss, logs = module(**batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = fixed_loss()
        assert after < 0.6 * before, (stage.name, before, after)
        if stage.name == "lrdm":
            assert float(logs["kl"]) > 0 and float(logs["mse"]) > 0
            # stage_data set the latent scale from the frozen first stage: unit-variance z0
            assert abs(float(batch["latents"].std()) - 1) < 1e-4
            assert abs(float(model.scale_factor * model.inverse_scale_factor) - 1) < 1e-5


def test_dead_codes_are_restarted_from_latents():
    from semdiff.families.lrdm.training import restart_codes

    emb = torch.zeros(8, 3)
    usage = torch.tensor([10.0, 10, 10, 10, 0, 0, 0, 0])
    latents = torch.randn(50, 3) + 5
    assert restart_codes(emb, usage, latents) == 4
    assert (emb[4:].norm(dim=1) > 2).all() and (emb[:4] == 0).all()
    assert bool((usage[4:] > 0).all())
    assert restart_codes(emb, usage, latents) == 0


def test_train_export_and_load(tmp_path):
    from semdiff import SemanticAutoencoder
    from semdiff.training.export import export_bundled, sha256_file

    cfg = TrainConfig.from_preset("lrdm-tiny", out=str(tmp_path / "run"), progress=False, num_threads=1, steps=6,
                                  data_limit=32, ckpt_every=100,
                                  model={"train": {"first_stage_steps": 6, "codebook_restart_every": 2}})
    folder = train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "first_stage-0000006.png", "lrdm-0000006.png"]
    ae = SemanticAutoencoder.from_pretrained(folder, progress=False)
    assert ae.family_name == "lrdm" and ae.image_size == 16 and ae.has_prior
    assert ae.code_dim == 4 * 2 * 2
    recipe = ae.config["training_recipe"]
    assert recipe["first_stage"]["steps"] == 6 and recipe["lrdm"]["kl_weight"] > 0
    assert float(ae.family.scale_factor) != 1.0
    x = load_data("shapes", 16, limit=3, split="all", holdout=0.0).float_images()
    z = ae.encode(x)
    assert z.shape == (3, 16)
    out = ae.decode(z, ae.family.random_stochastic(3, generator=torch.Generator().manual_seed(0)), steps=3)
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()

    dest = export_bundled(folder, name="lrdm-test", dest_root=tmp_path / "pretrained")
    entry = json.loads((tmp_path / "pretrained" / "manifest_entries.json").read_text())["lrdm-test"]
    assert entry["family"] == "lrdm" and entry["paper"]["arxiv"] == "2210.11058"
    assert entry["license"] == "cc-by-sa-4.0" or cfg.data != "emoji"
    for name, info in entry["source"]["files"].items():
        assert sha256_file(dest / name) == info["sha256"]
    again = SemanticAutoencoder.from_pretrained(dest, progress=False)
    assert torch.equal(again.encode(x), z)


# ------------------------------------------------------------------------------------------------
# the bundled model


@pytest.fixture(scope="module")
def bundled():
    from semdiff import SemanticAutoencoder

    return SemanticAutoencoder.from_pretrained(NAME, local_files_only=True, progress=False)


@pytest.fixture(scope="module")
def heldout():
    test = load_data("emoji", 32, split="test", holdout=0.1)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:16]
    return test.float_images()[idx]


@needs_bundle
def test_bundled_entry_matches_its_files():
    from semdiff.manifest import validate_entry
    from semdiff.training.export import sha256_file

    manifest = json.loads((ROOT / "semdiff" / "weights_manifest.json").read_text())
    entry = manifest["models"][NAME]
    assert entry["family"] == "lrdm" and entry["status"] == "bundled"
    assert entry["source"] == {**entry["source"], "type": "bundled", "path": f"pretrained/{NAME}"}
    assert set(entry["source"]["files"]) == {"config.json", "model.safetensors"}
    for name, info in entry["source"]["files"].items():
        path = BUNDLE / name
        assert path.stat().st_size == info["size"]
        assert sha256_file(path) == info["sha256"]
    assert validate_entry(NAME, entry) == []
    assert (BUNDLE / "model.safetensors").stat().st_size < 6.5 * 2**20
    assert not (ROOT / "semdiff" / "pretrained" / "manifest_entries.json").is_file() or NAME not in json.loads(
        (ROOT / "semdiff" / "pretrained" / "manifest_entries.json").read_text())


@needs_bundle
def test_bundled_first_stage_reconstructs_heldout_emoji(bundled, heldout):
    fam = bundled.family
    with torch.no_grad():
        rec = (fam.decode_latent(fam.encode_latent(heldout * 2 - 1)) + 1) / 2
    train = load_data("emoji", 32, split="train", holdout=0.1).float_images()
    mean_image = train.mean(0, keepdim=True).expand_as(heldout)
    ours, baseline = psnr(rec, heldout).mean(), psnr(mean_image, heldout).mean()
    assert ours > 20 and ours > baseline + 6, (float(ours), float(baseline))


@needs_bundle
def test_bundled_representation_carries_the_image(bundled, heldout):
    z = bundled.encode(heldout)
    assert z.shape == (len(heldout), bundled.code_dim) and torch.isfinite(z).all()
    x_T = bundled.family.random_stochastic(len(heldout), generator=torch.Generator().manual_seed(1))
    own = bundled.decode(z, x_T, steps=20)
    other = bundled.decode(z.roll(1, 0), x_T, steps=20)  # another image's representation, same noise
    p_own, p_other = psnr(own, heldout).mean(), psnr(other, heldout).mean()
    assert p_own > p_other + 4, (float(p_own), float(p_other))
    # the inverted x_T (100 DDIM steps: fewer invert this model poorly) adds what r leaves out, up to the
    # first stage's own error
    rec = bundled.reconstruct(heldout[:8], steps=100, inversion_steps=100)
    p_rec, p_own8 = psnr(rec, heldout[:8]).mean(), psnr(own[:8], heldout[:8]).mean()
    assert p_rec > p_own8 + 2 and p_rec > 19, (float(p_rec), float(p_own8))
    assert bundled.config["default_steps"]["encode_stochastic"] >= 100


@needs_bundle
def test_bundled_interpolation_endpoints_are_the_reconstructions(bundled, heldout):
    a, b = heldout[:1], heldout[1:2]
    path = bundled.interpolate(a, b, num=4, steps=10, inversion_steps=10)
    assert path.shape == (4, 3, 32, 32)
    ra = bundled.reconstruct(a, steps=10, inversion_steps=10)
    rb = bundled.reconstruct(b, steps=10, inversion_steps=10)
    assert (path[0] - ra[0]).abs().max() < 2e-2 and (path[-1] - rb[0]).abs().max() < 2e-2
    assert (path[1] - ra[0]).abs().mean() > 1e-3  # the middle moves


@needs_bundle
def test_bundled_samples_from_the_prior(bundled):
    out, codes, _ = bundled.sample(6, steps=10, generator=torch.Generator().manual_seed(0), return_codes=True)
    assert codes.shape == (6, bundled.code_dim)
    assert out.shape == (6, 3, 32, 32) and torch.isfinite(out).all()
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(out.std(0).mean()) > 0.02  # not one image six times


@needs_bundle
def test_lrdm_example_runs(tmp_path):
    import os
    import re
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "lrdm.png"
    env = dict(os.environ, SEMDIFF_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "lrdm_emoji.py"), "--steps", "50", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec, alone = map(float, re.search(r"reconstruction ([\d.]+) dB, r alone ([\d.]+) dB", proc.stdout).groups())
    assert rec > alone + 2
    width, height = Image.open(out).size
    assert width > 8 * 32 and height > 5 * 32
