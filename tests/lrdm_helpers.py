"""Builders for official-layout LRDM checkpoints from the parity fixture (tests/fixtures/lrdm)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_helpers import fake_lightning_class  # noqa: F401  (re-exported)

FIXTURES = Path(__file__).parent / "fixtures" / "lrdm"
KEYS = Path(__file__).parent / "fixtures" / "official-keys" / "lrdm"

#: the tiny first stage of the API tests: f = 4 (3 levels), so the fixture's 3x16x16 latent is a 64x64 image
TINY_VQ = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 64], layers_per_block=1,
               act_fn="silu", latent_channels=3, num_vq_embeddings=64, norm_num_groups=32, sample_size=64)
SCALE = 0.8125  # a non-trivial scale_factor (1/std), exactly representable; inverse 1/0.8125
INV_SCALE = 1.0 / SCALE


def load_fixture() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "parity_tiny.safetensors"))


def fixture_meta() -> dict:
    return json.loads((FIXTURES / "parity_tiny.json").read_text())


def fixture_configs() -> tuple[dict, dict]:
    """(unet params, representation params) of the fixture, in semdiff's config layout."""
    meta = fixture_meta()
    enc = meta["encoder_config (RepresentationAE)"]["params"]
    rep = {"embed_dim": enc["embed_dim"], "encoder": dict(enc["enc_config"]["params"]),
           "decoder": dict(enc["dec_config"]["params"])}
    return dict(meta["unet_config (DiffusionUNetReprCond)"]["params"]), rep


def tiny_vq(seed: int = 0):
    """A random tiny diffusers VQModel (the first stage of the API tests) with a spread-out codebook."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(**TINY_VQ).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    return vq


_INV_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm_vq(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """diffusers VQModel keys -> CompVis ldm keys (the inverse of semdiff's mapping, written independently)."""
    out = {}
    for k, v in state.items():
        new = k
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", k)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{_INV_ATTN[m.group(2)]}.{m.group(3)}"
            if v.dim() == 2:
                v = v[:, :, None, None]
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda mm: f"mid.block_{int(mm.group(1)) + 1}", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda mm: f"decoder.up.{num_levels - 1 - int(mm.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda mm: f"decoder.up.{num_levels - 1 - int(mm.group(1))}.upsample.", new)
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[new] = v
    return out


def official_state(fx: dict[str, torch.Tensor], *, vq=None, with_ema: bool = True,
                   scale: float = SCALE) -> dict[str, torch.Tensor]:
    """An official ``DiffusionModel.state_dict()`` from the fixture: EMA UNet = fixture UNet, raw
    ``diff_model`` weights deliberately different, repr_ae, ae_model (ldm keys), scaling buffers."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in fx.items():
        if k.startswith("unet."):
            name = k[len("unet."):]
            if with_ema:
                sd["diff_model." + name] = v.clone() + 0.5  # raw weights differ: conversion must pick EMA
                sd["ema." + name.replace(".", "")] = v.clone()
            else:
                sd["diff_model." + name] = v.clone()
        elif k.startswith("encoder."):
            sd["repr_ae." + k[len("encoder."):]] = v.clone()
    if with_ema:
        sd["ema.decay"] = torch.tensor(0.9999)
        sd["ema.num_updates"] = torch.tensor(1234, dtype=torch.int)
    if vq is not None:
        ldm = diffusers_to_ldm_vq(vq.state_dict(), len(vq.config.block_out_channels))
        sd.update({"ae_model." + k: v.clone() for k, v in ldm.items()})
    sd["scale_factor"] = torch.tensor(scale)
    sd["inverse_scale_factor"] = torch.tensor(1.0 / scale)
    sd["running_std.running_n_batches"] = torch.tensor(100, dtype=torch.int)
    sd["running_std.batch_size"] = torch.tensor(1000, dtype=torch.int)
    sd["running_std.running_mean"] = torch.tensor(0.01)
    sd["running_std.running_M"] = torch.tensor(1.5)
    return sd


def write_lightning_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Lightning 1.2-style .ckpt: state_dict + callbacks keyed by the ModelCheckpoint class + optimizer state."""
    ModelCheckpoint = fake_lightning_class("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    ckpt = {
        "epoch": 7,
        "global_step": 4321,
        "pytorch-lightning_version": "1.2.4",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": torch.tensor(0.1),
                                        "best_model_path": "x.ckpt", "current_score": None, "dirpath": "ckpts"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [],
    }
    torch.save(ckpt, path)
    return path


def write_vq_checkpoint(path: Path, vq) -> Path:
    """A CompVis-style vq model.ckpt (ldm keys plus loss.* keys that conversion must drop)."""
    ldm = diffusers_to_ldm_vq(vq.state_dict(), len(vq.config.block_out_channels))
    ldm["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    ldm["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": ldm, "global_step": 1}, path)
    return path


def meta_official(spec: dict) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    return {e["key"]: torch.empty(e["shape"], dtype=dtypes[e["dtype"]], device="meta") for e in spec["state_dict"]}
