"""Training LRDM with ``semdiff train``: the objective, the presets and the bundled manifest entry.

Two stages (``semdiff train --preset lrdm-emoji32``):

1. ``first_stage``: a small VQ-f4 autoencoder (diffusers ``VQModel``, LRDM's first-stage class) trained
   with the pixel MSE of ``decode(quantize(encode(x)))`` plus taming's VQ loss (codebook term +
   ``beta``-weighted commitment, straight-through gradients; no GAN, no LPIPS). The codebook is
   initialised from the encoder's latents and unused codes are restarted from latents of the current
   batch during the first part of the stage (low-dimensional codebooks collapse otherwise).
2. ``lrdm``: with the first stage frozen, ``scale_factor = 1 / std`` of the training latents (as LDM
   does; the official running estimate converges to ``1/sqrt(std)``, see ``lrdm.md``), then the
   representation encoder/decoder and the x0-predicting UNet trained jointly on
   ``mean((f(z_t, t, D_r(r)) - z0)^2) + kl_weight * mean_B(KL(q(r | z0) || N(0, I)))`` with the
   reparameterised ``r ~ q(r | z0)``, t ~ U{0..T-1} (the official ``DDPMImageLoss`` + KL term).

The TrainConfig's ``steps``/``batch_size``/``lr``/``warmup_steps``/``ema_decay`` are the ``lrdm``
stage's; the first stage's knobs and the KL weight live in the preset's ``model["train"]``
(``--model-config '{"train": {"first_stage_steps": 0}}'`` skips it, e.g. for a given first stage).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semdiff.training.config import TrainConfig, register_preset
from semdiff.training.data import TrainData
from semdiff.training.objectives import LossModule, Stage, TrainingObjective, register_objective

#: the first-stage and KL knobs (``model["train"]``) and their defaults
TRAIN_DEFAULTS: dict[str, Any] = {
    "first_stage_steps": 3000,
    "first_stage_batch_size": 32,
    "first_stage_lr": 1e-3,
    "first_stage_warmup_steps": 100,
    "first_stage_ema_decay": 0.0,  # the plain weights (codebook restarts make an average meaningless)
    "codebook_restart_every": 100,  # steps between restarts of unused codes
    "codebook_restart_until": 0.6,  # fraction of the stage after which codes are no longer restarted
    # official representation_kl_weight is 1e-4 on a 3x64x64 latent (x0 MSE is a per-element mean, the KL
    # a per-item sum); 5e-3 on a 3x8x8 latent keeps lambda * latent elements (~1) about the same. The emoji
    # preset uses 1e-3: at 5e-3 the KL was still ~3.5 nats per image after 1800 steps (r nearly unused)
    "kl_weight": 5e-3,
}


def _images_to_model(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


def _train_options(spec: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec.get("train") or {}) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LRDM training option(s) {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    return {**TRAIN_DEFAULTS, **(spec.get("train") or {})}


def family_config(spec: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The LRDM family config of a preset's ``model``: resolutions filled in from ``image_size``."""
    from semdiff.families.lrdm.first_stage import downsampling_factor

    spec = copy.deepcopy(spec)
    spec.pop("train", None)
    first = dict(spec["first_stage"])
    first["sample_size"] = image_size
    factor = downsampling_factor(first)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by the first stage's factor {factor}")
    res = image_size // factor
    unet = dict(spec["unet"])
    unet["resolution"] = res
    unet["in_channels"] = first.get("latent_channels", 3)
    rep = copy.deepcopy(spec["representation"])
    rep["encoder"] = {**rep["encoder"], "resolution": res, "in_channels": unet["in_channels"]}
    rep["decoder"] = {**rep["decoder"], "resolution": res}
    return {**spec, "first_stage": first, "unet": unet, "representation": rep}


class CodebookUsage(nn.Module):
    """Training-only state of the first stage (kept in checkpoints, not exported): a decayed count of
    how often each code was chosen, and the number of steps taken."""

    def __init__(self, num_codes: int):
        super().__init__()
        self.register_buffer("usage", torch.zeros(num_codes))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


@torch.no_grad()
def restart_codes(embedding: torch.Tensor, usage: torch.Tensor, latents: torch.Tensor,
                  generator: torch.Generator | None = None) -> int:
    """Replace codes used less than 3% as often as the average by latent vectors (N, D) of the batch
    (plus a little noise); returns how many codes were restarted."""
    n = embedding.shape[0]
    dead = usage < 0.03 * usage.sum() / n
    k = int(dead.sum())
    if k == 0 or len(latents) == 0:
        return 0
    pick = torch.randint(0, len(latents), (k,), generator=generator, device="cpu").to(latents.device)
    new = latents[pick] + 0.01 * latents.std(0, keepdim=True) * torch.randn_like(latents[pick])
    embedding[dead] = new.to(embedding)
    usage[dead] = usage.sum() / n
    return k


def first_stage_loss(model, aux: CodebookUsage | None, images: torch.Tensor, *, restart_every: int = 0,
                     restart_until: int = 0):
    """Pixel MSE of the VQ reconstruction (quantised, straight-through) + taming's VQ loss."""
    vq = model.first_stage
    x = _images_to_model(images)
    h = vq.encode(x).latents
    logs: dict[str, Any] = {}
    if aux is not None and vq.training:
        step = int(aux.steps)
        flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        if restart_every and 0 < step < restart_until and step % restart_every == 0:
            logs["restarted"] = float(restart_codes(vq.quantize.embedding.weight.data, aux.usage, flat))
        aux.steps += 1
    quant, vq_loss, (_, _, indices) = vq.quantize(h)
    rec = vq.decode(quant, force_not_quantize=True).sample
    mse = F.mse_loss(rec.float(), x)
    loss = mse + vq_loss
    if aux is not None and vq.training:
        with torch.no_grad():
            aux.usage.mul_(0.98).add_(torch.bincount(indices.flatten(), minlength=aux.usage.numel()).to(aux.usage))
            logs["codes_used"] = float((aux.usage > 0.03 * aux.usage.sum() / aux.usage.numel()).sum())
    logs.update({"loss": loss.detach(), "mse": mse.detach(), "vq": vq_loss.detach()})
    return loss, logs


def lrdm_loss(model, aux, latents: torch.Tensor, *, kl_weight: float):
    """The official objective: x0 MSE of the representation-conditioned UNet (``DDPMImageLoss``, no
    weighting) + ``kl_weight`` x the per-item KL of q(r | z0) to N(0, I), r reparameterised."""
    from semdiff.families.lrdm.networks import kl_to_standard_normal, posterior_sample

    z0 = latents
    t = torch.randint(0, model.schedule.num_timesteps, (z0.shape[0],), device=z0.device)
    noise = torch.randn_like(z0)
    z_t = model.schedule.q_sample(z0, t, noise)
    mean, logvar = model.posterior(z0)
    r = posterior_sample(mean, logvar, torch.randn_like(mean))
    x0 = model.unet(z_t, t, model.features(r))
    mse = (x0.float() - z0).pow(2).mean()
    kl = kl_to_standard_normal(mean.float(), logvar.float()).mean()
    loss = mse + kl_weight * kl
    return loss, {"loss": loss.detach(), "mse": mse.detach(), "kl": kl.detach()}


@torch.no_grad()
def encode_latents(model, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """Pre-quantisation first-stage latents of every image (unscaled), float32 on the CPU."""
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = _images_to_model(images[s:s + batch_size]).to(device)
        out.append((x if model.first_stage is None else model.first_stage.encode(x).latents).float().cpu())
    model.train(was)
    return torch.cat(out)


@register_objective
class LRDMObjective(TrainingObjective):
    family = "lrdm"

    def build_model(self, config: TrainConfig, data: TrainData) -> nn.Module:
        from semdiff.families.lrdm import LRDM

        spec = config.resolved_model()
        self.options = _train_options(spec)
        for name in ("prior_steps", "classifier_steps"):
            if getattr(config, name):
                raise ValueError(f"LRDM has no {name.split('_')[0]} stage (its prior is N(0, I)); set {name}=0")
        family = family_config(spec, config.image_size)
        o = self.options
        family["training_recipe"] = {
            "first_stage": {"steps": o["first_stage_steps"], "batch_size": o["first_stage_batch_size"],
                            "lr": o["first_stage_lr"], "warmup_steps": o["first_stage_warmup_steps"],
                            "loss": "pixel MSE of the quantised reconstruction + VQ codebook/commitment loss "
                                    "(beta 0.25); unused codes restarted"},
            "lrdm": {"steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
                     "warmup_steps": config.warmup_steps, "ema_decay": config.ema_decay,
                     "loss": "x0 MSE (latent) + kl_weight * KL(q(r|z0) || N(0, I))", "kl_weight": o["kl_weight"]},
        }
        model = LRDM(family)
        self.usage = CodebookUsage(model.first_stage.config.num_vq_embeddings) if o["first_stage_steps"] > 0 else None
        return model

    def auxiliary(self):
        return getattr(self, "usage", None)

    def stages(self, config: TrainConfig) -> list[Stage]:
        o = getattr(self, "options", None) or _train_options(config.resolved_model())
        return [
            Stage("first_stage", int(o["first_stage_steps"]), int(o["first_stage_batch_size"]),
                  float(o["first_stage_lr"]), 0.0, int(o["first_stage_warmup_steps"]),
                  float(o["first_stage_ema_decay"]), config.grad_clip),
            Stage("lrdm", config.steps, config.batch_size, config.lr, config.weight_decay, config.warmup_steps,
                  config.ema_decay, config.grad_clip),
        ]

    def stage_data(self, stage, model, data, device):
        if stage.name == "first_stage":
            self._init_codebook(model, data, device)
            return {"images": data.images}
        latents = encode_latents(model, data.images, device)
        std = float(latents.std())
        model.scale_factor.fill_(1.0 / std)
        model.inverse_scale_factor.fill_(std)
        return {"latents": latents / std}

    @torch.no_grad()
    def _init_codebook(self, model, data: TrainData, device) -> None:
        """Codebook <- latents of the (fresh) encoder at random positions of random images."""
        if getattr(self, "usage", None) is not None and int(self.usage.steps) > 0:
            return  # resumed: the codebook is in the checkpoint
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(data), generator=g)[:256]
        h = encode_latents(model, data.images[idx], device)
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        emb = model.first_stage.quantize.embedding.weight
        pick = torch.randint(0, len(flat), (emb.shape[0],), generator=g)
        emb.copy_(flat[pick].to(emb))

    def trainable_parameters(self, stage, model):
        if stage.name == "first_stage":
            return list(model.first_stage.parameters())
        return list(model.unet.parameters()) + list(model.repr_ae.parameters())

    def loss_module(self, stage, model):
        o = self.options
        if stage.name == "first_stage":
            until = int(o["codebook_restart_until"] * stage.steps)
            every = int(o["codebook_restart_every"])
            return LossModule(model, lambda m, aux, images: first_stage_loss(
                m, aux, images, restart_every=every, restart_until=until), aux=self.auxiliary())
        kl_weight = float(o["kl_weight"])
        return LossModule(model, lambda m, aux, latents: lrdm_loss(m, aux, latents, kl_weight=kl_weight))

    @torch.no_grad()
    def preview(self, stage, model, batch, generator, steps=20):
        images = batch["images"]
        device = next(model.parameters()).device
        x = _images_to_model(images).to(device)
        n = len(x)
        rows = [("input", x)]
        vq = model.first_stage
        rows.append(("first stage (VQ)", vq.decode(vq.encode(x).latents).sample))
        if stage.name == "lrdm":
            z = model.encode(x)
            x_T = torch.randn((n, *model.latent_shape), generator=generator).to(device)
            rows.append(("r mean + random x_T", model.decode(z, x_T, steps=steps)))
            r = model.sample_codes(n, generator=generator).to(device)
            x_T = torch.randn((n, *model.latent_shape), generator=generator).to(device)
            rows.append(("r ~ N(0, I) samples", model.decode(r, x_T, steps=steps)))
        return [(name, ((im.float().cpu() + 1) / 2).clamp(0, 1)) for name, im in rows]


# ------------------------------------------------------------------------------------------------
# presets


def _vq(widths, layers, codes, groups):
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "block_out_channels": list(widths),
            "layers_per_block": layers, "act_fn": "silu", "latent_channels": 3, "num_vq_embeddings": codes,
            "norm_num_groups": groups}


def _nets(ch, mult, nrb, attn, repr_ch, enc_ch, embed_dim, heads_ch):
    common = {"embedding_type": "positional", "resample_with_resblock": True, "resample_with_conv": True,
              "dropout": 0.0}
    return {
        "unet": {"ch": ch, "ch_mult": list(mult), "num_res_blocks": nrb, "attn_resolutions": list(attn),
                 "num_ch_per_head": heads_ch, "nonlinearity": "silu", "use_adaptive_group_norm": True,
                 "scale_by_sqrt2": False, "repr_ch": repr_ch, "repr_ch_mult": list(mult), **common},
        "representation": {
            "embed_dim": embed_dim,
            "encoder": {"ch": enc_ch, "ch_mult": list(mult), "num_res_blocks": nrb, "attn_resolutions": [],
                        "z_channels": embed_dim, "num_ch_per_head": heads_ch, **common},
            "decoder": {"ch": repr_ch, "ch_mult": list(mult), "num_res_blocks": nrb, "attn_resolutions": [],
                        "z_channels": embed_dim, "num_ch_per_head": heads_ch, **common},
        },
    }


PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: tests and smoke runs (16x16 shapes -> 4x4x3 latents -> r 4x2x2)
    "lrdm-tiny": dict(
        family="lrdm", data="shapes", image_size=16, data_limit=256, steps=40, batch_size=8, lr=1e-3,
        prior_steps=0, classifier_steps=0, ema_decay=0.9, ckpt_every=20, log_every=10, preview_steps=4,
        model={"first_stage": _vq([16, 16, 16], 1, 32, 8),
               **_nets(16, (1, 2), 1, (), 8, 8, 4, 8),
               "default_steps": {"encode_stochastic": 5, "decode": 5, "manipulate": 5, "prior": 5},
               "train": {"first_stage_steps": 40, "first_stage_batch_size": 8, "first_stage_lr": 2e-3,
                         "first_stage_warmup_steps": 0, "codebook_restart_every": 10}},
    ),
    # the shipped semdiff-emoji32-lrdm: 32x32 emoji -> VQ-f4 latents 3x8x8 -> r 32x2x2 (128 dims)
    "lrdm-emoji32": dict(
        family="lrdm", data="emoji", image_size=32, steps=9000, batch_size=64, lr=5e-4, warmup_steps=200,
        ema_decay=0.999, grad_clip=1.0, holdout=0.1, prior_steps=0, classifier_steps=0,
        ckpt_every=500, sample_every=2000, log_every=50, preview_steps=20,
        model={"first_stage": _vq([32, 32, 32], 1, 512, 16),
               **_nets(32, (1, 1, 2), 1, (4,), 16, 16, 32, 16),
               # DDIM inversion of this model needs ~100 steps (PSNR 17.8 dB at 20, 21.1 at 50, 23.1 at 100)
               "default_steps": {"encode_stochastic": 100, "decode": 100, "manipulate": 100, "prior": 100},
               "train": {"first_stage_steps": 2500, "first_stage_batch_size": 32, "first_stage_lr": 1e-3,
                         "first_stage_warmup_steps": 100, "kl_weight": 1e-3}},
    ),
}

for _name, _values in PRESETS.items():
    register_preset(_name, _values)


# ------------------------------------------------------------------------------------------------
# the bundled model's manifest entry


def manifest_entry(folder: Path, rel_path: str, config: dict[str, Any], metrics: dict[str, Any] | None) -> dict:
    """The manifest entry of a bundled LRDM trained by ``semdiff train`` (called by ``export_bundled``); also
    rewrites the folder's README.md with an LRDM model card (the generic card describes Diff-AE)."""
    from semdiff.training.export import EMOJI_LICENSE_FIELDS, compact_metrics, sha256_file

    files = {name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
             for name in ("config.json", "model.safetensors")}
    steps = config.get("default_steps") or {}
    training = config.get("training") or {}
    recipe = config.get("training_recipe") or {}
    rep = config["representation"]
    r_shape = [rep["embed_dim"], rep["encoder"]["resolution"] // 2 ** (len(rep["encoder"]["ch_mult"]) - 1)]
    r_shape.append(r_shape[1])
    size = int(config["image_size"])
    wall = training.get("wall_time_s", {})
    entry: dict[str, Any] = {
        "family": "lrdm",
        "kind": "autoencoder",
        "description": (f"LRDM trained from scratch with `semdiff train --preset {training.get('preset')}` on "
                        f"{training.get('data_items')} OpenMoji emoji at {size}x{size} (CPU): a small VQ-f4 first "
                        f"stage (latent 3x{size // 4}x{size // 4}), representation encoder (r "
                        f"{'x'.join(map(str, r_shape))}, N(0, I) prior by KL), x0-predicting latent UNet. "
                        "Ships inside the wheel."),
        "status": "bundled",
        "source": {"type": "bundled", "path": rel_path, "files": files},
        **EMOJI_LICENSE_FIELDS,
        "paper": {
            "title": "Representation Learning with Diffusion Models",
            "authors": "Jeremias Traub",
            "venue": "Master's thesis, Heidelberg University (2022)", "arxiv": "2210.11058",
            "url": "https://arxiv.org/abs/2210.11058",
            "code": "https://github.com/jeremiastraub/diffusion",
        },
        "preprocessing": {"image_size": size, "alignment": "none",
                          "resize": "emoji rendered at 4x and area-averaged to 32x32 on white", "range": [-1, 1]},
        "defaults": {k: int(steps.get(k, 50)) for k in ("encode_stochastic", "decode", "manipulate", "prior")},
        "notes": [
            f"Held-out split: SHA-256 of the codepoints without skin-tone modifiers < {training.get('holdout')}; "
            "all skin-tone variants of a held-out emoji are held out.",
            "Training stages (steps, wall time): " + ", ".join(
                f"{k} {v.get('steps')} ({wall[k] / 60:.0f} min)" if k in wall else f"{k} {v.get('steps')}"
                for k, v in recipe.items()),
            f"Objective: {recipe.get('lrdm', {}).get('loss')}, kl_weight {recipe.get('lrdm', {}).get('kl_weight')}; "
            "first stage: " + str(recipe.get("first_stage", {}).get("loss")),
            "No attribute classifiers: fit them with `semdiff fit-attributes`.",
        ],
    }
    if metrics:
        entry["metrics"] = compact_metrics(metrics)
    (folder / "README.md").write_text(render_card(config, name=folder.name, metrics=metrics))
    return entry


def render_card(config: dict[str, Any], *, name: str, metrics: dict[str, Any] | None = None) -> str:
    """README.md of an LRDM trained by ``semdiff train``: what it is, its licence, recipe and figures."""
    from semdiff.training.card import metrics_markdown

    training = config.get("training") or {}
    recipe = config.get("training_recipe") or {}
    wall = training.get("wall_time_s", {})
    size = config.get("image_size")
    rep = config["representation"]
    levels = len(rep["encoder"]["ch_mult"]) - 1
    r = f"{rep['embed_dim']}x{rep['encoder']['resolution'] // 2 ** levels}x{rep['encoder']['resolution'] // 2 ** levels}"
    openmoji = training.get("data") == "emoji"
    lines = ["---", "library_name: semdiff", f"license: {'cc-by-sa-4.0' if openmoji else 'other'}", "tags:",
             "- semdiff", "- lrdm", "- diffusion", "- autoencoder", "pipeline_tag: image-to-image", "---", "",
             f"# {name}", "",
             f"An LRDM (Traub 2022, arXiv:2210.11058) trained from scratch with `semdiff train --preset "
             f"{training.get('preset')}` on `{training.get('data')}` at {size}x{size}: a small VQ-f4 first stage, a "
             f"representation encoder q(r | z0) with r of shape {r} kept close to N(0, I) by a KL term, and an "
             "x0-predicting UNet on the first-stage latents "
             "conditioned on D_r(r). Unconditional samples: r ~ N(0, I), no separate prior network.", "",
             "```python", "from semdiff import SemanticAutoencoder",
             f"model = SemanticAutoencoder.from_pretrained(\"{name}\")", "```", ""]
    if openmoji:
        lines += ["## Licence", "",
                  "Trained on emoji images rendered from the **OpenMoji** font: \"All emojis designed by OpenMoji - "
                  "the open-source emoji and icon project. License: CC BY-SA 4.0\" (https://openmoji.org). These "
                  "weights, and the images they produce, are adaptations of that artwork and are shared under "
                  "**CC BY-SA 4.0** with the same attribution.", ""]
    lines += ["## Training", "", "| stage | steps | batch | lr | loss | wall time |", "| --- | --- | --- | --- | --- | --- |"]
    for stage, info in recipe.items():
        minutes = f"{wall[stage] / 60:.1f} min" if stage in wall else "-"
        loss = str(info.get("loss")).replace("|", "\\|")  # pipes would split the table cell
        lines.append(f"| {stage} | {info.get('steps')} | {info.get('batch_size')} | {info.get('lr')} | "
                     f"{loss} | {minutes} |")
    lines += ["", f"kl_weight {recipe.get('lrdm', {}).get('kl_weight')}; AdamW, gradient clipping "
              f"{training.get('grad_clip')}, EMA {recipe.get('lrdm', {}).get('ema_decay')} (UNet and representation "
              f"networks), seed {training.get('seed')}, {training.get('data_items', '?')} training images, holdout "
              f"{training.get('holdout')}.", "", "## Evaluation", ""]
    lines.append(metrics_markdown(metrics) if metrics else "Not evaluated yet.")
    lines.append("")
    return "\n".join(lines)
