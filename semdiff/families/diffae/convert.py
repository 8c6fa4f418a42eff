"""Convert official Diff-AE checkpoints (phizaz/diffae, PyTorch Lightning 1.4) to a semdiff folder.

Official layout (``state_dict`` of ``LitModel``): ``model.*`` raw weights and ``ema_model.*`` the EMA
weights that all inference uses; under either prefix the UNet's keys are top level
(``input_blocks``, ``middle_block``, ``output_blocks``, ``out``, ``time_embed``), the semantic encoder
is ``encoder.*``, the latent prior ``latent_net.*`` (its ``cond_layers.1`` is tied to ``linear_emb``).
``conds_mean``/``conds_std`` [1, z] come with latent and classifier checkpoints, ``x_T``
[n, 3, H, W] is a logging buffer that reveals the image size. Classifier checkpoints hold
``classifier.*``/``ema_classifier.*``; the official notebooks use ``classifier.weight``.

semdiff layout: ``encoder.*`` unchanged, UNet keys under ``unet.*``, ``latent_net.*`` without the
tied duplicate, ``classifier.*``, ``codes_mean``/``codes_std``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from semdiff.checkpoint import CheckpointError, Shapes, group_blocks, read_state_dict

CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]

# The released architectures (templates.py), recognised by their inferred network config.
RELEASED_NETWORKS: dict[str, dict[str, Any]] = {
    "ffhq128_autoenc (also bedroom128, horse128)": dict(
        image_size=128, model_channels=128, channel_mult=[1, 1, 2, 3, 4], num_res_blocks=2,
        attention_resolutions=[16], embed_channels=512, z_dim=512, enc_channel_mult=[1, 1, 2, 3, 4, 4],
        enc_num_res_blocks=2),
    "ffhq256_autoenc": dict(
        image_size=256, model_channels=128, channel_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
        attention_resolutions=[16], embed_channels=512, z_dim=512, enc_channel_mult=[1, 1, 2, 2, 4, 4, 4],
        enc_num_res_blocks=2),
    "celeba64d2c_autoenc": dict(
        image_size=64, model_channels=64, channel_mult=[1, 2, 4, 8], num_res_blocks=2,
        attention_resolutions=[16], embed_channels=512, z_dim=512, enc_channel_mult=[1, 2, 4, 8, 8],
        enc_num_res_blocks=2),
}

_UNET_PREFIXES = ("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.")


# ---------------------------------------------------------------------------------------------
# Keys


def split_prefix(state: Mapping[str, Any], prefer: str = "ema_model.") -> dict[str, Any]:
    """Pick the EMA sub-dict of a Lightning state dict (or accept an already stripped one)."""
    if any(k.startswith(prefer) for k in state):
        return {k[len(prefer):]: v for k, v in state.items() if k.startswith(prefer)}
    if any(k.startswith("model.") for k in state):
        raise CheckpointError(
            "the checkpoint has raw 'model.*' weights but no EMA 'ema_model.*' weights; "
            "Diff-AE inference uses the EMA weights"
        )
    return dict(state)


def rename_key(key: str) -> str | None:
    """Official (prefix-stripped) key -> semdiff key; None for keys semdiff drops."""
    if key.startswith("encoder."):
        return key
    if key.startswith(_UNET_PREFIXES):
        return "unet." + key
    if key.startswith("latent_net."):
        if ".cond_layers.1." in key:  # tied to linear_emb
            return None
        return key
    if key in ("conds_mean", "conds_std"):
        return key.replace("conds_", "codes_")
    if key.startswith("classifier."):
        return key
    if key == "x_T" or key.startswith("ema_classifier."):
        return None
    raise CheckpointError(f"unexpected key {key!r} in a Diff-AE checkpoint")


# ---------------------------------------------------------------------------------------------
# Architecture inference


def _has_attention(block: dict[str, tuple[int, ...]]) -> bool:
    return any(k.endswith(".qkv.weight") for k in block)


def _resblock_out(block: dict[str, tuple[int, ...]], index: int = 0) -> int:
    return block[f"{index}.in_layers.2.weight"][0]


def infer_network_config(shapes: Shapes, image_size: int | None = None) -> tuple[dict[str, Any], str | None]:
    """Infer the ``DiffAEConfig`` of prefix-stripped official keys -> (network dict, released name)."""
    try:
        embed_channels, model_channels = shapes["time_embed.time_embed.0.weight"]
        z_dim = shapes["encoder.out.3.weight"][0]
    except KeyError as err:
        raise CheckpointError(f"not a Diff-AE autoencoder checkpoint: missing {err.args[0]!r}") from None
    out_blocks = group_blocks(shapes, "output_blocks.")
    n_out = len(out_blocks)
    # The up-sampling ResBlock is the last module of the last block of every level but the first.
    ups = [i for i, b in sorted(out_blocks.items()) if any(re.match(r"[12]\.in_layers", k) for k in b)]
    num_res_blocks = ups[0] if ups else n_out - 1
    levels = n_out // (num_res_blocks + 1)
    if levels * (num_res_blocks + 1) != n_out:
        raise CheckpointError(f"cannot infer the UNet layout from {n_out} output blocks")
    channel_mult = []
    attention_levels = set()
    for j in range(levels):
        level = levels - 1 - j
        first = (num_res_blocks + 1) * j
        channel_mult.insert(0, _resblock_out(out_blocks[first]) // model_channels)
        if _has_attention(out_blocks[first]):
            attention_levels.add(level)

    enc_blocks = group_blocks(shapes, "encoder.input_blocks.")
    enc_levels, enc_res, enc_mult, enc_attention = _infer_encoder(enc_blocks, model_channels, num_res_blocks)

    name = None
    net = dict(
        model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        embed_channels=embed_channels, z_dim=z_dim, enc_channel_mult=enc_mult, enc_num_res_blocks=enc_res,
    )
    candidates = [n for n, cfg in RELEASED_NETWORKS.items()
                  if all(cfg[k] == v for k, v in net.items())
                  and _attention_levels(cfg["attention_resolutions"], cfg["image_size"]) == attention_levels]
    if image_size is None and "x_T" in shapes:
        image_size = shapes["x_T"][-1]
    if image_size is None and len(candidates) == 1:
        name = candidates[0]
        image_size = RELEASED_NETWORKS[name]["image_size"]
    if image_size is None:
        if attention_levels or enc_attention:
            raise CheckpointError(
                "cannot infer the image size of this Diff-AE checkpoint (it is not a released configuration "
                "and has no x_T buffer); pass --image-size N (image_size=N)"
            )
        image_size = 2 ** (max(levels, enc_levels) - 1) * 4
    net["image_size"] = image_size
    net["attention_resolutions"] = sorted({image_size // 2**lvl for lvl in attention_levels}, reverse=True)
    enc_res_set = sorted({image_size // 2**lvl for lvl in enc_attention}, reverse=True)
    net["enc_attention_resolutions"] = None if enc_res_set == net["attention_resolutions"] else enc_res_set
    if name is None:
        for n in candidates:
            if RELEASED_NETWORKS[n]["image_size"] == image_size:
                name = n
    return net, name


def _attention_levels(resolutions, image_size) -> set[int]:
    levels, res, lvl = set(), image_size, 0
    while res >= 1:
        if res in resolutions:
            levels.add(lvl)
        res //= 2
        lvl += 1
    return levels


def _infer_encoder(blocks, model_channels, unet_res_blocks):
    """Find (levels, res blocks per level, channel mult, attention levels) consistent with the blocks.

    A down-sampling ResBlock has the same shapes as a plain one, so the split is found by trying the
    factorisations of the block count: channels may change only at a level's first ResBlock and
    attention never follows a down-sampling block.
    """
    n = len(blocks)  # conv stem + levels * res + (levels - 1) downs  ==  levels * (res + 1)
    options = []
    for res in sorted(range(1, n), key=lambda r: (r != unet_res_blocks, r)):
        if n % (res + 1):
            continue
        levels = n // (res + 1)
        mult, attention, ok = [], set(), True
        idx = 1
        for level in range(levels):
            for r in range(res):
                b = blocks.get(idx, {})
                if "0.in_layers.2.weight" not in b:
                    ok = False
                    break
                if r > 0 and "0.skip_connection.weight" in b:
                    ok = False
                if _has_attention(b):
                    attention.add(level)
                idx += 1
            if not ok:
                break
            mult.append(_resblock_out(blocks[idx - 1]) // model_channels)
            if level != levels - 1:
                b = blocks.get(idx, {})
                if "0.skip_connection.weight" in b or _has_attention(b):
                    ok = False
                    break
                idx += 1
        if ok:
            options.append((levels, res, mult, attention))
    if not options:
        raise CheckpointError("cannot infer the semantic encoder's layout from its keys")
    return options[0]


def infer_latent_config(shapes: Shapes) -> dict[str, Any]:
    """Infer the ``LatentMLPConfig`` from prefix-stripped ``latent_net.*`` shapes."""
    layers = group_blocks(shapes, "latent_net.layers.")
    num_layers = len(layers)
    time_emb_channels = shapes["latent_net.time_embed.0.weight"][1]
    z_dim = shapes["latent_net.time_embed.0.weight"][0]
    hidden = layers[0]["linear.weight"][0]
    skip = [i for i in range(num_layers) if layers[i]["linear.weight"][1] in (hidden + z_dim, 2 * z_dim) and i > 0]
    return dict(z_dim=z_dim, hidden_channels=hidden, num_layers=num_layers, time_emb_channels=time_emb_channels,
                skip_layers=skip)


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_state_dict(
    official: Mapping[str, Any],
    *,
    image_size: int | None = None,
    classifier: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prefix-stripped official state (tensors, or anything with ``.shape``) -> (semdiff config, state).

    Works on meta tensors too, so the key layout of every released config can be checked without
    its weights.
    """
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    network, released = infer_network_config(shapes, image_size)
    config: dict[str, Any] = {"network": network, "released_config": released, "source": "official phizaz/diffae"}
    if any(k.startswith("latent_net.") for k in official):
        config["latent_prior"] = infer_latent_config(shapes)
        for k in [k for k in official if ".cond_layers.1." in k]:
            tied = official[k.replace("cond_layers.1.", "linear_emb.")]
            if official[k].device.type != "meta" and not torch.equal(official[k], tied):
                raise CheckpointError(f"{k} should be tied to linear_emb but differs from it")
    state = {}
    for k, v in official.items():
        new = rename_key(k)
        if new is not None:
            state[new] = v
    if classifier is not None:
        weight = classifier.get("classifier.weight")
        if weight is None:
            raise CheckpointError("the classifier checkpoint has no 'classifier.weight'")
        state["classifier.weight"] = weight
        state["classifier.bias"] = classifier["classifier.bias"]
        names = CELEBA_ATTRIBUTES if weight.shape[0] == 40 else [f"attribute_{i}" for i in range(weight.shape[0])]
        config["attributes"] = names
        for stat in ("conds_mean", "conds_std"):
            if stat in classifier and stat.replace("conds_", "codes_") not in state:
                state[stat.replace("conds_", "codes_")] = classifier[stat]
    config["has_code_stats"] = "codes_mean" in state
    for stat in ("codes_mean", "codes_std"):
        if stat in state:
            state[stat] = state[stat].reshape(1, -1)
    return config, state


def convert_diffae_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    latent: str | os.PathLike | None = None,
    classifier: str | os.PathLike | None = None,
) -> Path:
    """Convert an official Diff-AE ``.ckpt`` (+ optional latent and classifier checkpoints) into a
    semdiff model folder (``config.json`` + ``model.safetensors``) and return its path.

    The checkpoints are read without executing pickled code; the EMA weights are taken.
    """
    from semdiff.families.diffae.family import DiffAE
    from semdiff.io import save_model_folder

    top = read_state_dict(checkpoint_path, "Diff-AE checkpoint")
    official = split_prefix(top)
    # conds_* and x_T (which reveals the image size) are buffers of the LightningModule itself:
    # top level, outside ema_model.
    official.update({k: v for k, v in top.items() if k in ("conds_mean", "conds_std", "x_T")})
    if latent is not None:
        lat = read_state_dict(latent, "Diff-AE latent checkpoint")
        latent_keys = {k: v for k, v in split_prefix(lat).items() if k.startswith("latent_net.")}
        if not latent_keys:
            raise CheckpointError(f"{latent} has no latent_net weights (is it an *_autoenc_latent checkpoint?)")
        official.update(latent_keys)
        for stat in ("conds_mean", "conds_std"):
            if stat not in lat:
                raise CheckpointError(f"{latent} has no {stat}: the latent prior needs the z_sem statistics")
            official[stat] = lat[stat]
    if any(k.startswith("latent_net.") for k in official) and "conds_mean" not in official:
        raise CheckpointError("the latent prior needs conds_mean/conds_std, which this checkpoint lacks")
    cls_state = read_state_dict(classifier, "Diff-AE classifier checkpoint") if classifier is not None else None
    if cls_state is not None and "classifier.weight" in cls_state:
        z_dim = official["encoder.out.3.weight"].shape[0]
        if cls_state["classifier.weight"].shape[1] != z_dim:
            raise CheckpointError(
                f"the classifier works on {cls_state['classifier.weight'].shape[1]}-d codes but the autoencoder's "
                f"z_sem has {z_dim} dimensions"
            )
    config, state = convert_state_dict(official, image_size=image_size, classifier=cls_state)
    model = DiffAE(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"converted weights do not fit the inferred architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return save_model_folder(model, out_dir)


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="official Diff-AE .ckpt (e.g. ffhq256_autoenc/last.ckpt)")
    parser.add_argument("out_dir", help="model folder to write")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size, needed only when it cannot be inferred from the checkpoint")
    parser.add_argument("--latent", default=None, help="*_autoenc_latent .ckpt with the latent DDIM prior")
    parser.add_argument("--classifier", default=None, help="*_autoenc_cls .ckpt with the CelebA attribute classifier")


def run_cli(args) -> Path:
    return convert_diffae_checkpoint(args.checkpoint, args.out_dir, image_size=args.image_size,
                                     latent=args.latent, classifier=args.classifier)
