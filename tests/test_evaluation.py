"""Evaluation metrics: PSNR/SSIM/MSE, linear probes, Fréchet distance, the shipped FD network, FID hook."""

from __future__ import annotations

import json
import math

import pytest
import torch

from semdiff import evaluation as ev


pytestmark = pytest.mark.usefixtures("one_thread")


def test_psnr_mse_of_identical_and_known_images():
    a = torch.rand(3, 3, 16, 16)
    assert torch.all(ev.mse(a, a) == 0)
    assert torch.all(torch.isinf(ev.psnr(a, a)))
    b = torch.zeros(2, 3, 8, 8)
    c = b + 0.1
    assert torch.allclose(ev.mse(b, c), torch.full((2,), 0.01))
    assert torch.allclose(ev.psnr(b, c), torch.full((2,), 20.0), atol=1e-4)
    m = ev.image_metrics(a, a)
    assert m["mse"] == 0 and m["psnr"] == float("inf") and abs(m["ssim"] - 1) < 1e-5


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g)
    assert torch.allclose(ev.ssim(a, a), torch.ones(4), atol=1e-5)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    noisier = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    s1, s2 = ev.ssim(a, noisy), ev.ssim(a, noisier)
    assert torch.all(s1 < 1) and torch.all(s2 < s1)
    assert torch.allclose(ev.ssim(noisy, a), s1, atol=1e-6)  # symmetric
    # luminance term: a constant image against itself shifted
    flat = torch.full((1, 3, 32, 32), 0.5)
    expected = (2 * 0.5 * 0.6 + 0.01**2) / (0.5**2 + 0.6**2 + 0.01**2)
    assert abs(float(ev.ssim(flat, flat + 0.1)) - expected) < 1e-4


def test_frechet_distance_closed_forms():
    mu = torch.zeros(3)
    s = torch.eye(3)
    assert abs(ev.frechet_distance(mu, s, mu, s)) < 1e-9
    # N(0, 1) vs N(1, 4) in 1-D: 1 + 1 + 4 - 2 * 2 = 2
    assert abs(ev.frechet_distance(torch.zeros(1), torch.eye(1), torch.ones(1), 4 * torch.eye(1)) - 2) < 1e-9
    # sample statistics of the same distribution are close, of different ones far
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 8, generator=g), torch.randn(4000, 8, generator=g)
    z = torch.randn(4000, 8, generator=g) * 2 + 1
    near = ev.frechet_distance(*ev.feature_statistics(x), *ev.feature_statistics(y))
    far = ev.frechet_distance(*ev.feature_statistics(x), *ev.feature_statistics(z))
    assert near < 0.1 and far > 5


def test_linear_probe_and_pca_baseline():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    centers = torch.randn(3, 20, generator=g) * 3
    x = centers[y] + torch.randn(600, 20, generator=g)
    res = ev.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert res["accuracy"] > 0.95
    shuffled = y[torch.randperm(600, generator=g)]
    chance = ev.linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:])
    assert chance["accuracy"] < 0.55
    # a test class the train split never saw counts as an error
    unseen = ev.linear_probe(x[:400], y[:400], x[400:], torch.full((200,), 7))
    assert unseen["accuracy"] == 0
    mean, comps = ev.pca_fit(x, 5)
    p = ev.pca_transform(x, mean, comps)
    assert p.shape == (600, 5)
    assert torch.allclose(comps.T @ comps, torch.eye(5), atol=1e-4)
    assert ev.majority_accuracy(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1, 1])) == 0.25


def test_shipped_fd_extractor_is_small_fixed_and_meaningful():
    path = ev.FD_FEATURES_DIR / ev.FD_WEIGHTS
    assert path.is_file() and path.stat().st_size < 1_000_000
    net = ev.load_fd_extractor()
    from semdiff.data import make_shapes

    a, b = make_shapes(300, 32, seed=11).images, make_shapes(300, 32, seed=12).images
    f = ev.extract_features(net, a)
    assert f.shape == (300, 128) and torch.isfinite(f).all()
    assert torch.equal(f, ev.extract_features(net, a))  # deterministic (eval mode)
    same = ev.semdiff_fd(a, b, net)
    noise = ev.semdiff_fd(a, torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0)), net)
    blurred = ev.semdiff_fd(a, torch.nn.functional.avg_pool2d(b, 3, 1, 1), net)
    assert same < blurred < noise
    # any image size works (resized to 32x32)
    assert ev.extract_features(net, torch.rand(2, 3, 64, 64)).shape == (2, 128)


def test_fid_inception_hook_loads_pytorch_fid_layout(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ev.FIDInceptionV3().eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["fc.weight"] = torch.zeros(1008, 2048)  # present in the pytorch-fid file, ignored
    save_file(state, str(tmp_path / "inception.safetensors"))
    loaded = ev.load_inception(tmp_path / "inception.safetensors")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        f = loaded.features(x)
    assert f.shape == (1, 2048)
    assert torch.allclose(f, net.features(x), atol=1e-5)
    bad = {k: v for k, v in state.items() if not k.startswith("Mixed_7c")}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        ev.load_inception(tmp_path / "bad.safetensors")


def test_evaluate_a_tiny_model_end_to_end(tmp_path, capsys):
    from semdiff.cli import main
    from semdiff.training import TrainConfig, train

    folder = train(TrainConfig.from_preset("tiny", out=str(tmp_path / "run"), steps=20, prior_steps=10,
                                           classifier_steps=20, progress=False, num_threads=1, holdout=0.2))
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", str(folder), "--steps", "2,3", "--max-items", "24", "--num-samples", "24", "--out",
               str(out), "--write-card"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["data"]["split"] == "test" and m["data"]["items"] == 24
    rows = m["reconstruction"]["rows"]
    assert {(r["code"], r["T"]) for r in rows} == {("z", 2), ("z", 3), ("z+x_T", 2), ("z+x_T", 3)}
    assert all(0 <= r["ssim"] <= 1 and r["mse"] > 0 for r in rows)
    labels = {r["label"] for r in m["probe"]["rows"]}
    assert {"shape", "color", "background"} <= labels
    assert all(0 <= r["z_sem"] <= 1 and 0 <= r["pca"] <= 1 for r in m["probe"]["rows"])
    assert m["edit"]["rows"] and 0 <= m["edit"]["mean_success"] <= 1
    assert math.isfinite(m["sample_quality"]["semdiff_fd_samples_vs_heldout"])
    card = (folder / "README.md").read_text()
    assert "| z_sem + inverted x_T, T=3 |" in card and "PCA pixels" in card
    printed = capsys.readouterr().out
    assert "Linear probes" in printed
