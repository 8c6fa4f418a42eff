"""Builders for official-layout DiffuseVAE Lightning checkpoints from the parity fixture."""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "diffusevae"
KEYS = Path(__file__).parent / "fixtures" / "official-keys" / "diffusevae"

_CACHE: dict[str, object] = {}


def load_fixture() -> dict[str, torch.Tensor]:
    if "tensors" not in _CACHE:
        _CACHE["tensors"] = load_file(str(FIXTURES / "parity_tiny.safetensors"))
    return _CACHE["tensors"]  # type: ignore[return-value]


def fixture_json() -> dict:
    if "json" not in _CACHE:
        _CACHE["json"] = json.loads((FIXTURES / "parity_tiny.json").read_text())
    return _CACHE["json"]  # type: ignore[return-value]


def vae_hparams(input_res: bool = True) -> dict:
    vc = fixture_json()["vae_config"]
    hp = {"enc_block_str": vc["enc_block_config"], "dec_block_str": vc["dec_block_config"],
          "enc_channel_str": vc["enc_channel_config"], "dec_channel_str": vc["dec_channel_config"],
          "alpha": 1.0, "lr": 1e-4}
    if input_res:
        hp = {"input_res": vc["input_res"], **hp}
    return hp


def official_state(prefix: str) -> dict[str, torch.Tensor]:
    """The fixture's weights under one prefix ('vae', 'unet', 'unet_z'), prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in load_fixture().items() if k.startswith(p)}


@contextlib.contextmanager
def importable(*qualified_names: str, base: type = object):
    """Classes importable under the official module paths while a checkpoint is pickled, then removed."""
    added, classes = [], []
    try:
        for qualified in qualified_names:
            module, _, name = qualified.rpartition(".")
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod not in sys.modules:
                    sys.modules[mod] = types.ModuleType(mod)
                    added.append(mod)
            cls = getattr(sys.modules[module], name, None)
            if cls is None:
                cls = type(name, (dict,) if name == "AttributeDict" else (base,), {"__module__": module})
                setattr(sys.modules[module], name, cls)
            classes.append(cls)
        yield classes
    finally:
        for mod in reversed(added):
            sys.modules.pop(mod, None)


def _schedule_buffers(prefix: str) -> dict[str, torch.Tensor]:
    betas = torch.linspace(1e-4, 0.02, 1000).double()
    ab = torch.cumprod(1 - betas, 0)
    abs_ = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    post = betas * (1 - abs_) / (1 - ab)
    return {prefix + k: v for k, v in {
        "betas": betas, "sqrt_alpha_bar": ab.sqrt(), "minus_sqrt_alpha_bar": (1 - ab).sqrt(),
        "sqrt_recip_alphas_cumprod": (1 / ab).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ab - 1).sqrt(),
        "post_variance": post, "post_log_variance_clipped": torch.log(torch.cat([post[1:2], post[1:]])),
        "post_coeff_1": betas * abs_.sqrt() / (1 - ab), "post_coeff_2": (1 - betas).sqrt() * (1 - abs_) / (1 - ab),
    }.items()}


def write_vae_checkpoint(path: Path, *, state: dict | None = None, hparams: dict | None = None) -> Path:
    """An official-layout VAE .ckpt: enc./dec. state, hyper_parameters as Lightning's AttributeDict."""
    state = official_state("vae") if state is None else state
    hparams = vae_hparams() if hparams is None else hparams
    with importable("pytorch_lightning.utilities.parsing.AttributeDict",
                    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint") as (AttributeDict, ModelCheckpoint):
        ckpt = {
            "epoch": 499, "global_step": 97000, "pytorch-lightning_version": "1.4.9",
            "state_dict": dict(state),
            "callbacks": {ModelCheckpoint: {"best_model_score": None, "dirpath": "vae/checkpoints"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}], "lr_schedulers": [],
            "hparams_name": "kwargs", "hyper_parameters": AttributeDict(hparams),
        }
        torch.save(ckpt, path)
    return path


def write_ddpm_checkpoint(path: Path, *, unet: str = "unet", ema: bool = True, online: bool = True,
                          vae: dict | None = None, extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """An official-layout DDPMWrapper .ckpt: online/target UNets, their buffers, the VAE under vae.*,
    and the EMA callback record keyed by its class (models.callbacks.EMAWeightUpdate)."""
    weights = official_state(unet)
    sd: dict[str, torch.Tensor] = {}
    if online:
        sd.update({"online_network.decoder." + k: v + 0.25 for k, v in weights.items()})  # differs from the EMA
        sd.update(_schedule_buffers("online_network."))
    if ema:
        sd.update({"target_network.decoder." + k: v for k, v in weights.items()})
        sd.update(_schedule_buffers("target_network."))
    vae_state = official_state("vae") if vae is None else vae
    sd.update({"vae." + k: v for k, v in vae_state.items()})
    sd.update(extra or {})
    for key in drop:
        del sd[key]
    with importable("models.callbacks.EMAWeightUpdate",
                    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint") as (EMA, ModelCheckpoint):
        ckpt = {
            "epoch": 1200, "global_step": 231000, "pytorch-lightning_version": "1.4.9",
            "state_dict": sd,
            "callbacks": {EMA: {}, ModelCheckpoint: {"best_model_score": torch.tensor(0.0361)}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-5}]}], "lr_schedulers": [{"last_epoch": 3}],
        }
        torch.save(ckpt, path)
    return path


def convert_fixture(tmp: Path, form: str = "form1", *, unet: str = "unet", name: str | None = None) -> Path:
    """Write the fixture as official checkpoints and convert them with the Python API."""
    from semdiff.families.diffusevae.convert import convert_diffusevae_checkpoint

    heads = fixture_json()["unet_config" if unet == "unet" else "unet_z_config"]["num_heads"]
    tmp.mkdir(parents=True, exist_ok=True)
    vae = write_vae_checkpoint(tmp / "vae.ckpt")
    ddpm = write_ddpm_checkpoint(tmp / f"ddpm_{unet}.ckpt", unet=unet)
    return convert_diffusevae_checkpoint(vae, ddpm, tmp / (name or f"model_{form}_{unet}"), form=form, num_heads=heads)
