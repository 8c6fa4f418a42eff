"""DiffuseVAE checkpoint conversion: every released key layout, Lightning files, bad files and strings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from diffusevae_helpers import (
    KEYS,
    convert_fixture,
    fixture_json,
    load_fixture,
    official_state,
    vae_hparams,
    write_ddpm_checkpoint,
    write_vae_checkpoint,
)
from semdiff.checkpoint import CheckpointError, UnsafeCheckpointError
from semdiff.cli import main as cli
from semdiff.families.diffusevae import ArchitectureStringError, DiffuseVAE, VAEConfig, parse_block_string
from semdiff.families.diffusevae.convert import (
    RELEASED,
    convert_diffusevae_checkpoint,
    convert_state_dicts,
    infer_form,
)
from semdiff.io import load_model_folder

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

LAYOUTS = sorted(p for p in KEYS.glob("keys_*.json") if p.stem != "keys_summary")
RELEASED_NAME = {"cifar10": "cifar10", "celeba64": "celeba64", "celebamaskhq128": "celebamaskhq128",
                 "ffhq": "ffhq128", "celebahq": "celebahq256", "afhq256": "afhq256"}


def _meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Every released (and unreleased) official configuration, on the meta device


@pytest.mark.parametrize("path", LAYOUTS, ids=[p.stem[len("keys_"):] for p in LAYOUTS])
def test_official_layout_converts_to_exact_keys(path):
    spec = json.loads(path.read_text())
    dataset = path.stem[len("keys_"):]
    vae = _meta(spec["vae_checkpoint_state_dict"])
    unet = spec["ddpm_checkpoint_state_dict_unet_part"]
    ddpm = _meta({**{"target_network.decoder." + k: v for k, v in unet.items()},
                  **{"online_network.decoder." + k: v for k, v in unet.items()},
                  **spec["ddpm_checkpoint_state_dict_non_unet_keys"]})
    v = spec["vae"]
    hparams = {"input_res": v["input_res"], "enc_block_str": v["enc_block_config"], "dec_block_str": v["dec_block_config"],
               "enc_channel_str": v["enc_channel_config"], "dec_channel_str": v["dec_channel_config"]}
    config, state, notes = convert_state_dicts(vae, hparams, ddpm, form="form1",
                                               names=["vae.ckpt", f"diffvae_{dataset}_form1.ckpt"])
    with torch.device("meta"):
        model = DiffuseVAE(config)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    got = {k: tuple(t.shape) for k, t in state.items()}
    assert got == expected
    # every official VAE and EMA-UNet key is used, nothing else
    assert len(state) == len(spec["vae_checkpoint_state_dict"]) + len(unet)
    assert sum(t.numel() for k, t in model.state_dict().items() if k.startswith("vae.")) == v["num_parameters"]
    assert sum(t.numel() for k, t in model.state_dict().items() if k.startswith("unet.")) == spec["ddpm"]["num_parameters"]
    net = config["unet"]
    assert net["channel_mult"] == spec["ddpm"]["channel_mult"]
    assert net["num_res_blocks"] == spec["ddpm"]["num_res_blocks"]
    assert net["model_channels"] == spec["ddpm"]["model_channels"]
    # attention sits at the downsampling factors listed (CIFAR-10's deepest factor is 8: none there)
    deepest = 2 ** (len(net["channel_mult"]) - 1)
    assert net["attention_ds"] == [d for d in spec["ddpm"]["attention_resolutions"] if d <= deepest]
    assert config["vae"]["input_res"] == spec["image_size"] and model.code_dim == v["z_dim"]
    assert config["released_config"] == RELEASED_NAME[dataset]
    assert config["unet"]["num_heads"] == spec["ddpm"]["n_heads_train_yaml"]
    assert config["num_heads_source"] == "assumed" and any("num_heads" in n for n in notes)
    assert config["variance"] == spec["ddpm"]["eval_variance"]


def test_released_table_matches_the_official_keys():
    for path in LAYOUTS:
        spec = json.loads(path.read_text())
        r = RELEASED[RELEASED_NAME[path.stem[len("keys_"):]]]
        assert r["channel_mult"] == spec["ddpm"]["channel_mult"] and r["image_size"] == spec["image_size"]
        assert (r["heads_train"], r["heads_test"]) == (spec["ddpm"]["n_heads_train_yaml"], spec["ddpm"]["n_heads_test_yaml"])


def test_released_architectures_also_load_with_non_yaml_channels():
    """Users report released files that do not fit the YAMLs (#15): the shapes decide, not a config."""
    spec = json.loads((KEYS / "keys_celeba64.json").read_text())
    from semdiff.families.diffusevae.networks import ConditionalUNet, UNetConfig

    with torch.device("meta"):
        other = ConditionalUNet(UNetConfig(model_channels=128, channel_mult=[1, 2, 2, 2, 2], num_res_blocks=2,
                                           attention_ds=[16]))
    ddpm = {"target_network.decoder." + k: t for k, t in other.state_dict().items()}
    v = spec["vae"]
    hparams = {"enc_block_str": v["enc_block_config"], "dec_block_str": v["dec_block_config"],
               "enc_channel_str": v["enc_channel_config"], "dec_channel_str": v["dec_channel_config"]}
    config, _, _ = convert_state_dicts(_meta(spec["vae_checkpoint_state_dict"]), hparams, ddpm, form="form2",
                                       num_heads=4, names=["vae.ckpt", "diffvae_celeba64_form2.ckpt"])
    assert config["unet"]["channel_mult"] == [1, 2, 2, 2, 2] and config["vae"]["input_res"] == 64
    assert config["released_config"] == "celeba64" and config["unet"]["num_heads"] == 4


# ---------------------------------------------------------------------------------------------
# Real Lightning files


def test_convert_tiny_fixture_takes_ema_weights_and_records_settings(tmp_path):
    folder = convert_fixture(tmp_path, "form2")
    config = json.loads((folder / "config.json").read_text())
    assert config["family"] == "diffusevae" and config["form"] == "form2"
    assert config["unet"]["num_heads"] == 2 and config["num_heads_source"] == "given"
    assert config["schedule"] == {"beta_1": 1e-4, "beta_2": 0.02, "num_timesteps": 1000}
    assert config["variance"] == "fixedlarge"
    model = load_model_folder(folder)
    ema = official_state("unet")
    for k, v in ema.items():
        assert torch.equal(model.state_dict()["unet." + k], v), k  # the EMA copy, not online_network
    assert torch.equal(model.state_dict()["vae.enc.mu.weight"], official_state("vae")["enc.mu.weight"])


def test_cli_convert_states_the_assumed_head_count(tmp_path, capsys):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    ddpm = write_ddpm_checkpoint(tmp_path / "diffvae_tiny_form2_loss=0.0361.ckpt")
    out = tmp_path / "out"
    assert cli(["convert", "diffusevae", "--vae", str(vae), "--ddpm", str(ddpm), str(out)]) == 0
    err = capsys.readouterr().err
    assert "num_heads=1" in err and "--num-heads" in err
    config = json.loads((out / "config.json").read_text())
    assert config["form"] == "form2"  # from the file name
    assert config["unet"]["num_heads"] == 1 and config["num_heads_source"] == "assumed"
    out2 = tmp_path / "out2"
    assert cli(["convert", "diffusevae", "--vae", str(vae), "--ddpm", str(ddpm), str(out2), "--form", "form1",
                "--num-heads", "2", "--image-size", "32"]) == 0
    config = json.loads((out2 / "config.json").read_text())
    assert config["form"] == "form1" and config["unet"]["num_heads"] == 2


def test_form_needs_a_file_name_or_the_option(tmp_path, capsys):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    ddpm = write_ddpm_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="--form"):
        convert_diffusevae_checkpoint(vae, ddpm, tmp_path / "o", num_heads=2)
    assert cli(["convert", "diffusevae", "--vae", str(vae), "--ddpm", str(ddpm), str(tmp_path / "o")]) == 2
    assert "--form" in capsys.readouterr().err
    assert infer_form("runs/chq256/diffvae_chq256_form1_loss=0.0361.ckpt") == "form1"
    assert infer_form("runs/form-2/checkpoints/last.ckpt") == "form2"
    assert infer_form("runs/x/checkpoints/last.ckpt") is None
    with pytest.raises(CheckpointError, match="both"):
        infer_form("form1_vs_form2.ckpt")


def test_vae_without_input_res_and_image_size_option(tmp_path):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt", hparams=vae_hparams(input_res=False))
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    folder = convert_diffusevae_checkpoint(vae, ddpm, tmp_path / "a", form="form1", num_heads=2)
    assert json.loads((folder / "config.json").read_text())["image_size"] == 32
    vae2 = write_vae_checkpoint(tmp_path / "vae2.ckpt")
    with pytest.raises(CheckpointError, match="input_res"):
        convert_diffusevae_checkpoint(vae2, ddpm, tmp_path / "b", form="form1", num_heads=2, image_size=64)


def test_z_conditioned_unet_converts(tmp_path):
    folder = convert_fixture(tmp_path, "form1", unet="unet_z")
    config = json.loads((folder / "config.json").read_text())
    assert config["unet"]["use_z"] and config["unet"]["z_dim"] == 48 and config["unet"]["use_scale_shift_norm"]


# ---------------------------------------------------------------------------------------------
# Bad files


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["vae", "ddpm"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, which):
    marker = tmp_path / "pwned"
    good_vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    good_ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": official_state("vae"), "hyper_parameters": _Exploit(marker)}, evil)
    args = (evil, good_ddpm) if which == "vae" else (good_vae, evil)
    with pytest.raises(UnsafeCheckpointError, match="os.system|posix.system"):
        convert_diffusevae_checkpoint(*args, tmp_path / "out", form="form1", num_heads=2)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_truncated_and_garbage_files(tmp_path):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ddpm.read_bytes()[: ddpm.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated|not a PyTorch checkpoint"):
        convert_diffusevae_checkpoint(vae, cut, tmp_path / "o", form="form1", num_heads=2)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        convert_diffusevae_checkpoint(junk, ddpm, tmp_path / "o", form="form1", num_heads=2)
    with pytest.raises(CheckpointError, match="not found"):
        convert_diffusevae_checkpoint(tmp_path / "missing.ckpt", ddpm, tmp_path / "o", form="form1", num_heads=2)


def test_missing_ema_and_swapped_files(tmp_path):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    no_ema = write_ddpm_checkpoint(tmp_path / "online_only.ckpt", ema=False)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        convert_diffusevae_checkpoint(vae, no_ema, tmp_path / "o", form="form1", num_heads=2)
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    with pytest.raises(CheckpointError, match="swap"):
        convert_diffusevae_checkpoint(ddpm, vae, tmp_path / "o", form="form1", num_heads=2)


def test_truncated_state_dict_is_a_clear_error(tmp_path):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    sd_path = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    write_ddpm_checkpoint(tmp_path / "partial.ckpt", drop=("target_network.decoder.output_blocks.2.0.out_layers.3.weight",))
    with pytest.raises(CheckpointError, match="missing .*output_blocks.2.0.out_layers.3.weight"):
        convert_diffusevae_checkpoint(vae, tmp_path / "partial.ckpt", tmp_path / "o", form="form1", num_heads=2)
    # VAE weights that do not fit the VAE's own strings
    bad = dict(official_state("vae"))
    bad["enc.mu.weight"] = bad["enc.mu.weight"][:, :40]
    vae_bad = write_vae_checkpoint(tmp_path / "vae_bad.ckpt", state=bad)
    with pytest.raises(CheckpointError, match="enc.mu.weight"):
        convert_diffusevae_checkpoint(vae_bad, sd_path, tmp_path / "o", form="form1", num_heads=2)


def _other_vae(z: int = 32) -> tuple[dict, dict]:
    hp = {"input_res": 32, "enc_block_str": "32x1,32d2,32t16,16d2,8d2,4d4,4t1,1x1",
          "enc_channel_str": f"32:64,16:32,8:32,4:32,1:{z}",
          "dec_block_str": "1x1,1u16,1t16,16x1,16u2,16t32,32x1", "dec_channel_str": f"32:64,16:32,1:{z}"}
    torch.manual_seed(0)
    from semdiff.families.diffusevae.networks import VAE

    model = VAE(VAEConfig(**hp))
    return {k: v.detach() for k, v in model.state_dict().items()}, hp


def test_mismatched_vae_and_ddpm(tmp_path):
    state, hp = _other_vae(32)
    vae = write_vae_checkpoint(tmp_path / "vae_other.ckpt", state=state, hparams=hp)
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")  # trained with the fixture's VAE (vae.*)
    with pytest.raises(CheckpointError, match="does not match the VAE this DDPM was trained with"):
        convert_diffusevae_checkpoint(vae, ddpm, tmp_path / "o", form="form1", num_heads=2)
    # a z-conditioned UNet projects 48-d codes: a VAE with 32-d z does not fit it
    ddpm_z = write_ddpm_checkpoint(tmp_path / "ddpm_z.ckpt", unet="unet_z", vae=state)
    with pytest.raises(CheckpointError, match="48-d codes but the VAE's z has 32"):
        convert_diffusevae_checkpoint(vae, ddpm_z, tmp_path / "o", form="form1", num_heads=1)


def test_num_heads_that_do_not_divide_the_channels(tmp_path):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt")
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    with pytest.raises(ValueError, match="--num-heads 5"):
        convert_diffusevae_checkpoint(vae, ddpm, tmp_path / "o", form="form1", num_heads=5)


# ---------------------------------------------------------------------------------------------
# Architecture strings


@pytest.mark.parametrize("enc, token", [
    ("32x1,32q2,32t16,16x1", "'32q2'"),
    ("32x1,32d2,,16x1", "token 3 ''"),
    ("32x1,32d,32t16", "'32d'"),
    ("32x1,32d2,32t16,x1", "'x1'"),
    ("32x1,32d2,32t16,16x1.5", "'16x1.5'"),
    ("32x1,32d0,32t16", "'32d0'"),
])
def test_malformed_block_strings_name_the_token(enc, token):
    with pytest.raises(ArchitectureStringError, match=token):
        parse_block_string(enc, "encoder block")


def _hp(**change) -> dict:
    hp = vae_hparams()
    hp.update(change)
    return hp


@pytest.mark.parametrize("change, pattern", [
    (dict(enc_block_str="32x1,32d2,32t16,16x1,16d2,16t8,8x1,8d2,8t4,4x1,4d4,4t1,1x1,1x2,8x1"), "'8x1'.*resolution 8"),
    (dict(enc_channel_str="32:64,16:32,8:32,4:32"), "resolution 1"),
    (dict(enc_channel_str="32:64,16:32,8:32,1:48"), "'8t4'.*does not list"),
    (dict(enc_channel_str="32:32,16:32,8:32,4:32,1:48"), "stem conv is fixed at 64"),
    (dict(enc_block_str="32x1,32d2,16x1,16d2,16t8,8x1,8d2,8t4,4x1,4d4,4t1,1x1"),
     r"'16x1'.*needs 32 channels \(channels\[16\]\) but the previous layer gives 64"),
    (dict(enc_block_str="32x1,32d2,32t16,16x1,16d2,16t8,8x1,8d2,8t4,4x1"), "ends at resolution 4"),
    (dict(dec_channel_str="32:64,16:32,8:32,4:32,1:40"), "'1x1'.*needs 40 channels"),
    (dict(dec_block_str="1x1,1u4,1t4,4x1,4u2,4t8,8x1,8u2,8t16,16x1"), "ends at resolution 16"),
    (dict(enc_channel_str="32:64,16:32,8:32,4:32,1:48,4:8"), "repeats resolution 4"),
    (dict(dec_channel_str="32:64;16:32"), "RESOLUTION:CHANNELS"),
])
def test_malformed_vae_strings_in_a_checkpoint(tmp_path, change, pattern):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt", hparams=_hp(**change))
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    with pytest.raises(ArchitectureStringError, match=pattern) as info:
        convert_diffusevae_checkpoint(vae, ddpm, tmp_path / "o", form="form1", num_heads=2)
    assert isinstance(info.value, CheckpointError)


def test_missing_hyper_parameters(tmp_path):
    vae = write_vae_checkpoint(tmp_path / "vae.ckpt", hparams={"input_res": 32})
    ddpm = write_ddpm_checkpoint(tmp_path / "ddpm.ckpt")
    with pytest.raises(CheckpointError, match="enc_block_str"):
        convert_diffusevae_checkpoint(vae, ddpm, tmp_path / "o", form="form1", num_heads=2)


def test_any_valid_string_builds():
    cfg = VAEConfig(input_res=16, enc_block_str="16x2,16d2,16t8,8d8,8t1,1x1", enc_channel_str="16:64,8:16,1:8",
                    dec_block_str="1,1u8,1t8,8x2,8u2,8t16,16", dec_channel_str="16:12,8:16,1:8")
    from semdiff.families.diffusevae.networks import VAE

    vae = VAE(cfg)
    mu, logvar = vae.encode(torch.rand(2, 3, 16, 16))
    assert mu.shape == (2, 8, 1, 1) and vae.decode(mu).shape == (2, 3, 16, 16)
    assert fixture_json()["vae_config"]["z_dim"] == 48 and load_fixture()["out.vae.mu"].shape[1] == 48


def test_image_size_must_fit_the_unet_levels():
    from semdiff.families.diffusevae.networks import VAE, ConditionalUNet, UNetConfig

    hp = {"input_res": 24, "enc_block_str": "24x1,24d2,24t12,12d12,12t1,1x1", "enc_channel_str": "24:64,12:32,1:16",
          "dec_block_str": "1x1,1u12,1t12,12u2,12t24,24x1", "dec_channel_str": "24:64,12:32,1:16"}
    with torch.device("meta"):
        vae = VAE(VAEConfig(**hp)).state_dict()
        fits = ConditionalUNet(UNetConfig(model_channels=32, channel_mult=[1, 2, 2, 2], num_res_blocks=1)).state_dict()
        too_deep = ConditionalUNet(UNetConfig(model_channels=32, channel_mult=[1, 2, 2, 2, 2], num_res_blocks=1)).state_dict()
    config, _, _ = convert_state_dicts(vae, hp, {"target_network.decoder." + k: v for k, v in fits.items()},
                                       form="form1", num_heads=1)
    assert config["vae"]["input_res"] == 24
    with pytest.raises(CheckpointError, match="halves its input 4 times"):
        convert_state_dicts(vae, hp, {"target_network.decoder." + k: v for k, v in too_deep.items()},
                            form="form1", num_heads=1)
