"""LRDM's frozen first stage as a diffusers ``VQModel``, and the CompVis (ldm/taming) key mapping.

LRDM diffuses the *pre-quantisation* latent of a VQ-f4 autoencoder
(``ldm.models.autoencoder.VQModelInterface``): ``encode(x) = quant_conv(encoder(x))`` and
``decode(h) = decoder(post_quant_conv(quantize(h)))``. diffusers' ``VQModel`` computes exactly the
same (``encode(x).latents`` is pre-quantisation, ``decode`` quantises by default), so the first
stage is a ``VQModel`` built from ``VQ_F4_CONFIG`` (or a config inferred from a checkpoint).

The latent scaling is LRDM's own: ``z0 = scale_factor * latents`` and ``latents =
inverse_scale_factor * z`` with the two buffers stored in the LRDM checkpoint. diffusers'
``scaling_factor`` (0.18215 by default) is never used; the built model records ``scaling_factor=1.0``
so that nothing downstream applies it by accident.

Key mapping (CompVis ``encoder.*``/``decoder.*`` -> diffusers), L = number of levels:

    encoder.down.{i}.block.{j}.*          -> encoder.down_blocks.{i}.resnets.{j}.*  (nin_shortcut -> conv_shortcut)
    encoder.down.{i}.attn.{j}.*           -> encoder.down_blocks.{i}.attentions.{j}.*
    encoder.down.{i}.downsample.conv.*    -> encoder.down_blocks.{i}.downsamplers.0.conv.*
    decoder.up.{i}.block.{j}.*            -> decoder.up_blocks.{L-1-i}.resnets.{j}.*
    decoder.up.{i}.attn.{j}.*             -> decoder.up_blocks.{L-1-i}.attentions.{j}.*
    decoder.up.{i}.upsample.conv.*        -> decoder.up_blocks.{L-1-i}.upsamplers.0.conv.*
    {en,de}coder.mid.block_{1,2}.*        -> {en,de}coder.mid_block.resnets.{0,1}.*
    {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}.* -> ...mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.*
                                             (1x1 conv weights (C,C,1,1) -> linear (C,C))
    {en,de}coder.norm_out.*               -> {en,de}coder.conv_norm_out.*
    conv_in, conv_out, quant_conv, post_quant_conv, quantize.embedding.weight: unchanged
    loss.* (discriminator, LPIPS): dropped
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from semdiff.checkpoint import CheckpointError, read_state_dict

#: ``vq_ae_64x64x3`` of LRDM = CompVis vq-f4 (embed_dim 3, n_embed 8192, ch 128, ch_mult [1,2,4],
#: 2 res blocks, no attention outside the middle blocks), as a diffusers ``VQModel`` config.
VQ_F4_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 3,
    "num_vq_embeddings": 8192,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 1.0,
}

_VQ_KEYS = ("num_vq_embeddings", "vq_embed_dim", "latent_channels")


def build_vq_model(config: Mapping[str, Any]):
    """A diffusers ``VQModel`` from a config dict (works under ``torch.device("meta")``)."""
    import inspect

    from diffusers import VQModel

    known = set(inspect.signature(VQModel.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in dict(config).items() if k in known}
    cfg["scaling_factor"] = 1.0  # LRDM scales with its own buffers; see the module docstring
    return VQModel(**cfg)


def downsampling_factor(config: Mapping[str, Any]) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


# --------------------------------------------------------------------------------------------
# CompVis (ldm / taming) -> diffusers


def _resnet(key: str) -> str:
    return key.replace("nin_shortcut", "conv_shortcut")


_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _attention(prefix: str, rest: str) -> str:
    part, _, param = rest.rpartition(".")
    if part not in _ATTN_PARTS:
        raise CheckpointError(f"unexpected first-stage attention key {prefix + rest!r}")
    return f"{prefix}{_ATTN_PARTS[part]}.{param}"


def ldm_vq_key_to_diffusers(key: str, num_levels: int) -> str | None:
    """One CompVis VQ key -> its diffusers ``VQModel`` key (None for keys that are dropped)."""
    if key.startswith("loss."):
        return None
    if key in ("quantize.embedding.weight",) or key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        raise CheckpointError(f"unexpected key {key!r} in a VQ first-stage checkpoint")
    side, rest = m.groups()
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[len('norm_out.'):]}"
    m = re.match(r"mid\.block_([12])\.(.*)$", rest)
    if m:
        return _resnet(f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2)}")
    m = re.match(r"mid\.attn_1\.(.*)$", rest)
    if m:
        return _attention(f"{side}.mid_block.attentions.0.", m.group(1))
    m = re.match(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)$", rest)
    if not m:
        raise CheckpointError(f"unexpected key {key!r} in a VQ first-stage checkpoint")
    direction, level, kind, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if direction == "down":
        block = f"encoder.down_blocks.{level}"
    else:
        block = f"decoder.up_blocks.{num_levels - 1 - level}"
    if kind in ("downsample", "upsample"):
        samplers = "downsamplers" if kind == "downsample" else "upsamplers"
        return f"{block}.{samplers}.0.{tail}"
    j, _, tail = tail.partition(".")
    if kind == "block":
        return _resnet(f"{block}.resnets.{j}.{tail}")
    return _attention(f"{block}.attentions.{j}.", tail)


def convert_ldm_vq_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix-free CompVis VQ state dict (``encoder.*``, ``decoder.*``, ...) -> diffusers ``VQModel`` state dict."""
    num_levels = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=-1)
    if num_levels < 1:
        raise CheckpointError("not a VQ first stage: no encoder.down.* keys")
    out = {}
    for k, v in state.items():
        new = ldm_vq_key_to_diffusers(k, num_levels)
        if new is None:
            continue
        if (".attentions." in new and new.endswith("weight") and v.dim() == 4 and "group_norm" not in new):
            v = v[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = v
    return out


def infer_vq_config(state: Mapping[str, Any], *, sample_size: int | None = None) -> dict[str, Any]:
    """diffusers ``VQModel`` config of a prefix-free CompVis VQ state dict (tensors or anything with .shape).

    Raises ``CheckpointError`` for layouts diffusers cannot express (``ch_mult[0] != 1``, a KL
    first stage, non-32-divisible widths).
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if "quantize.embedding.weight" not in shapes:
        if any(k.startswith("encoder.") for k in shapes):
            raise CheckpointError("the first stage has no quantize.embedding.weight: it is not a VQ model "
                                  "(KL first stages are not supported by LRDM's released models)")
        raise CheckpointError("not a VQ first-stage state dict (no encoder.*/quantize.* keys)")
    n_embed, embed_dim = shapes["quantize.embedding.weight"]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    widths = [shapes[f"encoder.down.{i}.block.{layers - 1}.conv2.weight"][0] for i in levels]
    ch = shapes["encoder.conv_in.weight"][0]
    if ch != widths[0]:
        raise CheckpointError(f"first stage with ch_mult[0] != 1 (conv_in {ch}, level 0 {widths[0]}) cannot be "
                              "expressed as a diffusers VQModel")
    if any(w % 32 for w in widths):
        raise CheckpointError(f"first-stage widths {widths} are not multiples of 32 (GroupNorm(32) in ldm)")
    latent_channels = shapes["quant_conv.weight"][1]
    if shapes["encoder.conv_out.weight"][0] != latent_channels:
        raise CheckpointError("the first stage's encoder has double_z outputs: not a VQ model")
    down_attn = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))}
    up_attn = {len(levels) - 1 - int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.attn\.", k))}
    config = dict(VQ_F4_CONFIG)
    config.update(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        down_block_types=["AttnDownEncoderBlock2D" if i in down_attn else "DownEncoderBlock2D" for i in levels],
        up_block_types=["AttnUpDecoderBlock2D" if i in up_attn else "UpDecoderBlock2D" for i in range(len(levels))],
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=latent_channels,
        num_vq_embeddings=n_embed,
        sample_size=sample_size or VQ_F4_CONFIG["sample_size"],
    )
    if embed_dim != latent_channels:
        config["vq_embed_dim"] = embed_dim
    return config


def split_ldm_vq(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The CompVis VQ keys under ``prefix`` (e.g. ``"ae_model."`` or ``"first_stage_model."``), stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_first_stage(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a first stage -> (diffusers VQModel config, diffusers state dict).

    Accepts a CompVis ``vq-f4/model.ckpt`` (Lightning; read without executing pickled code; keys
    ``encoder.*`` etc., optionally under ``first_stage_model.`` / ``ae_model.``), a ``.safetensors``
    with those keys, or a diffusers-format folder (``VQModel.save_pretrained`` output: ``config.json`` +
    ``diffusion_pytorch_model.safetensors`` (or ``.bin``), also a pipeline folder with a ``vqvae``
    subfolder).
    """
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path)
    state = read_state_dict(path, "first-stage checkpoint")
    for prefix in ("first_stage_model.", "ae_model.", ""):
        sub = split_ldm_vq(state, prefix)
        if any(k.startswith("encoder.down.") for k in sub):
            sub = {k: v for k, v in sub.items() if not k.startswith("loss.")}
            config = infer_vq_config(sub)
            return config, convert_ldm_vq_state_dict(sub)
    if any(k.startswith("encoder.down_blocks.") for k in state):
        raise CheckpointError(f"{path} holds diffusers-format weights; pass the folder with its config.json instead")
    raise CheckpointError(f"{path} is not a VQ first-stage checkpoint (no encoder.down.* keys)")


def _load_diffusers_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (folder / "config.json").is_file() and (folder / "vqvae" / "config.json").is_file():
        folder = folder / "vqvae"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a diffusers VQModel folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    if config.get("_class_name", "VQModel") != "VQModel":
        raise CheckpointError(f"{folder} holds a diffusers {config.get('_class_name')}, not a VQModel "
                              "(LRDM's first stage is the VQ-f4 autoencoder)")
    weights = None
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            weights = folder / name
            break
    if weights is None:
        raise CheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors (or .bin)")
    state = read_state_dict(weights, "diffusers VQModel weights")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return config, state
