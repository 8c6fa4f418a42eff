"""Training DiffuseVAE with ``semdiff train``: the objective, the presets and the bundled model's manifest entry.

Two stages, as the official code (Pandey et al., kpandey008/DiffuseVAE):

1. ``vae`` — the VAE alone, on images in [0, 1]: the official ELBO, sum-reduced MSE + ``kl_weight`` x KL
   (the official ``alpha``, 1.0 in every released config), reported per pixel (the sum divided by 3·H·W, so
   gradient clipping and Adam see a well-scaled loss; the minimiser is the same);
2. ``ddpm`` — the x̂-conditioned UNet on the **frozen** VAE: x̂ = 2·VAE(z) − 1 from a reparameterised z
   (random, as the official ``DDPMWrapper``), t ~ U{0..T−1}, eps-MSE, Form-1 or Form-2 (the family's
   ``form``). Before its first step the stage fits the Ex-PDE Gaussian mixture (``gmm_components`` > 0,
   sklearn's defaults: 10 full-covariance components) on reparameterised codes of the training images, as the
   official ``expde.py``; it is stored as tensors (``prior_gmm_*`` buffers).

TrainConfig fields map onto the stages as ``steps``/``batch_size``/``lr``/``ema_decay`` (vae) and
``prior_steps``/``prior_batch_size``/``prior_lr``/``prior_ema_decay`` (ddpm); ``warmup_steps`` and
``grad_clip`` apply to both; ``classifier_steps`` is unused. Family-level training knobs live under
``model["train"]`` and are removed from the family config:

- ``kl_weight`` (1.0): the official alpha;
- ``condition`` ("vae"): "none" trains the *same* UNet with x̂ replaced by zeros — an unconditional DDPM of the
  same size trained the same way, the baseline of ``benchmarks/diffusevae_few_step.py``. Such a model samples
  through the public API with ``decode_options={"guidance_weight": -1.0}`` (eps = eps(x, 0)), or directly with
  a zero condition;
- ``gmm_components`` (10; 0 = none), ``gmm_covariance`` ("full").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semdiff.training.config import TrainConfig, register_preset
from semdiff.training.data import TrainData
from semdiff.training.objectives import LossModule, Stage, TrainingObjective, register_objective

TRAIN_DEFAULTS: dict[str, Any] = {"kl_weight": 1.0, "condition": "vae", "gmm_components": 10, "gmm_covariance": "full"}
CONDITIONS = ("vae", "none")


def _to_model_range(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


def split_model_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(family config, training knobs) from a preset's ``model`` dict."""
    spec = copy.deepcopy(spec)
    train = {**TRAIN_DEFAULTS, **(spec.pop("train", None) or {})}
    unknown = set(train) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown DiffuseVAE training option(s) {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    if train["condition"] not in CONDITIONS:
        raise ValueError(f"model.train.condition must be one of {CONDITIONS}, got {train['condition']!r}")
    return spec, train


# ------------------------------------------------------------------------------------------------
# losses


def vae_loss(model, aux, images: torch.Tensor, kl_weight: float = 1.0):
    """The official VAE objective, per pixel: ``(sum (x̂ - x)^2 + kl_weight * KL) / (3 H W)``, mean over the batch.

    x in [0, 1]; z reparameterised; ``KL = -1/2 sum(1 + logvar - mu^2 - exp(logvar))``.
    """
    x01 = (_to_model_range(images) + 1) / 2
    mu, logvar = model.vae.encode(x01)
    z = model.vae.reparameterize(mu, logvar, torch.randn_like(mu))
    rec = model.vae.decode(z).float()
    dims = x01[0].numel()
    rec_sum = (rec - x01).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar.float() - mu.float().pow(2) - logvar.float().exp()).flatten(1).sum(1)
    loss = (rec_sum + kl_weight * kl).mean() / dims
    return loss, {"loss": loss.detach(), "mse": (rec_sum.mean() / dims).detach(), "kl": kl.mean().detach()}


def ddpm_loss(model, aux, images: torch.Tensor, condition: str = "vae"):
    """eps-MSE of the UNet given x̂ of the frozen VAE (reparameterised z, as officially), Form-1 or Form-2;
    with ``condition="none"`` the condition is zeros (and there is no shift)."""
    from semdiff.families.diffusevae.sampling import q_sample

    x0 = _to_model_range(images)
    z = None
    with torch.no_grad():
        if condition == "vae":
            mu, logvar = model.posterior(x0)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            cond = model.vae_reconstruction(z).float()
        else:
            cond = torch.zeros_like(x0)
    t = torch.randint(0, model.num_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    shift = cond if (model.form == "form2" and condition == "vae") else None
    x_t = q_sample(model.schedule, x0, t, noise, shift)
    if model.unet.proj is not None:
        z_in = z if z is not None else torch.zeros(x0.shape[0], model.code_dim, device=x0.device)
        eps = model.unet(x_t, t, cond, z_in)
    else:
        eps = model.unet(x_t, t, cond)
    loss = (eps.float() - noise).pow(2).mean()
    return loss, {"loss": loss.detach()}


@torch.no_grad()
def encode_samples(model, images: torch.Tensor, generator: torch.Generator, batch_size: int = 256) -> torch.Tensor:
    """Reparameterised codes (N, z_dim) of images, float32 on the CPU (the official ``extract_latents``)."""
    out = []
    device = model.vae.enc.mu.weight.device
    for s in range(0, len(images), batch_size):
        x = _to_model_range(images[s:s + batch_size]).to(device)
        mu, logvar = model.posterior(x)
        eps = torch.randn(mu.shape, generator=generator).to(mu)
        out.append((mu + eps * torch.exp(0.5 * logvar)).float().cpu())
    return torch.cat(out)


def fit_training_gmm(model, images: torch.Tensor, *, components: int = 10, covariance: str = "full",
                     seed: int = 0) -> dict[str, Any]:
    """Fit the Ex-PDE mixture on reparameterised codes of ``images`` and store it in ``model``."""
    from semdiff.families.diffusevae.prior import fit_gmm

    was_training = model.training
    model.eval()
    z = encode_samples(model, images, torch.Generator().manual_seed(seed))
    model.train(was_training)
    gmm = fit_gmm(z, components, covariance_type=covariance, seed=seed)
    info = {"latents": "sample", "num_images": len(z), "seed": seed, "converged": bool(gmm.converged),
            "mean_log_likelihood": float(gmm.mean_log_likelihood)}
    model.set_prior_gmm(gmm.weights, gmm.means, gmm.covariances, covariance_type=covariance, **info)
    return info


# ------------------------------------------------------------------------------------------------
# objective


@register_objective
class DiffuseVAEObjective(TrainingObjective):
    family = "diffusevae"

    def build_model(self, config: TrainConfig, data: TrainData) -> nn.Module:
        from semdiff.families.diffusevae import DiffuseVAE

        spec, train = split_model_spec(config.resolved_model())
        self.train_options = train
        self.seed = int(config.seed)
        vae = dict(spec.pop("vae"))
        vae["input_res"] = config.image_size
        unet = dict(spec.pop("unet", {}))
        family_config = DiffuseVAE.default_config(vae=vae, unet=unet, form=spec.pop("form", "form1"), **spec)
        if train["condition"] == "vae" and int(train["gmm_components"]) > 0 and config.prior_steps > 0:
            # placeholder buffers (N(0, I) per component), so the EMA copy and checkpoints have them from the start
            family_config["prior_gmm"] = {"components": int(train["gmm_components"]),
                                          "covariance_type": train["gmm_covariance"]}
        else:
            family_config["prior_gmm"] = None
        if train["condition"] == "none":
            family_config["unconditional_baseline"] = True
        return DiffuseVAE(family_config)

    def _options(self) -> dict[str, Any]:
        return getattr(self, "train_options", dict(TRAIN_DEFAULTS))

    def stages(self, config: TrainConfig) -> list[Stage]:
        return [
            Stage("vae", config.steps, config.batch_size, config.lr, config.weight_decay, config.warmup_steps,
                  config.ema_decay, config.grad_clip),
            Stage("ddpm", config.prior_steps, config.prior_batch_size, config.prior_lr, config.weight_decay,
                  config.warmup_steps, config.prior_ema_decay, config.grad_clip),
        ]

    def stage_data(self, stage, model, data, device):
        opts = self._options()
        if stage.name == "ddpm" and model.prior_gmm and opts["condition"] == "vae":
            fit_training_gmm(model, data.images, components=int(opts["gmm_components"]),
                             covariance=opts["gmm_covariance"], seed=getattr(self, "seed", 0))
        return {"images": data.images}

    def trainable_parameters(self, stage, model):
        if stage.name == "vae":
            return list(model.vae.parameters())
        return list(model.unet.parameters())

    def loss_module(self, stage, model):
        opts = self._options()
        if stage.name == "vae":
            kl = float(opts["kl_weight"])
            return LossModule(model, lambda m, aux, images: vae_loss(m, aux, images, kl))
        condition = opts["condition"]
        return LossModule(model, lambda m, aux, images: ddpm_loss(m, aux, images, condition))

    def stage_record(self, config: TrainConfig) -> dict[str, dict[str, Any]]:
        record = super().stage_record(config)
        opts = self._options()
        record["vae"]["loss"] = f"official ELBO: sum MSE + {opts['kl_weight']:g} KL (reported per pixel)"
        record["ddpm"]["loss"] = ("eps MSE on the frozen VAE's reparameterised x̂" if opts["condition"] == "vae"
                                  else "eps MSE, condition zeroed (unconditional baseline)")
        return record

    @torch.no_grad()
    def preview(self, stage, model, batch, generator, steps=20):
        from semdiff.families.diffusevae.sampling import sample_chain

        x0 = _to_model_range(batch["images"]).to(model.vae.enc.mu.weight.device)
        n = len(x0)
        z = model.encode(x0)
        z_prior = torch.randn((n, model.code_dim), generator=generator).to(x0)
        rows: list[tuple[str, torch.Tensor]] = [("input", x0)]
        if stage.name == "vae":
            rows += [("VAE(mean z)", model.vae_reconstruction(z)), ("VAE(z ~ N(0,I))", model.vae_reconstruction(z_prior))]
        else:
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            if self._options()["condition"] == "none":
                tables = model._tables(steps, None)
                for k in range(2):
                    nk = noise if k == 0 else torch.randn(x0.shape, generator=generator).to(x0)
                    rows.append((f"uncond. DDIM-{steps}",
                                 sample_chain(lambda y, t: model.unet(y, t, torch.zeros_like(y)), nk, tables)))
            else:
                rows.append(("x̂ = VAE(mean z)", model.vae_reconstruction(z)))
                rows.append((f"z + random x_T, DDIM-{steps}", model.decode(z, model.start_state(z, noise), steps=steps)))
                rows.append(("N(0,I) samples", model.decode(z_prior, model.start_state(z_prior, noise), steps=steps)))
                if model.prior_gmm:
                    zg = model.sample_codes(n, prior="gmm", generator=generator)
                    rows.append(("GMM samples", model.decode(zg, model.start_state(zg, noise), steps=steps)))
        return [(name, (x.float().cpu().clamp(-1, 1) + 1) / 2) for name, x in rows]


# ------------------------------------------------------------------------------------------------
# presets

#: 32x32 VAE in the official string grammar: ~0.23 M parameters, z_dim 64
EMOJI32_VAE = dict(
    enc_block_str="32d2,16d2,8x1,8d2,4x1,4d4,1x1",
    enc_channel_str="32:64,16:64,8:64,4:64,1:64",
    dec_block_str="1x1,1u4,4x1,4u2,8x1,8u2,16x1,16u2,32x1",
    dec_channel_str="32:64,16:64,8:64,4:64,1:64",
)
EMOJI32_UNET = dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_ds=[4], num_heads=1,
                    dropout=0.0)

_TINY_VAE = dict(
    enc_block_str="16x1,16d2,8x1,8d2,4x1,4d4,4t1,1x1",
    enc_channel_str="16:64,8:64,4:64,1:16",
    dec_block_str="1x1,1u4,1t4,4x1,4u2,8x1,8u2,16x1",
    dec_channel_str="16:64,8:64,4:64,1:16",
)
_TINY_UNET = dict(model_channels=32, channel_mult=[1, 1], num_res_blocks=1, attention_ds=[], num_heads=1)

_EMOJI_COMMON = dict(
    family="diffusevae", data="emoji", image_size=32, holdout=0.1, warmup_steps=100, grad_clip=1.0,
    batch_size=32, lr=1e-3, ema_decay=0.999, prior_batch_size=32, prior_lr=3e-4, prior_ema_decay=0.999,
    classifier_steps=0, ckpt_every=250, sample_every=1000, log_every=50, preview_steps=20,
)

register_preset("emoji32-diffusevae", dict(
    _EMOJI_COMMON, steps=1500, prior_steps=2400,
    model={"vae": EMOJI32_VAE, "unet": EMOJI32_UNET, "form": "form1",
           "default_steps": {"encode_stochastic": 50, "decode": 25, "manipulate": 25, "prior": 1},
           "train": {"kl_weight": 1.0, "condition": "vae", "gmm_components": 10, "gmm_covariance": "full"}},
))
# the baseline of the few-step benchmark: the same UNet, trained the same way, with the condition zeroed
register_preset("emoji32-diffusevae-uncond", dict(
    _EMOJI_COMMON, steps=0, prior_steps=2400,
    model={"vae": EMOJI32_VAE, "unet": EMOJI32_UNET, "form": "form1",
           "default_steps": {"encode_stochastic": 50, "decode": 25, "manipulate": 25, "prior": 1},
           "train": {"condition": "none", "gmm_components": 0}},
))
# seconds on a CPU: tests and smoke runs
register_preset("tiny-diffusevae", dict(
    family="diffusevae", data="shapes", image_size=16, data_limit=128, steps=30, prior_steps=30,
    classifier_steps=0, batch_size=16, prior_batch_size=8, lr=2e-3, prior_lr=1e-3, warmup_steps=0,
    ckpt_every=20, log_every=10, preview_steps=4,
    model={"vae": _TINY_VAE, "unet": _TINY_UNET, "form": "form1",
           "default_steps": {"encode_stochastic": 5, "decode": 5, "manipulate": 5, "prior": 1},
           "train": {"kl_weight": 1.0, "gmm_components": 2, "gmm_covariance": "diag"}},
))


# ------------------------------------------------------------------------------------------------
# bundled model: manifest entry and card


def manifest_entry(folder: Path, rel_path: str, config: dict[str, Any], metrics: dict[str, Any] | None) -> dict:
    """The manifest entry of a bundled DiffuseVAE trained by ``semdiff train`` (called by ``export_bundled``);
    also rewrites the folder's README.md with a DiffuseVAE model card."""
    from semdiff.training.export import EMOJI_LICENSE_FIELDS, compact_metrics, sha256_file

    folder = Path(folder)
    files = {name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
             for name in ("config.json", "model.safetensors")}
    steps = config.get("default_steps") or {}
    training = config.get("training") or {}
    stages = training.get("stages", {})
    size = int(config["vae"]["input_res"])
    z_dim = _z_dim(config)
    gmm = config.get("prior_gmm")
    entry: dict[str, Any] = {
        "family": "diffusevae",
        "kind": "autoencoder-with-prior",
        "description": (f"DiffuseVAE trained from scratch with `semdiff train --preset {training.get('preset')}` on "
                        f"{training.get('data_items')} {'OpenMoji emoji' if training.get('data') == 'emoji' else training.get('data')} "
                        f"images at {size}x{size} (CPU): VAE (z_dim {z_dim}, "
                        f"{config['form'].replace('form', 'Form-')}) and an x̂-conditioned DDPM UNet"
                        + (f", Ex-PDE Gaussian-mixture prior ({gmm['components']} components)" if gmm else "")
                        + ". Ships inside the wheel."),
        "status": "bundled",
        "source": {"type": "bundled", "path": rel_path, "files": files},
        **EMOJI_LICENSE_FIELDS,
        "paper": {
            "title": "DiffuseVAE: Efficient, Controllable and High-Fidelity Generation from Low-Dimensional Latents",
            "authors": "Kushagra Pandey, Avideep Mukherjee, Piyush Rai, Abhishek Kumar",
            "venue": "TMLR 2022", "arxiv": "2201.00308", "url": "https://arxiv.org/abs/2201.00308",
            "code": "https://github.com/kpandey008/DiffuseVAE",
        },
        "preprocessing": {"image_size": size, "alignment": "none",
                          "resize": "emoji rendered at 4x and area-averaged to 32x32 on white", "range": [-1, 1]},
        "defaults": {"encode_stochastic": int(steps.get("encode_stochastic", 50)), "decode": int(steps.get("decode", 25)),
                     "manipulate": int(steps.get("manipulate", 25)), "prior": int(steps.get("prior", 1))},
        "notes": [
            f"Held-out split: SHA-256 of the codepoints without skin-tone modifiers < {training.get('holdout')}; "
            "all skin-tone variants of a held-out emoji are held out.",
            "Training stages (steps): " + ", ".join(f"{k} {v.get('steps')}" for k, v in stages.items()),
            "No attribute classifier: edits go through the VAE code z (interpolation, arithmetic).",
        ],
    }
    if metrics:
        entry["metrics"] = compact_metrics(metrics)
    (folder / "README.md").write_text(render_card(config, name=folder.name, metrics=metrics))
    return entry


def _z_dim(config: dict[str, Any]) -> int:
    from semdiff.families.diffusevae.networks import VAEConfig

    return VAEConfig(**config["vae"]).z_dim


def training_record(config: dict[str, Any]) -> dict[str, Any]:
    """The stages as this family trains them, from the TrainConfig values the trainer records
    (its generic record names them autoencoder/prior/classifier)."""
    training = config.get("training") or {}
    stages = training.get("stages", {})
    if "vae" in stages or "ddpm" in stages:  # recorded by DiffuseVAEObjective.stage_record
        return {k: dict(stages[k]) for k in ("vae", "ddpm") if k in stages}
    ae, prior = stages.get("autoencoder", {}), stages.get("prior", {})
    return {
        "vae": {k: ae.get(k) for k in ("steps", "batch_size", "lr", "ema_decay", "warmup_steps")}
        | {"loss": "official ELBO: sum MSE + alpha KL (reported per pixel)"},
        "ddpm": {k: prior.get(k) for k in ("steps", "batch_size", "lr", "ema_decay")}
        | {"loss": "eps MSE on the frozen VAE's reparameterised x̂"},
    }


def render_card(config: dict[str, Any], *, name: str, metrics: dict[str, Any] | None = None) -> str:
    from semdiff.training.card import metrics_markdown

    training = config.get("training") or {}
    wall = training.get("wall_time_s", {})
    size = int(config["vae"]["input_res"])
    lines = ["---", "library_name: semdiff", "license: cc-by-sa-4.0", "tags:", "- semdiff", "- diffusevae",
             "- diffusion", "- vae", "pipeline_tag: image-to-image", "---", "", f"# {name}", "",
             f"DiffuseVAE (Pandey et al., TMLR 2022) trained from scratch with `semdiff train --preset "
             f"{training.get('preset')}` on `{training.get('data')}` at {size}x{size}: a VAE with a "
             f"{_z_dim(config)}-d code z whose blurry decoding x̂ conditions a DDPM UNet "
             f"({config['form'].replace('form', 'Form-')}); z ~ N(0, I) or the stored Gaussian mixture.", "",
             "```python\nfrom semdiff import SemanticAutoencoder\nmodel = SemanticAutoencoder.from_pretrained("
             f"\"{name}\")\nimages = model.sample(8, steps=25)\n```", "",
             "## Licence", "",
             "Trained on emoji images rendered from the **OpenMoji** font: \"All emojis designed by OpenMoji – the "
             "open-source emoji and icon project. License: CC BY-SA 4.0\" (https://openmoji.org). These weights, and "
             "the images they produce, are adaptations of that artwork and are shared under **CC BY-SA 4.0** with "
             "the same attribution.", "", "## Training", "",
             "| stage | steps | batch | lr | loss | wall time |", "| --- | --- | --- | --- | --- | --- |"]
    for stage, info in training_record(config).items():
        if info.get("steps"):
            key = {"vae": "vae", "ddpm": "ddpm"}[stage]
            minutes = f"{wall[key] / 60:.1f} min" if key in wall else "-"
            lines.append(f"| {stage} | {info['steps']} | {info['batch_size']} | {info['lr']} | {info['loss']} | {minutes} |")
    lines += ["", f"AdamW, gradient clipping {training.get('grad_clip')}, EMA, seed {training.get('seed')}, "
              f"{training.get('data_items', '?')} training images (holdout {training.get('holdout')}).", "",
              "VAE: " + json.dumps(config["vae"]), "", "UNet: " + json.dumps(config["unet"]), "",
              "## Evaluation", ""]
    lines.append(metrics_markdown(metrics) if metrics else "Not evaluated yet: `semdiff evaluate <model folder>`.")
    lines.append("")
    return "\n".join(lines)

