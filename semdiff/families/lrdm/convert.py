"""Convert official LRDM / t-LRDM checkpoints (jeremiastraub/diffusion, Lightning 1.2) to a semdiff folder.

Official layout (``state_dict`` of ``DiffusionModel``):

- ``diff_model.*``   the UNet's raw weights; ``ema.*`` its EMA copy (LitEma: dots removed from the
  names, plus ``ema.decay`` / ``ema.num_updates``). Inference uses the EMA weights (``ema_scope``);
  a checkpoint without ``ema.*`` was trained with ``use_ema=False`` and samples with the raw ones;
- ``repr_ae.*``      the representation encoder/decoder (never EMA'd);
- ``ae_model.*``     the frozen VQ first stage (CompVis ldm keys);
- ``scale_factor`` / ``inverse_scale_factor`` (the latent scaling) and ``running_std.*`` (dropped).

semdiff layout: ``unet.*`` (EMA), ``repr_ae.*`` unchanged, ``first_stage.*`` (diffusers ``VQModel``
keys, see ``first_stage.py``), ``scale_factor``, ``inverse_scale_factor``.

The architecture comes from the ``*-project.yaml`` the official scripts expect next to the
checkpoint (found automatically, or given with ``--config``), or else is inferred from the weight
shapes; what shapes cannot tell (heads, nonlinearity, resolution) then falls back to the released
LSUN-Churches configs. The parity fixtures' layout (``unet.*`` + ``encoder.*`` with a JSON beside the
``.safetensors``) is accepted too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from semdiff.checkpoint import CheckpointError, read_state_dict
from semdiff.families.lrdm.first_stage import convert_ldm_vq_state_dict, downsampling_factor, infer_vq_config, load_first_stage

logger = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]

# What the released LSUN-Churches configs set beyond the weight shapes (models/*/…-project.yaml).
_RELEASED_UNET = dict(resolution=64, num_ch_per_head=64, nonlinearity="swish", embedding_type="positional",
                      scale_by_sqrt2=False, dropout=0.2)
_RELEASED_ENCODER = dict(resolution=64, embedding_type="positional", dropout=0.1)
_RELEASED_DECODER = dict(resolution=64, embedding_type="positional")
RELEASED_CONFIGS: dict[str, dict[str, Any]] = {
    "LRDM r64x8x8 (models/LRDM/r64x8x8/LRDM_lambda*-project.yaml)": dict(
        unet=dict(ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=3, attn_resolutions=[32, 16, 8],
                  repr_ch_mult=[1, 2, 2, 2]),
        encoder=dict(ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=4, attn_resolutions=[32, 16, 8], z_channels=64),
        decoder=dict(ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[32, 16, 8], z_channels=64),
        embed_dim=64, time_conditional=False),
    "t-LRDM r16x16x16 (models/tLRDM/r16x16x16_lambda*-project.yaml)": dict(
        unet=dict(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[32, 16], repr_ch_mult=[1, 2, 2]),
        encoder=dict(ch=128, ch_mult=[1, 2, 2], num_res_blocks=4, attn_resolutions=[32, 16], z_channels=16),
        decoder=dict(ch=128, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[32, 16], z_channels=16),
        embed_dim=16, time_conditional=True),
    "LRDM r16x16x16 (configs/latent/repr/r16x16x16.yaml, training config)": dict(
        unet=dict(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[32, 16], repr_ch_mult=[1, 2, 2]),
        encoder=dict(ch=128, ch_mult=[1, 2, 2], num_res_blocks=4, attn_resolutions=[32, 16], z_channels=16),
        decoder=dict(ch=128, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[32, 16], z_channels=16),
        embed_dim=16, time_conditional=False),
}


# ---------------------------------------------------------------------------------------------
# Reading


def split_official(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Group the keys: {"unet", "unet_ema", "repr_ae", "ae_model", "buffers"} (prefixes stripped).

    Accepts the Lightning layout (``diff_model.``/``repr_ae.``/``ema.``/``ae_model.``) and the parity
    fixtures' layout (``unet.``/``encoder.``).
    """
    groups: dict[str, dict[str, Any]] = {"unet": {}, "unet_ema": {}, "repr_ae": {}, "ae_model": {}, "buffers": {}}
    lightning = any(k.startswith("diff_model.") for k in state)
    fixture = not lightning and any(k.startswith("unet.") for k in state) and \
        any(k.startswith("encoder.quant_conv.") for k in state)
    prefixes = {"diff_model.": "unet", "repr_ae.": "repr_ae", "ae_model.": "ae_model", "ema.": "unet_ema"}
    if fixture:
        prefixes = {"unet.": "unet", "encoder.": "repr_ae", "first_stage_model.": "ae_model"}
    for k, v in state.items():
        for prefix, group in prefixes.items():
            if k.startswith(prefix):
                groups[group][k[len(prefix):]] = v
                break
        else:
            if k in ("scale_factor", "inverse_scale_factor"):
                groups["buffers"][k] = v
    groups["layout"] = {"fixture": fixture}
    if not groups["unet"]:
        raise CheckpointError("not an LRDM checkpoint: no diff_model.* (UNet) weights")
    if not groups["repr_ae"]:
        raise CheckpointError(
            "this checkpoint has a UNet but no representation model (repr_ae.*): it is a plain LDM baseline, "
            "which has no encoder and so no semantic code; semdiff converts LRDM and t-LRDM checkpoints"
        )
    return groups


def pick_unet_weights(groups: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The UNet state the official sampler uses -> (state, from_ema).

    LitEma stores ``name.replace('.', '')`` for every UNet parameter; the mapping back is checked to
    be one-to-one and complete.
    """
    raw, ema = groups["unet"], groups["unet_ema"]
    ema = {k: v for k, v in ema.items() if k not in ("decay", "num_updates")}
    if not ema:
        if groups.get("layout", {}).get("fixture"):
            return dict(raw), False
        logger.warning("no EMA weights (ema.*) in the checkpoint: it was trained with use_ema=False, and the official "
                       "sampler uses the raw diff_model weights, as semdiff does")
        return dict(raw), False
    flat: dict[str, str] = {}
    for k in raw:
        f = k.replace(".", "")
        if f in flat:
            raise CheckpointError(f"EMA names of {flat[f]!r} and {k!r} collide")
        flat[f] = k
    missing = sorted(set(flat) - set(ema))
    unexpected = sorted(set(ema) - set(flat))
    if missing or unexpected:
        raise CheckpointError(f"the EMA weights do not match the UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = {}
    for f, k in flat.items():
        if tuple(ema[f].shape) != tuple(raw[k].shape):
            raise CheckpointError(f"EMA weight ema.{f} has shape {tuple(ema[f].shape)}, diff_model.{k} {tuple(raw[k].shape)}")
        out[k] = ema[f]
    return out, True


# ---------------------------------------------------------------------------------------------
# Official config files


def find_config_files(checkpoint: str | os.PathLike) -> list[Path]:
    """What the official scripts read next to a checkpoint: ``*-project.yaml`` (all, merged in order);
    else a JSON with the checkpoint's stem (the parity fixtures' layout)."""
    path = Path(checkpoint)
    found = sorted(path.parent.glob("*-project.yaml"))
    own = [p for p in found if p.name == f"{path.stem}-project.yaml"]
    if own:  # e.g. LRDM_lambda1e-4.ckpt beside LRDM_lambda1e-4-project.yaml and its three siblings
        return own
    if not found and path.parent.name == "checkpoints":
        found = sorted((path.parent.parent / "configs").glob("*-project.yaml"))
    if not found and path.with_suffix(".json").is_file():
        found = [path.with_suffix(".json")]
    return found


def read_official_config(paths: list[Path] | Path) -> dict[str, Any]:
    """Network params from official YAML/JSON files -> {"unet", "representation", "sde", "kl_weight"}.

    Looks for the ``target`` entries (``DiffusionUNetReprCond``, ``RepresentationAE``, ``VPSDE``)
    anywhere in the files (project YAMLs, or the fixtures' JSON); later files override earlier ones.
    """
    import yaml

    found: dict[str, Any] = {}
    kl_weights = set()
    for path in [paths] if isinstance(paths, Path) else paths:
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise CheckpointError(f"cannot read the config file {path}: {err}") from None
        _collect_targets(data, found)
        if "kl_weight" in found:
            kl_weights.add(found["kl_weight"])
    if len(kl_weights) > 1:
        # several λ variants of one architecture in one folder (models/LRDM/r64x8x8): which one is unknown
        logger.warning("the config files disagree on representation_kl_weight %s; not recording it", sorted(kl_weights))
        found.pop("kl_weight")
    return found


def _collect_targets(node: Any, found: dict[str, Any]) -> None:
    if isinstance(node, dict):
        target = str(node.get("target", ""))
        params = node.get("params") or {}
        if target.endswith("DiffusionUNetReprCond"):
            found["unet"] = dict(params)
        elif target.endswith(("DiffusionUNet", "unet.DiffusionUNet")) and "unet" not in found:
            found["plain_unet"] = True
        elif target.endswith("RepresentationAE"):
            found["representation"] = {"embed_dim": params["embed_dim"],
                                        "encoder": dict(params["enc_config"].get("params") or {}),
                                        "decoder": dict(params["dec_config"].get("params") or {})}
        elif target.endswith("VPSDE") and not target.endswith("subVPSDE"):
            found["sde"] = dict(params)
        if "representation_kl_weight" in node:
            found["kl_weight"] = node["representation_kl_weight"]
        for v in node.values():
            _collect_targets(v, found)
    elif isinstance(node, list):
        for v in node:
            _collect_targets(v, found)


# ---------------------------------------------------------------------------------------------
# Architecture inference from shapes


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def _stage(shapes: Shapes, prefix: str) -> tuple[list[int], list[bool]]:
    """Output widths of the ResBlocks of ``prefix.main`` and whether each is followed by attention."""
    widths, attn = [], []
    for i in _indices(shapes, re.escape(prefix) + r"\.main\.(\d+)\."):
        if f"{prefix}.main.{i}.qkv.weight" in shapes:
            attn[-1] = True
        else:
            widths.append(shapes[f"{prefix}.main.{i}.in_layers.2.weight"][0])
            attn.append(False)
    return widths, attn


def _adaptive(shapes: Shapes, prefix: str, out_ch: int) -> bool:
    return shapes[f"{prefix}.emb_layers.1.weight"][0] == 2 * out_ch


def _check_time(shapes: Shapes, prefix: str, what: str) -> bool:
    if f"{prefix}time_conditioning.0.W" in shapes:
        raise CheckpointError(f"the {what} uses a Fourier time embedding (continuous-time model); not supported")
    if any(k.startswith(f"{prefix}label_emb.") for k in shapes):
        raise CheckpointError(f"the {what} is class-conditional (label_emb); not supported")
    return f"{prefix}time_conditioning.1.weight" in shapes


def infer_unet(shapes: Shapes) -> dict[str, Any]:
    """Shape-determined ``DiffusionUNetReprCond`` params; attention as per-level flags (``_attn_levels``)."""
    ch, in_channels = shapes["conv_in.weight"][:2]
    if not _check_time(shapes, "", "UNet"):
        raise CheckpointError("the UNet has no time embedding (time_conditioning.*)")
    levels = _indices(shapes, r"down\.(\d+)\.")
    ch_mult, repr_in, attn_levels, nrb = [], [], [], None
    prev = ch
    for level in levels:
        widths, attn = _stage(shapes, f"down.{level}")
        if not widths:
            raise CheckpointError(f"UNet level {level} has no ResBlocks (num_res_blocks=0 is not supported)")
        nrb = len(widths) if nrb is None else nrb
        if len(widths) != nrb:
            raise CheckpointError("the UNet levels have different numbers of ResBlocks")
        ch_mult.append(widths[0] // ch)
        repr_in.append(shapes[f"down.{level}.main.0.in_layers.2.weight"][1] - prev)
        if any(attn):
            attn_levels.append(level)
        prev = widths[-1]
    repr_ch = math.gcd(*repr_in)
    repr_ch = ch if all(r % ch == 0 for r in repr_in) else repr_ch
    return dict(in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=nrb,
                use_adaptive_group_norm=_adaptive(shapes, "down.0.main.0", ch * ch_mult[0]),
                repr_ch=None if repr_ch == ch else repr_ch, repr_ch_mult=[r // repr_ch for r in repr_in],
                _attn_levels=attn_levels)


def infer_encoder(shapes: Shapes) -> dict[str, Any]:
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    time_conditional = _check_time(shapes, "encoder.", "representation encoder")
    z_channels = shapes["post_quant_conv.weight"][0]
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    ch_mult, attn_levels, nrb = [], [], None
    for level in levels:
        widths, attn = _stage(shapes, f"encoder.down.{level}")
        nrb = len(widths) if nrb is None else nrb
        ch_mult.append(widths[0] // ch)
        if any(attn):
            attn_levels.append(level)
    return dict(ch=ch, in_channels=in_channels, ch_mult=ch_mult, num_res_blocks=nrb, z_channels=z_channels,
                double_z=shapes["encoder.conv_out.weight"][0] == 2 * z_channels, time_conditional=time_conditional,
                use_adaptive_group_norm=_adaptive(shapes, "encoder.down.0.main.0", ch * ch_mult[0]),
                _attn_levels=attn_levels)


def infer_decoder(shapes: Shapes) -> dict[str, Any]:
    time_conditional = _check_time(shapes, "decoder.", "representation decoder")
    ch = shapes["decoder.mid.block_1.emb_layers.1.weight"][1] // 4
    z_channels = shapes["decoder.conv_in.weight"][1]
    stages = _indices(shapes, r"decoder\.up\.(\d+)\.")
    ch_mult, attn_levels, nrb = [0] * len(stages), [], None
    for i in stages:
        level = len(stages) - 1 - i
        widths, attn = _stage(shapes, f"decoder.up.{i}")
        nrb = len(widths) - 1 if nrb is None else nrb
        ch_mult[level] = widths[0] // ch
        if any(attn):
            attn_levels.append(level)
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=nrb, z_channels=z_channels, time_conditional=time_conditional,
                use_adaptive_group_norm=_adaptive(shapes, "decoder.mid.block_1", ch * ch_mult[-1]),
                _attn_levels=sorted(attn_levels))


def _attn_resolutions(levels: list[int], resolution: int) -> list[int]:
    return sorted({resolution // 2 ** lvl for lvl in levels}, reverse=True)


def _released_match(unet: dict, enc: dict, dec: dict, embed_dim: int) -> str | None:
    for name, cfg in RELEASED_CONFIGS.items():
        if cfg["embed_dim"] != embed_dim or cfg["time_conditional"] != enc["time_conditional"]:
            continue
        ok = all(unet.get(k) == v for k, v in cfg["unet"].items() if k != "attn_resolutions")
        ok &= all(enc.get(k) == v for k, v in cfg["encoder"].items() if k != "attn_resolutions")
        ok &= all(dec.get(k) == v for k, v in cfg["decoder"].items() if k != "attn_resolutions")
        ok &= _attn_resolutions(unet["_attn_levels"], 64) == cfg["unet"]["attn_resolutions"]
        ok &= _attn_resolutions(enc["_attn_levels"], 64) == cfg["encoder"]["attn_resolutions"]
        ok &= _attn_resolutions(dec["_attn_levels"], 64) == cfg["decoder"]["attn_resolutions"]
        if ok:
            return name
    return None


def infer_network_config(repr_shapes: Shapes, unet_shapes: Shapes, *, resolution: int | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(unet params, representation params, released name) from prefix-stripped shapes alone."""
    try:
        unet = infer_unet(unet_shapes)
        enc = infer_encoder(repr_shapes)
        dec = infer_decoder(repr_shapes)
        embed_dim = repr_shapes["quant_conv.weight"][0] // 2
    except KeyError as err:
        raise CheckpointError(f"unexpected LRDM layout: missing {err.args[0]!r}") from None
    released = _released_match(unet, enc, dec, embed_dim)
    if resolution is None and released is not None:
        resolution = _RELEASED_UNET["resolution"]
    if resolution is None:
        raise CheckpointError(
            "cannot infer the latent resolution of this LRDM checkpoint (it is not a released configuration): put its "
            "*-project.yaml next to it or pass --config, or pass --image-size"
        )
    unet_extra = dict(_RELEASED_UNET) if released else {
        # not in the weights; the released configs' values (a config file overrides them)
        "nonlinearity": "swish", "embedding_type": "positional", "scale_by_sqrt2": False,
        "num_ch_per_head": _default_heads(unet)}
    unet_extra["resolution"] = resolution
    unet_cfg = {**{k: v for k, v in unet.items() if not k.startswith("_")}, **unet_extra,
                "attn_resolutions": _attn_resolutions(unet["_attn_levels"], resolution)}
    enc_cfg = {**{k: v for k, v in enc.items() if not k.startswith("_")}, **_RELEASED_ENCODER,
               "resolution": resolution, "attn_resolutions": _attn_resolutions(enc["_attn_levels"], resolution)}
    dec_cfg = {**{k: v for k, v in dec.items() if not k.startswith("_")}, **_RELEASED_DECODER,
               "resolution": resolution, "attn_resolutions": _attn_resolutions(dec["_attn_levels"], resolution)}
    if not released:
        enc_cfg["dropout"] = 0.0
    return unet_cfg, {"embed_dim": embed_dim, "encoder": enc_cfg, "decoder": dec_cfg}, released


def _default_heads(unet: dict) -> int | None:
    widths = [unet["ch"] * unet["ch_mult"][lvl] for lvl in unet["_attn_levels"]]
    if all(w % 64 == 0 for w in widths):
        if widths:
            logger.warning("attention head width not recorded in the weights: assuming 64 channels per head (the "
                           "released configs); pass the official config file if it differs")
        return 64
    raise CheckpointError("cannot infer the UNet's channels per attention head from the weights; put the official "
                          "*-project.yaml next to the checkpoint or pass --config")


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_state_dict(
    official: Mapping[str, Any],
    *,
    official_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    first_stage: tuple[dict[str, Any], dict[str, Any]] | None = None,
    no_first_stage: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Official state (tensors, or meta tensors) -> (semdiff config, semdiff state).

    ``official_config`` is what ``read_official_config`` returns; ``first_stage`` a (diffusers config,
    diffusers state) pair that replaces the checkpoint's own ``ae_model.*``.
    """
    groups = split_official(official)
    unet_state, from_ema = pick_unet_weights(groups)
    repr_state = groups["repr_ae"]
    official_config = dict(official_config or {})
    if official_config.get("plain_unet") and "unet" not in official_config:
        raise CheckpointError("the config describes a plain LDM (DiffusionUNet), not an LRDM")

    # first stage
    fs_config, fs_state = None, None
    if first_stage is not None:
        fs_config, fs_state = first_stage
    elif groups["ae_model"]:
        ldm = {k: v for k, v in groups["ae_model"].items() if not k.startswith("loss.")}
        fs_config, fs_state = infer_vq_config(ldm), convert_ldm_vq_state_dict(ldm)
    elif not no_first_stage:
        raise CheckpointError(
            "the checkpoint holds no first stage (ae_model.*): pass --first-stage with the VQ-f4 checkpoint "
            "(CompVis vq-f4 model.ckpt, or a diffusers VQModel folder), or --no-first-stage for a pixel-space model"
        )
    factor = downsampling_factor(fs_config) if fs_config else 1

    # networks
    resolution = None
    if "unet" in official_config:
        resolution = int(official_config["unet"].get("resolution", 0)) or None
    if image_size is not None:
        if image_size % factor:
            raise CheckpointError(f"image size {image_size} is not divisible by the first stage's factor {factor}")
        if resolution is not None and resolution * factor != image_size:
            raise CheckpointError(f"--image-size {image_size} contradicts the config's latent resolution {resolution} "
                                  f"(x{factor} = {resolution * factor})")
        resolution = image_size // factor
    unet_shapes = {k: tuple(v.shape) for k, v in unet_state.items()}
    repr_shapes = {k: tuple(v.shape) for k, v in repr_state.items()}
    if "unet" in official_config and "representation" in official_config:
        # the official config is authoritative; the weights are checked against it when loaded
        unet_cfg, repr_cfg, released = dict(official_config["unet"]), official_config["representation"], None
    else:
        unet_cfg, repr_cfg, released = infer_network_config(repr_shapes, unet_shapes, resolution=resolution)
        unet_cfg = dict(official_config.get("unet") or unet_cfg)
        repr_cfg = official_config.get("representation") or repr_cfg
    sde = official_config.get("sde") or {}
    if fs_config is not None:
        fs_config = {**fs_config, "sample_size": int(unet_cfg["resolution"]) * factor}

    config: dict[str, Any] = {
        "unet": unet_cfg,
        "representation": repr_cfg,
        "first_stage": fs_config,
        "diffusion": {"beta_min": float(sde.get("beta_min", 0.1)), "beta_max": float(sde.get("beta_max", 20)),
                      "num_timesteps": int(sde.get("N", 1000))},
        "source": "official jeremiastraub/diffusion",
        "released_config": released,
        "unet_weights": "ema" if from_ema else "raw (no EMA in the checkpoint)",
    }
    if "kl_weight" in official_config:
        config["representation_kl_weight"] = official_config["kl_weight"]

    state: dict[str, Any] = {"unet." + k: v for k, v in unet_state.items()}
    state.update({"repr_ae." + k: v for k, v in repr_state.items()})
    if fs_state is not None:
        state.update({"first_stage." + k: v for k, v in fs_state.items()})
    for name in ("scale_factor", "inverse_scale_factor"):
        value = groups["buffers"].get(name)
        state[name] = (value if value is not None else torch.tensor(1.0, device=_device_of(unet_state))).reshape(())
    return config, state


def _device_of(state: Mapping[str, Any]) -> torch.device:
    return next(iter(state.values())).device


def _check_scale(state: Mapping[str, torch.Tensor]) -> None:
    s, inv = state["scale_factor"], state["inverse_scale_factor"]
    if s.device.type == "meta":
        return
    s, inv = float(s), float(inv)
    if not (math.isfinite(s) and math.isfinite(inv) and s > 0 and inv > 0):
        raise CheckpointError(f"invalid latent scaling in the checkpoint: scale_factor={s}, inverse_scale_factor={inv}")
    if abs(s * inv - 1) > 1e-3:
        logger.warning("scale_factor (%g) and inverse_scale_factor (%g) are not reciprocal; both are used as stored", s, inv)


def convert_lrdm_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    first_stage: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    image_size: int | None = None,
    no_first_stage: bool = False,
) -> Path:
    """Convert an official LRDM / t-LRDM ``.ckpt`` into a semdiff model folder and return its path.

    ``first_stage``: a CompVis vq-f4 ``model.ckpt`` or a diffusers ``VQModel`` folder; by default the
    first stage stored in the checkpoint (``ae_model.*``) is used. ``config``: the official
    ``*-project.yaml`` (found next to the checkpoint when not given). Checkpoints are read without
    executing pickled code; the EMA UNet is taken.
    """
    from semdiff.families.lrdm.family import LRDM
    from semdiff.io import save_model_folder

    official = read_state_dict(checkpoint_path)
    config_files = [Path(config)] if config is not None else find_config_files(checkpoint_path)
    official_config = read_official_config(config_files) if config_files else {}
    if config_files:
        logger.info("architecture from %s", ", ".join(map(str, config_files)))
    fs = load_first_stage(first_stage) if first_stage is not None else None
    if fs is not None:
        _compare_first_stage(official, fs[1])
    cfg, state = convert_state_dict(official, official_config=official_config, image_size=image_size,
                                    first_stage=fs, no_first_stage=no_first_stage)
    _check_scale(state)
    try:
        model = LRDM(cfg)
    except (ValueError, NotImplementedError) as err:
        raise CheckpointError(f"unsupported LRDM configuration: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        where = f" (config from {', '.join(map(str, config_files))})" if config_files else ""
        raise CheckpointError(f"converted weights do not fit the architecture{where}: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, wrong shapes {sorted(wrong)[:4]}")
    model.load_state_dict(state, strict=True)
    return save_model_folder(model, out_dir)


def _compare_first_stage(official: Mapping[str, torch.Tensor], fs_state: Mapping[str, torch.Tensor]) -> None:
    """Warn when ``--first-stage`` differs from the first stage stored in the LRDM checkpoint."""
    embedded = {k[len("ae_model."):]: v for k, v in official.items()
                if k.startswith("ae_model.") and not k.startswith("ae_model.loss.")}
    if not embedded:
        return
    try:
        mine = convert_ldm_vq_state_dict(embedded)
    except CheckpointError:
        return
    same = set(mine) == set(fs_state) and all(mine[k].shape == fs_state[k].shape and torch.equal(mine[k], fs_state[k])
                                                for k in mine)
    if not same:
        logger.warning("the --first-stage weights differ from the first stage stored in the LRDM checkpoint "
                       "(ae_model.*); using --first-stage as asked")


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="official LRDM / t-LRDM Lightning .ckpt (e.g. models/LRDM/r64x8x8/*.ckpt)")
    parser.add_argument("out_dir", help="model folder to write")
    parser.add_argument("--first-stage", default=None,
                        help="VQ-f4 first stage: CompVis vq-f4 model.ckpt or a diffusers VQModel folder "
                             "(default: the ae_model.* weights stored in the checkpoint)")
    parser.add_argument("--config", default=None,
                        help="official *-project.yaml (default: the one next to the checkpoint, if any)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size; needed only for unreleased architectures without a config file")
    parser.add_argument("--no-first-stage", action="store_true",
                        help="the model works in pixel space (no first stage), like the official ae_config=None")


def run_cli(args) -> Path:
    return convert_lrdm_checkpoint(args.checkpoint, args.out_dir, first_stage=args.first_stage, config=args.config,
                                   image_size=args.image_size, no_first_stage=args.no_first_stage)
