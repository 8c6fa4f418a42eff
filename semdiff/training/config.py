"""``TrainConfig``: every knob of a training run, and the named presets (recipes)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """A training run. Build one from a preset with :meth:`TrainConfig.from_preset`.

    Stages run in order (autoencoder, then prior, then classifier for Diff-AE); a stage with 0 steps
    is skipped. ``batch_size`` is the *global* batch: under ``accelerate launch`` it is split evenly
    over the processes.
    """

    data: str = "shapes"  # "emoji", "shapes" or an image folder / glob
    image_size: int = 32
    out: str = "runs/semdiff"
    family: str = "diffae"
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # family config (Diff-AE: network, latent_prior)
    # stage lengths
    steps: int = 1000
    prior_steps: int = 0
    classifier_steps: int = 0
    # optimisation
    batch_size: int = 32
    prior_batch_size: int = 256
    classifier_batch_size: int = 256
    lr: float = 1e-4
    prior_lr: float = 1e-4
    classifier_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.999
    prior_ema_decay: float = 0.999
    grad_clip: float = 1.0
    #: per-timestep weights of the autoencoder's eps-MSE: "uniform" (the papers), "snr-trunc:<max>" or
    #: "x0-mix:<max>" (see ``semdiff.training.objectives.timestep_weights``)
    loss_weighting: str = "uniform"
    #: learning-rate multiplier of the semantic encoder in the autoencoder stage
    encoder_lr_scale: float = 1.0
    #: weight of an auxiliary loss: a small decoder (discarded after training) reconstructs the image from
    #: z_sem alone, which makes z_sem informative from the first steps; 0 = the papers' objective
    aux_decoder_weight: float = 0.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast on the GPU)
    seed: int = 0
    # data
    holdout: float = 0.1
    data_limit: int | None = None
    attribute_labels: list[str] | None = None
    # bookkeeping
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: a grid at the end of each stage only
    preview_steps: int = 20  # DDIM steps of the grids
    log_every: int = 50
    resume: bool = False
    device: str | None = None
    distributed: str = "auto"  # auto | accelerate | none
    num_threads: int | None = None
    progress: bool | None = None
    dump_rank_hashes: bool = False
    #: on resume, these values replace the saved config's (only stage lengths and bookkeeping intervals)
    resume_overrides: dict[str, Any] | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The preset's values, then ``overrides`` (``None`` values are ignored); ``model`` is deep-merged."""
        if name not in PRESETS:
            load_family_presets()
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        values = copy.deepcopy(PRESETS[name])
        model_overrides = overrides.pop("model", None) or {}
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        values["model"] = deep_merge(values.get("model", {}), model_overrides)
        values["preset"] = name
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def resolved_model(self) -> dict[str, Any]:
        """The family config: the preset's model (when ``model`` is empty and a preset is named) merged with ``model``."""
        if self.preset and self.preset not in PRESETS:
            load_family_presets()
        base = PRESETS.get(self.preset or "", {}).get("model", {}) if self.preset else {}
        return deep_merge(base, self.model)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------------------
# presets: TrainConfig values; "model" is the family config without image_size/attributes

_TINY_NET = dict(model_channels=16, channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[],
                 embed_channels=32, z_dim=16, enc_channel_mult=[1, 2], enc_num_res_blocks=1, dropout=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU: for tests and smoke runs
    "tiny": dict(
        data="shapes", image_size=16, data_limit=256, steps=50, prior_steps=20, classifier_steps=20,
        batch_size=8, prior_batch_size=32, classifier_batch_size=32, lr=1e-3, prior_lr=1e-3,
        ckpt_every=25, log_every=10, preview_steps=4,
        model={"network": _TINY_NET,
               "latent_prior": dict(hidden_channels=32, num_layers=2, time_emb_channels=16),
               "default_steps": {"encode_stochastic": 10, "decode": 10, "manipulate": 10, "prior": 10}},
    ),
    # the shipped semdiff-emoji32-diffae: 8,000 autoencoder steps at ~2 steps/s on one CPU thread (~70 min)
    "emoji32": dict(
        data="emoji", image_size=32, steps=8000, prior_steps=6000, classifier_steps=2000,
        batch_size=32, prior_batch_size=256, classifier_batch_size=256,
        lr=3e-4, prior_lr=3e-4, classifier_lr=1e-3, warmup_steps=200, ema_decay=0.999, prior_ema_decay=0.999,
        grad_clip=1.0, holdout=0.1, ckpt_every=250, sample_every=1000, log_every=25,
        # a CPU budget is ~1/500 of the papers' training: these three make z_sem informative and used in time
        loss_weighting="x0-mix:1000", aux_decoder_weight=1.0,
        attribute_labels=["skin_tone", "group"],
        model={"network": dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
                               attention_resolutions=[8], embed_channels=128, z_dim=128,
                               enc_channel_mult=[1, 2, 4, 4], enc_num_res_blocks=1, dropout=0.0),
               "latent_prior": dict(hidden_channels=384, num_layers=5, time_emb_channels=64),
               "beta_schedule": "cosine",
               # fixed-point inversion on the decode grid: 1 + 40 + 20 passes per reconstruction
               # (benchmarks/README.md: better than the official 250 + 20 DDIM recipe at 4x fewer passes)
               "default_inverter": "fixed-point", "inversion_iterations": 2,
               "default_steps": {"encode_stochastic": 20, "decode": 20, "manipulate": 20, "prior": 50}},
    ),
    # the same recipe on the procedural shapes
    "shapes32": dict(
        data="shapes", image_size=32, steps=5000, prior_steps=3000, classifier_steps=1000,
        batch_size=32, lr=2e-4, prior_lr=3e-4, warmup_steps=200, ckpt_every=250, sample_every=1000,
        model={"network": dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2,
                               attention_resolutions=[8], embed_channels=128, z_dim=64,
                               enc_channel_mult=[1, 2, 4, 4], enc_num_res_blocks=1, dropout=0.0),
               "latent_prior": dict(hidden_channels=256, num_layers=4, time_emb_channels=64),
               "default_steps": {"encode_stochastic": 50, "decode": 20, "manipulate": 20, "prior": 50}},
    ),
    # your own images at 64x64, for a GPU
    "folder64": dict(
        image_size=64, steps=100_000, prior_steps=50_000, classifier_steps=0, batch_size=64,
        prior_batch_size=512, lr=1e-4, prior_lr=1e-4, warmup_steps=1000, ema_decay=0.9999, ckpt_every=2000,
        sample_every=5000, log_every=100,
        model={"network": dict(model_channels=64, channel_mult=[1, 2, 4, 8], num_res_blocks=2,
                               attention_resolutions=[16], embed_channels=512, z_dim=512,
                               enc_channel_mult=[1, 2, 4, 8, 8], enc_num_res_blocks=2, dropout=0.1),
               "latent_prior": dict(hidden_channels=2048, num_layers=10, time_emb_channels=64)},
    ),
}


def register_preset(name: str, values: dict[str, Any]) -> None:
    """Add a preset (a family's training module registers its own: ``values["family"]`` names the family)."""
    if name in PRESETS and PRESETS[name] != values:
        raise ValueError(f"preset {name!r} is already registered with other values")
    PRESETS[name] = values


def family_training_module(family: str):
    """``semdiff.families.<family>.training`` (where a family registers its objective and presets, and may
    define ``manifest_entry`` / ``render_card``), or ``None`` when the family has no such module."""
    import importlib

    name = f"semdiff.families.{family}.training"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in (name, f"semdiff.families.{family}"):
            raise
        return None


def load_family_presets() -> None:
    """Import every family's ``training`` module, which registers the family's presets and objective."""
    for family in ("diffae", "diffusevae", "lrdm"):
        family_training_module(family)
