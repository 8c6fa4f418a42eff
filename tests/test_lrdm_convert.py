"""LRDM checkpoint conversion: every released key layout (meta tensors), the VQ-f4 key mapping,
real Lightning files, first stages from CompVis checkpoints and diffusers folders, bad and unsafe files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from lrdm_helpers import (
    INV_SCALE,
    KEYS,
    SCALE,
    fixture_meta,
    load_fixture,
    meta_official,
    official_state,
    tiny_vq,
    write_lightning_checkpoint,
    write_vq_checkpoint,
)
from semdiff.checkpoint import CheckpointError, UnsafeCheckpointError
from semdiff.cli import main as cli
from semdiff.families.lrdm import LRDM
from semdiff.families.lrdm.convert import convert_lrdm_checkpoint, convert_state_dict
from semdiff.families.lrdm.first_stage import convert_ldm_vq_state_dict, infer_vq_config, load_first_stage
from semdiff.io import load_model_folder

MANIFEST = Path(__file__).parents[1] / "semdiff" / "weights_manifest.json"


def _specs(kind: str):
    for path in sorted(KEYS.glob("keys_*.json")):
        spec = json.loads(path.read_text())
        has_repr = any(e["key"].startswith("repr_ae.") for e in spec["state_dict"])
        if has_repr == (kind == "lrdm"):
            yield pytest.param(spec, id=path.stem[len("keys_"):])


# ---------------------------------------------------------------------------------------------
# Released layouts (meta device: no weights needed)


@pytest.mark.parametrize("spec", list(_specs("lrdm")))
def test_released_layout_converts_to_exact_keys(spec):
    official = meta_official(spec)
    config, state = convert_state_dict(official)
    with torch.device("meta"):
        model = LRDM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    assert got == expected
    # every official key is accounted for: EMA UNet (raw copy, decay, num_updates dropped), repr_ae,
    # the first stage, the two scaling buffers; running_std.* dropped
    n = {p: sum(1 for k in official if k.startswith(p)) for p in ("ema.", "repr_ae.", "ae_model.")}
    assert len(state) == (n["ema."] - 2) + n["repr_ae."] + n["ae_model."] + 2
    counts = spec["num_parameters"]
    assert sum(v.numel() for v in model.unet.parameters()) == counts["diff_model (UNet)"]
    assert sum(v.numel() for v in model.repr_ae.parameters()) == counts["repr_ae (total)"]
    assert sum(v.numel() for v in model.first_stage.parameters()) == counts["ae_model (first stage, frozen)"]
    assert config["released_config"] is not None
    assert model.image_size == 256 and model.stochastic_shape() == (3, 64, 64)
    assert model.representation_shape == tuple(spec["representation_latent_shape"])
    tcond = "tLRDM" in spec["config_file"]
    assert model.time_conditional == tcond
    assert model.code_dim == (3 * 64 * 64 if tcond else 4096)
    assert config["unet"]["num_ch_per_head"] == 64 and config["unet"]["nonlinearity"] == "swish"


@pytest.mark.parametrize("spec", list(_specs("ldm")))
def test_plain_ldm_baselines_are_refused_clearly(spec):
    with pytest.raises(CheckpointError, match="plain LDM"):
        convert_state_dict(meta_official(spec))


def test_vq_f4_mapping_matches_diffusers_converter():
    """semdiff's CompVis -> diffusers VQ mapping against diffusers' own ``convert_ldm_vae_checkpoint``."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from semdiff.families.lrdm.first_stage import VQ_F4_CONFIG, build_vq_model

    spec = json.loads((KEYS / "keys_LRDM_r64x8x8.json").read_text())
    ldm = {k[len("ae_model."):]: v for k, v in meta_official(spec).items() if k.startswith("ae_model.")}
    ours = convert_ldm_vq_state_dict(ldm)
    theirs = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, VQ_F4_CONFIG)
    theirs["quantize.embedding.weight"] = ldm["quantize.embedding.weight"]
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert infer_vq_config(ldm) == VQ_F4_CONFIG
    with torch.device("meta"):
        vq = build_vq_model(VQ_F4_CONFIG)
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert vq.config.scaling_factor == 1.0


# ---------------------------------------------------------------------------------------------
# Real files


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


@pytest.fixture(scope="module")
def vq():
    return tiny_vq()


def _project_yaml(folder: Path, name: str = "2022-01-01T00-00-00-project.yaml") -> Path:
    """The official *-project.yaml layout (written as JSON, which is YAML) with the fixture's networks."""
    meta = fixture_meta()
    cfg = {"model": {"target": "diffusion.models.DiffusionModel", "params": {
        "diffusion_model_config": meta["unet_config (DiffusionUNetReprCond)"],
        "representation_ae_config": meta["encoder_config (RepresentationAE)"],
        "sde_config": meta["sde_config"],
        "representation_kl_weight": 0.0005, "continuous": False}}}
    path = folder / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, fx, vq):
    folder = tmp_path_factory.mktemp("lrdm_ckpt")
    _project_yaml(folder)
    return write_lightning_checkpoint(folder / "last.ckpt", official_state(fx, vq=vq))


def test_convert_lightning_checkpoint(ckpt, fx, vq, tmp_path):
    out = convert_lrdm_checkpoint(ckpt, tmp_path / "model")
    model = load_model_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "lrdm" and config["image_size"] == 64
    assert config["unet_weights"] == "ema" and config["representation_kl_weight"] == 0.0005
    assert config["unet"]["num_ch_per_head"] == 8  # from the project yaml: not in the weights
    state = model.state_dict()
    for k, v in fx.items():
        if k.startswith("unet."):
            assert torch.equal(state[k], v), k  # the EMA weights, not the raw diff_model ones
        elif k.startswith("encoder."):
            assert torch.equal(state["repr_ae." + k[len("encoder."):]], v), k
    for k, v in vq.state_dict().items():
        assert torch.equal(state["first_stage." + k], v), k
    assert float(model.scale_factor) == SCALE
    assert float(model.inverse_scale_factor) == pytest.approx(INV_SCALE, rel=1e-7)
    # the first stage runs as the diffusers model does, scaled by LRDM's own buffers
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z0 = model.encode_latent(x)
        torch.testing.assert_close(z0, vq.encode(x).latents * SCALE, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.decode_latent(z0), vq.decode(z0 * torch.tensor(INV_SCALE)).sample,
                                   rtol=0, atol=1e-5)


def test_cli_convert_with_first_stage_checkpoint_and_diffusers_folder(ckpt, fx, vq, tmp_path, caplog):
    other = tiny_vq(seed=1)
    vq_ckpt = write_vq_checkpoint(tmp_path / "model.ckpt", other)
    assert cli(["convert", "lrdm", str(ckpt), str(tmp_path / "a"), "--first-stage", str(vq_ckpt)]) == 0
    assert "differ from the first stage stored" in caplog.text
    a = load_model_folder(tmp_path / "a").state_dict()
    for k, v in other.state_dict().items():
        assert torch.equal(a["first_stage." + k], v), k
    # a diffusers-format folder (VQModel.save_pretrained) works the same
    other.save_pretrained(tmp_path / "vq_diffusers")
    assert cli(["convert", "lrdm", str(ckpt), str(tmp_path / "b"), "--first-stage", str(tmp_path / "vq_diffusers")]) == 0
    b = load_model_folder(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["first_stage"]["scaling_factor"] == 1.0  # never diffusers' 0.18215


def test_first_stage_loader_reads_both_formats(vq, tmp_path):
    vq.save_pretrained(tmp_path / "d")
    cfg_d, state_d = load_first_stage(tmp_path / "d")
    cfg_c, state_c = load_first_stage(write_vq_checkpoint(tmp_path / "m.ckpt", vq))
    assert cfg_c["block_out_channels"] == cfg_d["block_out_channels"] == [32, 32, 64]
    assert set(state_c) == set(state_d) == set(vq.state_dict())
    assert all(torch.equal(state_c[k], state_d[k]) for k in state_c)
    with pytest.raises(CheckpointError, match="config.json"):
        load_first_stage(tmp_path)


def test_architecture_needs_a_config_when_not_released(fx, vq, tmp_path):
    path = write_lightning_checkpoint(tmp_path / "last.ckpt", official_state(fx, vq=vq))
    with pytest.raises(CheckpointError, match="latent resolution"):
        convert_lrdm_checkpoint(path, tmp_path / "m")
    # the resolution alone does not give the heads (8 channels per head here, not the released 64)
    with pytest.raises(CheckpointError, match="channels per attention head"):
        convert_lrdm_checkpoint(path, tmp_path / "m", image_size=64)
    yaml_path = _project_yaml(tmp_path, "elsewhere.yaml")
    assert cli(["convert", "lrdm", str(path), str(tmp_path / "m"), "--config", str(yaml_path)]) == 0


def test_config_files_next_to_the_checkpoint(fx, vq, tmp_path):
    """Like models/LRDM/r64x8x8: several λ variants of one architecture; the checkpoint's own wins."""
    def variant(name, kl):
        path = _project_yaml(tmp_path, name)
        cfg = json.loads(path.read_text())
        cfg["model"]["params"]["representation_kl_weight"] = kl
        path.write_text(json.dumps(cfg))

    variant("LRDM_lambda1e-3-project.yaml", 0.001)
    variant("LRDM_lambda1e-4-project.yaml", 0.0001)
    state = official_state(fx, vq=vq)
    own = write_lightning_checkpoint(tmp_path / "LRDM_lambda1e-4.ckpt", state)
    cfg = json.loads((convert_lrdm_checkpoint(own, tmp_path / "a") / "config.json").read_text())
    assert cfg["representation_kl_weight"] == 0.0001
    other = write_lightning_checkpoint(tmp_path / "last.ckpt", state)
    cfg = json.loads((convert_lrdm_checkpoint(other, tmp_path / "b") / "config.json").read_text())
    assert "representation_kl_weight" not in cfg and cfg["unet"]["num_ch_per_head"] == 8


def test_parity_fixture_layout_converts(tmp_path):
    """The fixtures' own layout (unet.* + encoder.*, JSON beside it) converts, pixel-space."""
    src = Path(__file__).parent / "fixtures" / "lrdm"
    out = convert_lrdm_checkpoint(src / "parity_tiny.safetensors", tmp_path / "m", no_first_stage=True)
    model = load_model_folder(out)
    assert model.first_stage is None and model.image_size == 16 and model.code_dim == 256


def test_checkpoint_without_ema_uses_raw_weights(fx, vq, tmp_path, caplog):
    folder = tmp_path / "noema"
    folder.mkdir()
    _project_yaml(folder)
    path = write_lightning_checkpoint(folder / "last.ckpt", official_state(fx, vq=vq, with_ema=False))
    with caplog.at_level(logging.WARNING):
        out = convert_lrdm_checkpoint(path, tmp_path / "m")
    assert "use_ema=False" in caplog.text
    assert json.loads((out / "config.json").read_text())["unet_weights"].startswith("raw")
    assert torch.equal(load_model_folder(out).state_dict()["unet.conv_in.weight"], fx["unet.conv_in.weight"])


def test_incomplete_ema_is_refused(fx, vq, tmp_path):
    state = official_state(fx, vq=vq)
    del state["ema.conv_inweight"]
    _project_yaml(tmp_path)
    path = write_lightning_checkpoint(tmp_path / "last.ckpt", state)
    with pytest.raises(CheckpointError, match="EMA weights do not match"):
        convert_lrdm_checkpoint(path, tmp_path / "m")


def test_missing_first_stage_is_explained(fx, tmp_path):
    _project_yaml(tmp_path)
    path = write_lightning_checkpoint(tmp_path / "last.ckpt", official_state(fx))
    with pytest.raises(CheckpointError, match="--first-stage"):
        convert_lrdm_checkpoint(path, tmp_path / "m")


# ---------------------------------------------------------------------------------------------
# Bad and unsafe files


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    for name in ("evil.ckpt", "evil_vq.ckpt"):
        torch.save({"state_dict": {"diff_model.x": torch.zeros(1)}, "callbacks": _Payload(marker)}, tmp_path / name)
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"):
        convert_lrdm_checkpoint(tmp_path / "evil.ckpt", tmp_path / "m")
    with pytest.raises(UnsafeCheckpointError):
        load_first_stage(tmp_path / "evil_vq.ckpt")
    assert not marker.exists()
    assert cli(["convert", "lrdm", str(tmp_path / "evil.ckpt"), str(tmp_path / "m")]) == 2
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_truncated_empty_and_wrong_checkpoints(ckpt, tmp_path):
    data = ckpt.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_lrdm_checkpoint(tmp_path / "trunc.ckpt", tmp_path / "m")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        convert_lrdm_checkpoint(tmp_path / "empty.ckpt", tmp_path / "m")
    with pytest.raises(CheckpointError, match="not found"):
        convert_lrdm_checkpoint(tmp_path / "missing.ckpt", tmp_path / "m")
    # a Diff-AE checkpoint is not an LRDM one
    torch.save({"state_dict": {"ema_model.input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3)}}, tmp_path / "diffae.ckpt")
    with pytest.raises(CheckpointError, match="not an LRDM checkpoint"):
        convert_lrdm_checkpoint(tmp_path / "diffae.ckpt", tmp_path / "m")
    # a KL first stage is not LRDM's VQ-f4
    torch.save({"state_dict": {"encoder.down.0.block.0.conv1.weight": torch.zeros(32, 32, 3, 3)}}, tmp_path / "kl.ckpt")
    with pytest.raises(CheckpointError, match="not a VQ model"):
        load_first_stage(tmp_path / "kl.ckpt")
    assert not (tmp_path / "m").exists()


def test_manifest_lists_the_lrdm_checkpoints():
    from semdiff.manifest import validate_entry

    doc = json.loads(MANIFEST.read_text())
    assert {"lrdm-churches256-r64-lambda1e-4", "tlrdm-churches256-r16-lambda1e-4", "ldm-churches256-x0-vqf4"} <= \
        set(doc["models"])
    lrdm = {name: entry for name, entry in doc["models"].items()
            if entry["family"] == "lrdm" and entry["status"] != "bundled"}
    assert len(lrdm) == 8  # the released official checkpoints (the bundled emoji LRDM is checked elsewhere)
    for name, entry in lrdm.items():
        assert validate_entry(name, entry) == [], name
        assert entry["status"] == "not-located"
    assert "vq-f4" in doc["components"]
