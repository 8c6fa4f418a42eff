"""Diff-AE checkpoint conversion: every released key layout, real Lightning files, bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from diffae_helpers import (
    load_fixture,
    official_weights,
    tiny_latent_state,
    write_lightning_checkpoint,
)
from semdiff import SemanticAutoencoder
from semdiff.checkpoint import CheckpointError, UnsafeCheckpointError
from semdiff.cli import main as cli
from semdiff.families.diffae import DiffAE
from semdiff.families.diffae.convert import convert_diffae_checkpoint, convert_state_dict

KEYS = Path(__file__).parent / "fixtures" / "official-keys" / "diffae"


def _layouts(model_class):
    for path in sorted(KEYS.glob("keys_*.json")):
        spec = json.loads(path.read_text())
        if spec.get("model_class") == model_class:
            yield pytest.param(spec, id=path.stem[len("keys_"):])


def _meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _semdiff_shapes(config) -> dict[str, tuple]:
    with torch.device("meta"):
        model = DiffAE(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", list(_layouts("BeatGANsAutoencModel")))
def test_released_layout_converts_to_exact_keys(spec):
    # the Lightning file adds buffers of the LightningModule itself (x_T, conds_*) beside the weights
    official = _meta({**spec["state_dict"], **spec["lightning_checkpoint_layout"]["extra_buffers"]})
    config, state = convert_state_dict(official, image_size=spec["model_config"]["image_size"])
    expected = _semdiff_shapes(config)
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    assert got == expected
    # every official key is accounted for: mapped, or one of the documented drops (tied duplicate)
    kept = [k for k in official if ".cond_layers.1." not in k and k != "x_T"]
    assert len(kept) == len(state)
    net = config["network"]
    mc = spec["model_config"]
    assert net["channel_mult"] == mc["channel_mult"]
    assert net["enc_channel_mult"] == mc["enc_channel_mult"]
    assert net["num_res_blocks"] == mc["num_res_blocks"]
    assert net["attention_resolutions"] == mc["attention_resolutions"]
    n_params = sum(v.numel() for k, v in state.items() if not k.startswith("codes_"))
    assert n_params == spec["num_parameters_unique"]


@pytest.mark.parametrize("spec", list(_layouts("BeatGANsAutoencModel")))
def test_released_layout_recognised_without_image_size(spec):
    config, _ = convert_state_dict(_meta(spec["state_dict"]))
    if spec["config_function"].startswith("celeba64"):
        assert config["network"]["image_size"] == 64
    else:
        assert config["network"]["image_size"] == spec["model_config"]["image_size"]
        assert config["released_config"] is not None


@pytest.mark.parametrize("name", ["ffhq256", "ffhq128"])
def test_classifier_layout(name):
    base = json.loads((KEYS / f"keys_{name}_autoenc{'_130M' if name == 'ffhq128' else ''}.json").read_text())
    cls = json.loads((KEYS / f"keys_{name}_autoenc_cls.json").read_text())
    config, state = convert_state_dict(_meta(base["state_dict"]), classifier=_meta(cls["state_dict"]))
    assert config["attributes"][31] == "Smiling" and len(config["attributes"]) == 40
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == _semdiff_shapes(config)


@pytest.mark.parametrize("spec", list(_layouts("BeatGANsUNetModel")))
def test_ddim_baseline_is_refused_clearly(spec):
    with pytest.raises(CheckpointError, match="not a Diff-AE autoencoder"):
        convert_state_dict(_meta(spec["state_dict"]))


@pytest.mark.parametrize("levels", [(1, 2), (1, 2, 2, 4)])
@pytest.mark.parametrize("res_blocks", [1, 2, 3])
def test_any_official_config_round_trips(levels, res_blocks, tmp_path):
    """Configs beyond the released ones: build, write official keys, infer back the same config."""
    size = 16 * 2 ** (len(levels) - 2)
    cfg = dict(image_size=size, model_channels=32, channel_mult=levels, num_res_blocks=res_blocks,
               attention_resolutions=[size // 2], embed_channels=32, z_dim=24,
               enc_channel_mult=list(levels) + [levels[-1]], enc_num_res_blocks=res_blocks)
    model = DiffAE(DiffAE.default_config(**cfg))
    official = {("" if k.startswith("encoder.") else "") + (k[len("unet."):] if k.startswith("unet.") else k): v
                for k, v in model.state_dict().items()}
    config, state = convert_state_dict(official, image_size=size)
    for key in ("channel_mult", "num_res_blocks", "attention_resolutions", "enc_channel_mult", "enc_num_res_blocks",
                "z_dim", "embed_channels", "model_channels"):
        assert list(config["network"][key]) == list(cfg[key]) if isinstance(cfg[key], (list, tuple)) \
            else config["network"][key] == cfg[key], key


# ---- real files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


@pytest.fixture(scope="module")
def lightning_ckpts(fx, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    state = official_weights(fx)
    auto = write_lightning_checkpoint(d / "last.ckpt", state, extra={"x_T": torch.randn(4, 3, 32, 32)})
    lat_fx, lat_state = tiny_latent_state()
    latent = write_lightning_checkpoint(
        d / "latent.ckpt", {**state, **lat_state},
        extra={"conds_mean": fx["manip.conds_mean"], "conds_std": fx["manip.conds_std"]})
    cls = d / "cls.ckpt"
    torch.save({"state_dict": {"classifier.weight": fx["manip.cls_weight"], "classifier.bias": fx["manip.cls_bias"],
                               "ema_classifier.weight": fx["manip.cls_weight"] * 0,
                               "ema_classifier.bias": fx["manip.cls_bias"] * 0,
                               "conds_mean": fx["manip.conds_mean"], "conds_std": fx["manip.conds_std"]},
                "global_step": 9375}, cls)
    return {"auto": auto, "latent": latent, "cls": cls, "dir": d}


def test_cli_convert_and_load(lightning_ckpts, fx, tmp_path):
    out = tmp_path / "model"
    rc = cli(["convert", "diffae", str(lightning_ckpts["auto"]), str(out), "--latent", str(lightning_ckpts["latent"]),
              "--classifier", str(lightning_ckpts["cls"])])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) >= ["config.json", "model.safetensors"]
    model = SemanticAutoencoder.from_pretrained(out, progress=False)
    assert model.image_size == 32 and model.has_prior and model.attributes[31] == "Smiling"
    # the EMA weights were taken (the raw copies are shifted by 0.5)
    torch.testing.assert_close(model.encode((fx["x0"] + 1) / 2), fx["z_sem"], atol=1e-5, rtol=0)
    z_edit = model.family.edit_codes(fx["z_sem"], {"Smiling": 0.3})
    torch.testing.assert_close(z_edit, fx["manip.z_edit"], atol=1e-5, rtol=0)


def test_convert_needs_image_size_only_when_not_inferable(fx, tmp_path):
    ckpt = write_lightning_checkpoint(tmp_path / "noxt.ckpt", official_weights(fx))
    with pytest.raises(CheckpointError, match="--image-size"):
        convert_diffae_checkpoint(ckpt, tmp_path / "out")
    out = convert_diffae_checkpoint(ckpt, tmp_path / "out", image_size=32)
    assert json.loads((out / "config.json").read_text())["network"]["image_size"] == 32


def test_malicious_pickle_is_refused_and_not_run(fx, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"ema_model." + k: v for k, v in official_weights(fx).items()}, "hook": Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        convert_diffae_checkpoint(path, tmp_path / "out", image_size=32)
    assert not marker.exists()
    assert cli(["convert", "diffae", str(path), str(tmp_path / "out2")]) == 2
    assert not marker.exists() and not (tmp_path / "out2").exists()


def test_truncated_and_wrong_files(lightning_ckpts, tmp_path):
    data = lightning_ckpts["auto"].read_bytes()
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated|not a PyTorch checkpoint"):
        convert_diffae_checkpoint(trunc, tmp_path / "o1")
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        convert_diffae_checkpoint(text, tmp_path / "o2")
    with pytest.raises(CheckpointError, match="not found"):
        convert_diffae_checkpoint(tmp_path / "missing.ckpt", tmp_path / "o3")
    # a classifier checkpoint is not an autoencoder
    with pytest.raises(CheckpointError, match="not a Diff-AE autoencoder"):
        convert_diffae_checkpoint(lightning_ckpts["cls"], tmp_path / "o4")
    # an autoencoder passed as --latent has no latent net
    with pytest.raises(CheckpointError, match="no latent_net"):
        convert_diffae_checkpoint(lightning_ckpts["auto"], tmp_path / "o5", latent=lightning_ckpts["auto"])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_missing_ema_is_refused(fx, tmp_path):
    path = tmp_path / "raw.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in official_weights(fx).items()}}, path)
    with pytest.raises(CheckpointError, match="no EMA"):
        convert_diffae_checkpoint(path, tmp_path / "out", image_size=32)


def test_classifier_of_other_dimension_is_refused(lightning_ckpts, tmp_path):
    cls = tmp_path / "cls512.ckpt"
    torch.save({"state_dict": {"classifier.weight": torch.zeros(40, 512), "classifier.bias": torch.zeros(40)}}, cls)
    with pytest.raises(CheckpointError, match="512-d codes"):
        convert_diffae_checkpoint(lightning_ckpts["auto"], tmp_path / "out", classifier=cls)
