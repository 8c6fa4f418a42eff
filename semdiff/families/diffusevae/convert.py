"""Convert official DiffuseVAE checkpoints (kpandey008/DiffuseVAE, PyTorch Lightning 1.4) to a semdiff folder.

Two Lightning checkpoints make one model:

- the VAE (``models.vae.VAE``): ``state_dict`` keys ``enc.*``/``dec.*``; its block and channel
  strings (and usually ``input_res``) under ``hyper_parameters`` (a pickled Lightning
  ``AttributeDict``);
- the DDPM (``DDPMWrapper``): the UNet twice — ``online_network.decoder.*`` and the EMA copy
  ``target_network.decoder.*`` that the official sampling uses — their float64 schedule buffers,
  and the VAE again under ``vae.*``. No hyper-parameters: the UNet is inferred from the tensor
  shapes (the repo's YAMLs do not match the released files, kpandey008/DiffuseVAE#15), the Form
  from a file name that says form1/form2 (or ``--form``), and the head count, which no weight
  reveals, from ``--num-heads`` or a stated default. Its ``callbacks`` entry is keyed by the
  ``models.callbacks.EMAWeightUpdate`` class.

Both files are read with semdiff's restricted unpickler: tensors, containers, ``AttributeDict``
and the known callback records are rebuilt inertly, anything else is refused.

semdiff layout: ``vae.enc.*``, ``vae.dec.*``, ``unet.*`` (the EMA UNet).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from semdiff.checkpoint import CheckpointError, Shapes, group_blocks, load_checkpoint, state_dict_of
from semdiff.families.diffusevae.family import DEFAULT_SCHEDULE, DiffuseVAE, normalize_form
from semdiff.families.diffusevae.networks import (
    VAE,
    ArchitectureStringError,
    ConditionalUNet,
    UNetConfig,
    VAEConfig,
    parse_block_string,
)
from semdiff.families.diffusevae.sampling import official_betas


class ArchitectureCheckpointError(CheckpointError, ArchitectureStringError):
    """A checkpoint whose VAE strings are malformed or do not fit its weights."""


# The released configurations (main/configs/dataset/*/{train,test}.yaml at 8e6d251): UNet layout,
# the head counts of the two YAMLs (they disagree), the test-time variance, and file-name hints.
RELEASED: dict[str, dict[str, Any]] = {
    "cifar10": dict(image_size=32, z_dim=512, channel_mult=[1, 2, 2, 2], heads_train=8, heads_test=8,
                    variance="fixedlarge", hints=("cifar",)),
    "celeba64": dict(image_size=64, z_dim=512, channel_mult=[1, 2, 2, 2, 4], heads_train=1, heads_test=8,
                     variance="fixedlarge", hints=("celeba64", "celeba_64", "c64")),
    "celebamaskhq128": dict(image_size=128, z_dim=1024, channel_mult=[1, 2, 2, 3, 4], heads_train=1, heads_test=1,
                            variance="fixedsmall", hints=("celebamaskhq", "cmhq", "chq128", "celebahq128")),
    "ffhq128": dict(image_size=128, z_dim=1024, channel_mult=[1, 1, 2, 3, 4], heads_train=8, heads_test=8,
                    variance="fixedlarge", hints=("ffhq",)),
    "celebahq256": dict(image_size=256, z_dim=1024, channel_mult=[1, 1, 2, 2, 4, 4], heads_train=1, heads_test=8,
                        variance="fixedsmall", hints=("chq256", "celebahq", "chq")),
    "afhq256": dict(image_size=256, z_dim=1024, channel_mult=[1, 1, 2, 2, 4, 4], heads_train=8, heads_test=1,
                    variance="fixedsmall", hints=("afhq",)),
}
_RELEASED_UNET = dict(model_channels=128, num_res_blocks=2)

_VAE_HPARAMS = ("enc_block_str", "enc_channel_str", "dec_block_str", "dec_channel_str")
_UNET_PREFIX = "target_network.decoder."
_ONLINE_PREFIX = "online_network.decoder."


# ---------------------------------------------------------------------------------------------
# Architecture inference


def infer_unet_config(shapes: Shapes) -> dict[str, Any]:
    """``UNetConfig`` fields (without ``num_heads``) from prefix-stripped UNet key shapes."""
    try:
        embed, mc = shapes["time_embed.0.weight"]
        stem = shapes["input_blocks.0.0.weight"]
        out_channels = shapes["out.2.weight"][0]
    except KeyError as err:
        raise CheckpointError(f"the DDPM checkpoint's UNet lacks {err.args[0]!r}: not a DiffuseVAE UNet, or truncated") from None
    if embed != 4 * mc:
        raise CheckpointError(f"time embedding {embed} is not 4 x {mc} model channels: not the official UNet")
    if stem[1] % 2:
        raise CheckpointError(f"the UNet takes {stem[1]} input channels; DiffuseVAE's takes x_t and x̂ (2 x 3)")
    if stem[1] == out_channels:
        raise CheckpointError("this UNet has no x̂ input (an unconditional 'uncond' DDPM); DiffuseVAE needs the "
                              "Form-1/Form-2 model trained on VAE reconstructions")
    if any(k.startswith("label_emb.") for k in shapes):
        raise CheckpointError("class-conditional UNets (label_emb) are not part of DiffuseVAE")
    blocks = group_blocks(shapes, "input_blocks.")
    levels: list[list[dict[str, tuple[int, ...]]]] = [[]]
    for i in sorted(blocks)[1:]:
        b = blocks[i]
        if "0.op.weight" in b:
            levels.append([])
        elif "0.in_layers.2.weight" in b:
            levels[-1].append(b)
        else:
            raise CheckpointError(f"input block {i} is neither a ResBlock nor a Downsample: {sorted(b)[:3]}")
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise CheckpointError(f"uneven UNet levels ({[len(level) for level in levels]} ResBlocks): cannot infer the layout")
    channel_mult, attention_ds = [], []
    for lvl, level in enumerate(levels):
        out = level[-1]["0.in_layers.2.weight"][0]
        if out % mc:
            raise CheckpointError(f"level {lvl} has {out} channels, not a multiple of {mc} model channels")
        channel_mult.append(out // mc)
        if any("1.qkv.weight" in b for b in level):
            attention_ds.append(2**lvl)
    first = levels[0][0]
    use_ssn = first["0.emb_layers.1.weight"][0] == 2 * first["0.in_layers.2.weight"][0]
    cfg = dict(model_channels=mc, channel_mult=channel_mult, num_res_blocks=counts.pop(), attention_ds=attention_ds,
               in_channels=stem[1] // 2, out_channels=out_channels, use_scale_shift_norm=use_ssn, dropout=0.0,
               use_z="proj.0.weight" in shapes, z_dim=shapes["proj.0.weight"][1] if "proj.0.weight" in shapes else None)
    return cfg


def _compare_shapes(module_shapes: Shapes, got: Shapes, what: str) -> None:
    missing = sorted(set(module_shapes) - set(got))
    unexpected = sorted(set(got) - set(module_shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} do not fit the inferred architecture (truncated or not the official layout?): "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    wrong = [(k, module_shapes[k], got[k]) for k in module_shapes if tuple(module_shapes[k]) != tuple(got[k])]
    if wrong:
        k, want, have = wrong[0]
        raise CheckpointError(f"{what}: {k} has shape {tuple(have)}, the architecture needs {tuple(want)} "
                              f"({len(wrong)} mismatched)")


def _meta_shapes(module_fn) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = module_fn()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def guess_released(unet: Mapping[str, Any], image_size: int, z_dim: int, names: list[str]) -> str | None:
    """Which released configuration this looks like: architecture first, file-name hints to break ties."""
    text = " ".join(names).lower()
    same_size = {n: r for n, r in RELEASED.items() if r["image_size"] == image_size and r["z_dim"] == z_dim}
    exact = [n for n, r in same_size.items()
             if r["channel_mult"] == list(unet["channel_mult"])
             and all(unet[k] == v for k, v in _RELEASED_UNET.items()) and not unet["use_z"]]
    hinted = [n for n, r in same_size.items() if any(h in text for h in r["hints"])]
    for group in ([n for n in exact if n in hinted], exact, hinted):
        if len(group) == 1:
            return group[0]
    return None


def infer_form(path: str | os.PathLike) -> str | None:
    """'form1'/'form2' from the DDPM checkpoint's file name, else its folder or the folder above
    (``diffvae_chq256_form1_loss=0.0361.ckpt``, ``form2/checkpoints/last.ckpt``)."""
    for part in list(reversed(Path(path).parts))[:3]:
        found = {m.group(1) for m in re.finditer(r"form[-_ ]?([12])(?!\d)", part.lower())}
        if len(found) == 1:
            return f"form{found.pop()}"
        if len(found) > 1:
            raise CheckpointError(f"{part!r} names both form1 and form2; pass --form")
    return None


def _image_size(hparams: Mapping[str, Any], image_size: int | None) -> int:
    declared = hparams.get("input_res")
    from_strings = parse_block_string(str(hparams["enc_block_str"]), "encoder block")[0].res
    if image_size is not None:
        if declared is not None and int(declared) != int(image_size):
            raise CheckpointError(f"--image-size {image_size} contradicts the VAE checkpoint's input_res {declared}")
        return int(image_size)
    return int(declared) if declared is not None else from_strings


def convert_state_dicts(
    vae_state: Mapping[str, Any],
    vae_hparams: Mapping[str, Any],
    ddpm_state: Mapping[str, Any],
    *,
    form: str | None = None,
    num_heads: int | None = None,
    image_size: int | None = None,
    names: list[str | os.PathLike] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Official VAE and DDPM state dicts (tensors, or anything with ``.shape``) -> (config, state, notes).

    ``names``: the checkpoint paths, VAE then DDPM (the DDPM's names the form, both hint the dataset).
    ``vae_state`` holds ``enc.*``/``dec.*``; ``ddpm_state`` the DDPMWrapper's full state dict.
    Works on meta tensors, so every released key layout can be checked without its weights.
    ``notes`` are the assumptions made (head count, form source), to be shown to the user.
    """
    names = [str(n) for n in (names or [])]
    notes: list[str] = []
    missing = [k for k in _VAE_HPARAMS if not vae_hparams.get(k)]
    if missing:
        raise CheckpointError(
            f"the VAE checkpoint's hyper_parameters lack {missing}: the official VAE saves its block and channel "
            "strings with save_hyperparameters(); is this the first-stage VAE checkpoint?")
    try:
        size = _image_size(vae_hparams, image_size)
        vae_cfg = VAEConfig(size, *(str(vae_hparams[k]) for k in _VAE_HPARAMS))
    except ArchitectureStringError as err:
        raise ArchitectureCheckpointError(f"the VAE checkpoint's architecture strings are invalid: {err}") from None
    _compare_shapes(_meta_shapes(lambda: VAE(vae_cfg)), {k: tuple(v.shape) for k, v in vae_state.items()},
                    "the VAE checkpoint's weights")

    # ---- the UNet: EMA weights, architecture from shapes
    ema = {k[len(_UNET_PREFIX):]: v for k, v in ddpm_state.items() if k.startswith(_UNET_PREFIX)}
    if not ema:
        if any(k.startswith(_ONLINE_PREFIX) for k in ddpm_state):
            raise CheckpointError("the DDPM checkpoint has no EMA weights (target_network.decoder.*), only the online "
                                  "network; DiffuseVAE samples from the EMA network")
        if any(k.startswith(("enc.", "dec.")) for k in ddpm_state):
            raise CheckpointError("--ddpm got a VAE checkpoint (enc.*/dec.* keys); did you swap --vae and --ddpm?")
        raise CheckpointError("not a DiffuseVAE DDPM checkpoint: no target_network.decoder.* (EMA UNet) weights")
    unet = infer_unet_config({k: tuple(v.shape) for k, v in ema.items()})
    # the head count does not change any shape: check the weights before asking anything else
    _compare_shapes(_meta_shapes(lambda: ConditionalUNet(UNetConfig(**unet, num_heads=1))),
                    {k: tuple(v.shape) for k, v in ema.items()}, "the DDPM checkpoint's EMA UNet weights")
    if unet["use_z"] and unet["z_dim"] != vae_cfg.z_dim:
        raise CheckpointError(f"the VAE does not fit this DDPM: the UNet projects {unet['z_dim']}-d codes but the VAE's "
                              f"z has {vae_cfg.z_dim} dimensions")
    down = 2 ** (len(unet["channel_mult"]) - 1)
    if size % down:
        raise CheckpointError(f"the VAE does not fit this DDPM: the UNet halves its input {len(unet['channel_mult']) - 1} "
                              f"times, which {size}x{size} images do not allow")
    inner_vae = {k[len("vae."):]: v for k, v in ddpm_state.items() if k.startswith("vae.")}
    if inner_vae:
        own = {k: tuple(v.shape) for k, v in vae_state.items()}
        inner = {k: tuple(v.shape) for k, v in inner_vae.items()}
        if own != inner:
            diff = sorted(set(own) ^ set(inner)) or [k for k in own if own[k] != inner[k]]
            raise CheckpointError(f"the VAE checkpoint does not match the VAE this DDPM was trained with (its vae.* "
                                  f"weights differ in layout, e.g. {diff[:3]}); pass the matching --vae")
        if any(v.device.type != "meta" for v in inner_vae.values()):
            changed = [k for k, v in vae_state.items() if not torch.equal(v.float(), inner_vae[k].float())]
            if changed:
                notes.append(f"the VAE checkpoint's weights differ from the DDPM checkpoint's copy (vae.*) in "
                             f"{len(changed)} tensors; the --vae weights are used")

    released = guess_released(unet, size, vae_cfg.z_dim, names)

    # ---- form: given, or read from a file name
    if form is not None:
        form = normalize_form(form)
        try:
            named = infer_form(names[-1]) if names else None
        except CheckpointError:
            named = None
        if named and named != form:
            notes.append(f"--form {form} overrides the file name, which says {named}")
    else:
        form = infer_form(names[-1]) if names else None
        if form is None:
            raise CheckpointError("cannot tell Form-1 from Form-2: the DDPM checkpoint stores neither, and no file name "
                                  "says form1/form2; pass --form form1 or --form form2")
        notes.append(f"form {form} taken from the file name")

    # ---- attention heads: not in the weights
    if num_heads is None:
        if released:
            r = RELEASED[released]
            num_heads = r["heads_train"]
            notes.append(f"assumed num_heads={num_heads}: the training config of the released {released} model "
                         f"(its test config says {r['heads_test']}); the weights do not store it, pass --num-heads N "
                         "to choose")
        else:
            num_heads = 1
            notes.append("assumed num_heads=1 (the official UNetModel default); the weights do not store the head "
                         "count, pass --num-heads N if the model was trained with another")
        source = "assumed"
    else:
        source = "given"
    num_heads = int(num_heads)
    try:
        unet_cfg = UNetConfig(**unet, num_heads=num_heads)
    except ValueError as err:
        raise ValueError(f"--num-heads {num_heads} does not fit this UNet: {err}") from None

    # ---- schedule: the official linspace, checked against the stored betas when present
    schedule = dict(DEFAULT_SCHEDULE)
    betas = ddpm_state.get("target_network.betas", ddpm_state.get("online_network.betas"))
    if betas is not None and betas.device.type != "meta":
        b = betas.double().cpu()
        schedule = {"beta_1": float(b[0]), "beta_2": float(b[-1]), "num_timesteps": b.shape[0]}
        if b.shape[0] == 1000 and torch.allclose(b, official_betas(1e-4, 0.02, 1000), rtol=0, atol=1e-12):
            schedule = dict(DEFAULT_SCHEDULE)
        elif not torch.allclose(b, official_betas(**schedule), rtol=0, atol=1e-9):
            raise CheckpointError("the DDPM checkpoint's betas are not a linear schedule; only the official "
                                  "linspace(beta_1, beta_2, T) is supported")
    variance = RELEASED[released]["variance"] if released else "fixedlarge"

    config = {
        "vae": vae_cfg.to_dict(),
        "unet": unet_cfg.to_dict(),
        "form": form,
        "schedule": schedule,
        "variance": variance,
        "sampler": "ddim",
        "spacing": "uniform",
        "num_heads_source": source,
        "released_config": released,
        "source": "official kpandey008/DiffuseVAE",
    }
    state = {"vae." + k: v for k, v in vae_state.items()}
    state.update({"unet." + k: v for k, v in ema.items()})
    return config, state, notes


# ---------------------------------------------------------------------------------------------
# Files


def _read(path: str | os.PathLike, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    ckpt = load_checkpoint(path, expected=what)
    return ckpt, state_dict_of(ckpt, path)


def _vae_parts(path, ckpt, sd) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if any(k.startswith((_UNET_PREFIX, _ONLINE_PREFIX)) for k in sd):
        raise CheckpointError(f"{path} is a DDPM checkpoint; --vae takes the first-stage VAE checkpoint "
                              "(did you swap --vae and --ddpm?)")
    vae = {k: v for k, v in sd.items() if k.startswith(("enc.", "dec."))}
    if not vae:
        vae = {k[4:]: v for k, v in sd.items() if k.startswith(("vae.enc.", "vae.dec."))}
    if not vae:
        raise CheckpointError(f"{path} holds no VAE weights (enc.*/dec.*)")
    hparams = ckpt.get("hyper_parameters") or ckpt.get("hparams") or {}
    if not isinstance(hparams, Mapping):
        hparams = getattr(hparams, "__dict__", {})
    return vae, dict(hparams)


def convert_diffusevae_checkpoint(
    vae_ckpt: str | os.PathLike,
    ddpm_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    form: str | None = None,
    num_heads: int | None = None,
    image_size: int | None = None,
) -> Path:
    """Convert an official DiffuseVAE VAE + DDPM checkpoint pair into a semdiff model folder.

    ``form``: "form1"/"form2" (needed unless a file name says it); ``num_heads``: the UNet's attention
    heads (not stored in the weights; the assumed default is stated as a warning and recorded in the
    config); ``image_size``: only when the VAE checkpoint lacks ``input_res`` and its strings do not
    say it. Returns the folder's path.
    """
    from semdiff.io import save_model_folder

    vae_file, vae_sd = _read(vae_ckpt, "DiffuseVAE VAE checkpoint")
    vae_state, hparams = _vae_parts(vae_ckpt, vae_file, vae_sd)
    ddpm_file, ddpm_sd = _read(ddpm_ckpt, "DiffuseVAE DDPM checkpoint")
    del vae_file, ddpm_file  # optimizer states etc. are not needed
    config, state, notes = convert_state_dicts(vae_state, hparams, ddpm_sd, form=form, num_heads=num_heads,
                                               image_size=image_size, names=[str(vae_ckpt), str(ddpm_ckpt)])
    config["source_files"] = {"vae": Path(vae_ckpt).name, "ddpm": Path(ddpm_ckpt).name}
    for note in notes:
        warnings.warn(f"DiffuseVAE conversion: {note}", UserWarning, stacklevel=2)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"the checkpoint weights contain NaN or infinite values ({bad[:3]})")
    with torch.device("meta"):
        model = DiffuseVAE(config)
    model.load_state_dict(state, strict=True, assign=True)
    return save_model_folder(model, out_dir)


def convert_diffusevae_ddpm(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vae: str | os.PathLike,
    form: str | None = None,
    num_heads: int | None = None,
    image_size: int | None = None,
) -> Path:
    """The zoo's converter call ``converter(checkpoint, out_dir, **args, vae=path)``: the DDPM
    checkpoint first, its VAE as a further input (see the diffusevae entries of ``weights_manifest.json``)."""
    return convert_diffusevae_checkpoint(vae, checkpoint, out_dir, form=form, num_heads=num_heads,
                                         image_size=image_size)


# ---------------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser) -> None:
    parser.add_argument("out_dir", help="model folder to write")
    parser.add_argument("--vae", required=True, help="official first-stage VAE .ckpt (models.vae.VAE)")
    parser.add_argument("--ddpm", required=True, help="official DDPM .ckpt (DDPMWrapper; its EMA UNet is used)")
    parser.add_argument("--form", choices=["form1", "form2"], default=None,
                        help="formulation the DDPM was trained with (needed unless a file name says form1/form2)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads of the UNet (not stored in the weights; a stated default otherwise)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size, needed only when the VAE checkpoint lacks input_res")


def run_cli(args) -> Path:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = convert_diffusevae_checkpoint(args.vae, args.ddpm, args.out_dir, form=args.form,
                                                num_heads=args.num_heads, image_size=args.image_size)
        finally:
            for w in caught:
                print(f"note: {w.message}", file=sys.stderr)
    return out
