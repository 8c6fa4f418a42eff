"""What is trained, per family: stages, their data, trainable parameters and losses.

The training loop (:mod:`semdiff.training.trainer`) knows nothing about any family; it asks the
family's :class:`TrainingObjective` (registered by family name) for

- ``build_model(config, data)``: a fresh family module;
- ``stages(config)``: the ordered :class:`Stage` list (steps, batch size, learning rate, EMA decay);
- ``stage_data(stage, model, data)``: the tensors the stage samples batches from (for example the
  normalised codes of the frozen encoder); it may set buffers of the model (code statistics);
- ``trainable_parameters(stage, model)``;
- ``loss_module(stage, model)``: an ``nn.Module`` whose ``forward(**batch)`` returns
  ``(loss, logs)``; data-parallel wrappers wrap this module, so its forward must run everything
  that has gradients;
- ``preview(stage, model, batch, generator)``: rows of images for the progress grids.

DiffuseVAE and LRDM plug in by registering their own objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from semdiff.training.config import TrainConfig, family_training_module
from semdiff.training.data import TrainData, attribute_targets

OBJECTIVES: dict[str, type["TrainingObjective"]] = {}


def register_objective(cls: type["TrainingObjective"]) -> type["TrainingObjective"]:
    OBJECTIVES[cls.family] = cls
    return cls


def get_objective(family: str) -> "TrainingObjective":
    """The registered objective of ``family``; a family's objective may live in ``semdiff.families.<family>.training``."""
    if family not in OBJECTIVES:
        family_training_module(family)
    if family not in OBJECTIVES:
        raise ValueError(f"no training objective for family {family!r}; trainable: {sorted(OBJECTIVES)}")
    return OBJECTIVES[family]()


@dataclass
class Stage:
    name: str
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


class TrainingObjective:
    family: ClassVar[str] = ""

    def build_model(self, config: TrainConfig, data: TrainData) -> nn.Module:
        raise NotImplementedError

    def stages(self, config: TrainConfig) -> list[Stage]:
        raise NotImplementedError

    def stage_data(self, stage: Stage, model: nn.Module, data: TrainData, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def trainable_parameters(self, stage: Stage, model: nn.Module) -> list[nn.Parameter] | list[dict[str, Any]]:
        """Parameters, or param groups ``{"params": [...], "lr_scale": k}`` (lr = stage lr * k)."""
        raise NotImplementedError

    def loss_module(self, stage: Stage, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def auxiliary(self) -> nn.Module | None:
        """Modules that are trained but not exported (e.g. an auxiliary decoder); built by ``build_model``.
        The trainer moves them to the device and keeps them in checkpoints (``aux.safetensors``)."""
        return None

    def stage_record(self, config: TrainConfig) -> dict[str, dict[str, Any]]:
        """The stages as recorded in the exported model's ``config.json`` (``training.stages``)."""
        return {s.name: {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "ema_decay": s.ema_decay,
                         "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay}
                for s in self.stages(config)}

    def preview(self, stage: Stage, model: nn.Module, batch: dict[str, torch.Tensor],
                generator: torch.Generator, steps: int = 20) -> list[tuple[str, torch.Tensor]]:
        """Rows ``(label, images in [0, 1])`` for the progress grid; ``steps``: sampler steps to use."""
        return []


class LossModule(nn.Module):
    """Holds the model and the objective's auxiliary modules (so DDP sees all their parameters) and a
    loss function ``fn(model, aux, **batch) -> (loss, logs)``."""

    def __init__(self, model: nn.Module, fn: Callable[..., tuple[torch.Tensor, dict[str, Any]]],
                 aux: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.aux = aux
        self.fn = fn

    def forward(self, **batch):
        return self.fn(self.model, self.aux, **batch)


# ------------------------------------------------------------------------------------------------
# Diff-AE


def _images_to_model(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


def timestep_weights(schedule, spec: str = "uniform") -> torch.Tensor | None:
    """Weights (T,) of the per-timestep eps-MSE, mean 1; ``None`` for uniform.

    ``snr-trunc:<max>``: ``clamp(1 / SNR(t), 1, max)``. For noisy t the eps error is tiny while the error
    of the implied x0 is ``eps error / SNR``; weighting by 1/SNR (capped) makes the network learn to use
    z_sem at high noise, which decoding from z_sem alone and sampling need, far sooner than uniform
    weights do.
    """
    if spec in ("uniform", "", None):
        return None
    abar = schedule.alphas_cumprod
    inv_snr = (1 - abar) / abar
    if spec.startswith("snr-trunc:"):
        w = inv_snr.clamp(1.0, float(spec.split(":", 1)[1]))
        return (w / w.mean()).float()
    if spec.startswith("x0-mix:"):
        # half uniform eps-MSE, half the x0-space error (1/SNR, capped): every t keeps at least half its weight
        x0 = inv_snr.clamp(max=float(spec.split(":", 1)[1]))
        w = 1.0 + x0 / x0.mean()
        return (w / w.mean()).float()
    raise ValueError(f"unknown loss weighting {spec!r}: use 'uniform', 'snr-trunc:<max>' or 'x0-mix:<max>'")


def diffae_autoencoder_loss(model, images: torch.Tensor, weights: torch.Tensor | None = None,
                            aux: nn.Module | None = None, aux_weight: float = 0.0):
    """eps-MSE of the z_sem-conditioned UNet, encoder trained jointly (Diff-AE eq. 7), t ~ U{0..T-1};
    optionally weighted per timestep (see :func:`timestep_weights`), optionally plus ``aux_weight`` times the
    MSE of an auxiliary decoder that reconstructs x0 from z_sem alone."""
    x0 = _images_to_model(images)
    t = torch.randint(0, model.num_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = model.schedule.q_sample(x0, t, noise)
    z = model.encoder(x0)
    eps = model.unet(x_t, t, z)
    per_item = (eps.float() - noise).pow(2).flatten(1).mean(1)
    mse = per_item.mean()
    loss = mse if weights is None else (per_item * weights.to(per_item.device)[t]).mean()
    logs = {"mse": mse.detach()}
    if aux is not None and aux_weight > 0:
        rec = F.mse_loss(aux(z).float(), x0)
        loss = loss + aux_weight * rec
        logs["aux_mse"] = rec.detach()
    logs["loss"] = loss.detach()
    return loss, logs


class AuxDecoder(nn.Module):
    """A small deterministic decoder z_sem -> image, used only during training (see ``aux_decoder_weight``)."""

    def __init__(self, z_dim: int, image_size: int, channels: int = 128):
        super().__init__()
        levels = max(0, int(round(math.log2(image_size / 4))))
        if 4 * 2**levels != image_size:
            raise ValueError(f"the auxiliary decoder needs image_size = 4 * 2^k, got {image_size}")
        layers: list[nn.Module] = [nn.Linear(z_dim, channels * 16), nn.Unflatten(1, (channels, 4, 4)), nn.SiLU()]
        ch = channels
        for _ in range(levels):
            out = max(32, ch // 2)
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(ch, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            ch = out
        layers.append(nn.Conv2d(ch, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def diffae_prior_loss(model, aux, codes: torch.Tensor):
    """L1 eps loss of the latent DDIM (the official latent recipe), on normalised codes."""
    t = torch.randint(0, model.num_timesteps, (codes.shape[0],), device=codes.device)
    noise = torch.randn_like(codes)
    z_t = model.latent_schedule.q_sample(codes, t, noise)
    eps = model.latent_net(z_t, t)
    loss = (eps.float() - noise).abs().mean()
    return loss, {"loss": loss.detach()}


def diffae_classifier_loss(model, aux, codes: torch.Tensor, targets: torch.Tensor):
    """Multi-label BCE of the linear classifier on normalised codes."""
    logits = model.classifier(codes)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
    acc = ((logits > 0) == (targets > 0.5)).float().mean()
    return loss, {"loss": loss.detach(), "acc": acc.detach()}


@torch.no_grad()
def encode_all(encoder: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Codes of every image (eval mode, no randomness), float32 on the CPU."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for s in range(0, len(images), batch_size):
        out.append(encoder(_images_to_model(images[s:s + batch_size]).to(device)).float().cpu())
    encoder.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


@register_objective
class DiffAEObjective(TrainingObjective):
    family = "diffae"

    def build_model(self, config: TrainConfig, data: TrainData) -> nn.Module:
        from semdiff.families.diffae import DiffAE

        self.loss_weighting = config.loss_weighting
        self.encoder_lr_scale = float(config.encoder_lr_scale)
        self.aux_weight = float(config.aux_decoder_weight)
        spec = config.resolved_model()
        network = dict(spec.get("network", {}))
        network["image_size"] = config.image_size
        family_config: dict[str, Any] = {k: v for k, v in spec.items() if k not in ("network", "latent_prior")}
        family_config["network"] = network
        z_dim = network.get("z_dim", 512)
        if config.prior_steps > 0:
            family_config["latent_prior"] = {**spec.get("latent_prior", {}), "z_dim": z_dim}
        else:
            family_config["latent_prior"] = None
        if config.classifier_steps > 0:
            groups: dict[str, list[str]] = {}
            names, _ = attribute_targets(data, config.attribute_labels, groups=groups)
            if not names:
                raise ValueError(f"classifier_steps > 0 but the data set {data.name!r} has no labels to classify")
            family_config["attributes"] = names
            family_config["attribute_labels"] = list(config.attribute_labels) if config.attribute_labels else None
            # attributes made from one label (one-hot values): edits of one may move its siblings
            family_config["attribute_groups"] = groups
        else:
            family_config["attributes"] = []
        model = DiffAE(family_config)
        self.aux_decoder = AuxDecoder(z_dim, config.image_size) if self.aux_weight > 0 and config.steps > 0 else None
        return model

    def auxiliary(self):
        return getattr(self, "aux_decoder", None)

    def stage_record(self, config: TrainConfig) -> dict[str, dict[str, Any]]:
        record = super().stage_record(config)
        weighting = "" if config.loss_weighting == "uniform" else f", timestep weights {config.loss_weighting}"
        record["autoencoder"].update(loss="eps MSE" + weighting, encoder_lr_scale=config.encoder_lr_scale,
                                     aux_decoder_weight=config.aux_decoder_weight)
        record["prior"]["loss"] = "eps L1 on normalised codes"
        record["classifier"]["loss"] = "multi-label BCE on normalised codes"
        return record

    def stages(self, config: TrainConfig) -> list[Stage]:
        return [
            Stage("autoencoder", config.steps, config.batch_size, config.lr, config.weight_decay,
                  config.warmup_steps, config.ema_decay, config.grad_clip),
            Stage("prior", config.prior_steps, config.prior_batch_size, config.prior_lr, 0.0,
                  config.warmup_steps, config.prior_ema_decay, config.grad_clip),
            # plain Adam (AdamW without decay) and no EMA: the official classifier recipe
            Stage("classifier", config.classifier_steps, config.classifier_batch_size, config.classifier_lr,
                  0.0, 0, 0.0, None),
        ]

    def _codes(self, model, data: TrainData, device) -> torch.Tensor:
        """Codes of the frozen encoder; sets the model's ``codes_mean``/``codes_std`` from them."""
        z = encode_all(model.encoder, data.images, device)
        mean = z.mean(0, keepdim=True)
        std = z.std(0, keepdim=True).clamp_min(1e-6)
        model.codes_mean.copy_(mean.to(model.codes_mean))
        model.codes_std.copy_(std.to(model.codes_std))
        return (z - mean) / std

    def stage_data(self, stage, model, data, device):
        if stage.name == "autoencoder":
            return {"images": data.images}
        codes = self._codes(model, data, device)
        if stage.name == "prior":
            return {"codes": codes}
        return {"codes": codes, "targets": self._targets(model, data)}

    def _targets(self, model, data: TrainData) -> torch.Tensor:
        labels = model.config.get("attribute_labels")
        names, targets = attribute_targets(data, labels)
        want = list(model.attribute_names)
        if names != want:  # the model may have been built from a different label set
            index = {n: i for i, n in enumerate(names)}
            missing = [n for n in want if n not in index]
            if missing:
                raise ValueError(f"the data set has no targets for attributes {missing}")
            targets = targets[:, [index[n] for n in want]]
        return targets

    def trainable_parameters(self, stage, model):
        if stage.name == "autoencoder":
            scale = getattr(self, "encoder_lr_scale", 1.0)
            groups = [{"params": list(model.encoder.parameters()), "lr_scale": scale},
                      {"params": list(model.unet.parameters()), "lr_scale": 1.0}]
            if self.auxiliary() is not None:
                groups.append({"params": list(self.auxiliary().parameters()), "lr_scale": 1.0})
            return groups
        if stage.name == "prior":
            return list(model.latent_net.parameters())
        return list(model.classifier.parameters())

    def loss_module(self, stage, model):
        if stage.name == "autoencoder":
            weights = timestep_weights(model.schedule, getattr(self, "loss_weighting", "uniform"))
            aux_weight = getattr(self, "aux_weight", 0.0)
            return LossModule(model, lambda m, aux, images: diffae_autoencoder_loss(m, images, weights, aux, aux_weight),
                              aux=self.auxiliary())
        fn = {"prior": diffae_prior_loss, "classifier": diffae_classifier_loss}[stage.name]
        return LossModule(model, fn)

    @torch.no_grad()
    def preview(self, stage, model, batch, generator, steps=20):
        if stage.name == "classifier":
            return []
        from semdiff.sampling import ddim_invert, ddim_sample, space_timesteps

        images = batch["images"]
        device = next(model.parameters()).device
        x0 = _images_to_model(images).to(device)
        n = len(x0)
        timesteps = space_timesteps(model.num_timesteps, steps, "ddim")
        z = model.encoder(x0)
        eps_model = lambda x, t: model.unet(x, t, z)  # noqa: E731
        noise = torch.randn(x0.shape, generator=generator).to(device)
        rec_z = ddim_sample(eps_model, noise, model.schedule, timesteps, clip_x0=True)
        x_T = ddim_invert(eps_model, x0, model.schedule, timesteps, clip_x0=True)
        rec = ddim_sample(eps_model, x_T, model.schedule, timesteps, clip_x0=True)
        rows = [("input", x0), ("z + random x_T", rec_z), ("z + inverted x_T", rec)]
        if stage.name == "prior" and model.latent_net is not None:
            prior_noise = torch.randn((n, model.code_dim), generator=generator).to(device)
            x_T = torch.randn(x0.shape, generator=generator).to(device)
            z_s = model.sample_codes(n, steps=max(steps, 10), noise=prior_noise)
            samples = ddim_sample(lambda x, t: model.unet(x, t, z_s), x_T, model.schedule, timesteps, clip_x0=True)
            rows.append(("prior samples", samples))
        return [(name, (x.float().cpu() + 1) / 2) for name, x in rows]
