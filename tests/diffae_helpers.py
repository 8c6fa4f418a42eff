"""Builders for official-layout Diff-AE checkpoints from the parity fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_helpers import fake_lightning_class  # noqa: F401  (re-exported)

FIXTURES = Path(__file__).parent / "fixtures" / "diffae"


def load_fixture(name: str = "parity_tiny") -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def official_weights(fixture: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("weights."):]: v for k, v in fixture.items() if k.startswith("weights.")}


def write_lightning_checkpoint(path: Path, state: dict[str, torch.Tensor], *, with_model_copy: bool = True,
                               extra: dict | None = None) -> Path:
    """An official-layout Lightning 1.4 .ckpt: state_dict with model./ema_model. prefixes + callbacks."""
    ModelCheckpoint = fake_lightning_class("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    callback = ModelCheckpoint()
    callback.best_model_score = torch.tensor(0.1)
    callback.dirpath = "checkpoints/x"
    sd = {}
    for k, v in state.items():
        if with_model_copy:
            sd["model." + k] = v.clone() + 0.5  # raw weights differ from EMA: conversion must pick EMA
        sd["ema_model." + k] = v
    sd.update(extra or {})
    ckpt = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.4.5",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [],
    }
    torch.save(ckpt, path)
    return path


def tiny_latent_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(latent fixture, official latent_net.* + conds_* entries)."""
    lat = load_fixture("parity_tiny_latent")
    state = {"latent_net." + k[len("weights."):]: v for k, v in lat.items() if k.startswith("weights.")}
    return lat, state
