"""Sub-commands that run a model on image files: encode, reconstruct, interpolate, sample, manipulate."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from semdiff.cli import CLIError
from semdiff.images import IMAGE_EXTENSIONS, make_grid, save_image


def _model_args(p) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="manifest name, hf-hub:org/repo[@rev] or model folder (default: the bundled model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="compute precision")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--seed", type=int, default=0)


def _steps_args(p, *, inversion: bool = True) -> None:
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the model's)")
    p.add_argument("--sampler", default=None, help="decoding sampler where the family has several "
                                                     "(Diff-AE: ddim, dpmsolver++, unipc)")
    if inversion:
        p.add_argument("--inversion-steps", type=int, default=None, help="DDIM inversion steps (default: the model's)")
        p.add_argument("--inverter", default=None, help="inversion method where the family has several "
                                                         "(Diff-AE: ddim, fixed-point, dpmsolver++)")
    p.add_argument("--resize", action="store_true", help="resize + centre-crop inputs of another size")


def _decode_options(args) -> dict:
    return {"sampler": args.sampler} if getattr(args, "sampler", None) else {}


def _inversion_options(args) -> dict:
    return {"inverter": args.inverter} if getattr(args, "inverter", None) else {}


def load_model(args):
    from semdiff import SemanticAutoencoder

    return SemanticAutoencoder.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, local_files_only=True if args.offline else None,
        progress=False if args.no_progress else None, batch_size=args.batch_size,
    )


def expand_images(patterns: list[str]) -> list[Path]:
    """Image files named by paths, folders (recursive) or glob patterns, sorted; errors name what is missing."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            if not matches:
                raise CLIError(f"no image files match {pattern!r}")
            files += [m for m in matches if m.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise CLIError(f"no image files found in {' '.join(patterns)}")
    return files


def _generator(args) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed)


def _save_outputs(images: torch.Tensor, out: str, names: list[str] | None, nrow: int | None = None) -> None:
    """A folder gets one PNG per image; a file path gets one grid."""
    out_path = Path(out)
    if out_path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        save_image(make_grid(images, nrow=nrow or min(len(images), 8)), out_path)
        print(f"wrote {out_path}")
        return
    out_path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        name = names[i] if names else f"{i:05d}"
        save_image(img, out_path / f"{name}.png")
    print(f"wrote {len(images)} images to {out_path}")


# ---- handlers --------------------------------------------------------------------------------


def cmd_encode(args) -> int:
    from safetensors.torch import save_file

    model = load_model(args)
    files = expand_images(args.images)
    z = model.encode([str(f) for f in files], resize=args.resize)
    tensors = {"z": z.contiguous()}
    if args.stochastic:
        tensors["x_T"] = model.encode_stochastic([str(f) for f in files], z, steps=args.inversion_steps,
                                                 resize=args.resize).contiguous()
    meta = {"files": "\n".join(str(f) for f in files), "model": str(model.name), "family": model.family_name}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote codes of {len(files)} images to {args.out}")
    return 0


def cmd_reconstruct(args) -> int:
    model = load_model(args)
    files = expand_images(args.images)
    recon = model.reconstruct([str(f) for f in files], steps=args.steps, inversion_steps=args.inversion_steps,
                              inversion_options=_inversion_options(args), resize=args.resize, **_decode_options(args))
    _save_outputs(recon, args.out, [f.stem for f in files])
    return 0


def cmd_interpolate(args) -> int:
    model = load_model(args)
    images = model.interpolate(args.image_a, args.image_b, num=args.num, steps=args.steps,
                               inversion_steps=args.inversion_steps, inversion_options=_inversion_options(args),
                               resize=args.resize, **_decode_options(args))
    _save_outputs(images, args.out, None, nrow=args.num)
    return 0


def cmd_sample(args) -> int:
    model = load_model(args)
    images = model.sample(args.n, steps=args.steps, prior_steps=args.prior_steps, generator=_generator(args),
                          decode_options=_decode_options(args))
    _save_outputs(images, args.out, None)
    return 0


def _parse_attributes(specs: list[str], default_scale: float) -> dict[str, float]:
    out = {}
    for spec in specs:
        name, _, scale = spec.partition("=")
        try:
            out[name] = float(scale) if scale else default_scale
        except ValueError:
            raise CLIError(f"bad attribute {spec!r}: use NAME or NAME=SCALE") from None
    return out


def cmd_manipulate(args) -> int:
    model = load_model(args)
    files = expand_images(args.images)
    scales = _parse_attributes(args.attribute, args.scale)
    for name in scales:
        model.family.attribute_direction(name)  # clear error for unknown names before any work
    x = [str(f) for f in files]
    z = model.encode(x, resize=args.resize)
    x_T = model.encode_stochastic(x, z, steps=args.inversion_steps, resize=args.resize, **_inversion_options(args))
    opts = _decode_options(args)
    keep = "others" if args.keep == ["others"] else args.keep
    if args.sweep:
        sweep = [float(s) for s in args.sweep.split(",")]
        columns = [model.manipulate((z, x_T), {k: s for k in scales}, steps=args.steps, keep=keep, **opts)
                   for s in sweep]
        grid = torch.stack(columns, dim=1).flatten(0, 1)  # rows: images, columns: scales
        _save_outputs(grid, args.out if args.out.endswith(".png") else os.path.join(args.out, "sweep.png"), None,
                      nrow=len(sweep))
        return 0
    before = model.decode(z, x_T, steps=args.steps, **opts)
    after = model.manipulate((z, x_T), scales, steps=args.steps, keep=keep, **opts)
    strip = torch.stack([before, after], dim=1).flatten(0, 1)  # before | after per row
    _save_outputs(strip, args.out if args.out.endswith(".png") else os.path.join(args.out, "manipulate.png"), None,
                  nrow=2)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="semantic (and stochastic) codes of images -> .safetensors")
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    p.add_argument("--out", "-o", required=True, help="output .safetensors")
    p.add_argument("--stochastic", action="store_true", help="also store x_T by DDIM inversion")
    _model_args(p)
    _steps_args(p)
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser("reconstruct", help="encode + invert + decode images")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", "-o", required=True, help="folder (one PNG per image) or .png (a grid)")
    _model_args(p)
    _steps_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = subparsers.add_parser("interpolate", help="a grid PNG between two images")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--num", type=int, default=10)
    p.add_argument("--out", "-o", required=True, help="output .png")
    _model_args(p)
    _steps_args(p)
    p.set_defaults(func=cmd_interpolate)

    p = subparsers.add_parser("sample", help="new images from the representation prior")
    p.add_argument("n", type=int)
    p.add_argument("--out", "-o", required=True, help="folder or .png grid")
    p.add_argument("--prior-steps", type=int, default=None)
    _model_args(p)
    _steps_args(p, inversion=False)
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser("manipulate", help="edit attributes of images: a before/after strip or a scale sweep")
    p.add_argument("images", nargs="+")
    p.add_argument("--attribute", "-a", action="append", required=True,
                   help="attribute name, or NAME=SCALE; repeat for several")
    p.add_argument("--scale", type=float, default=0.3)
    p.add_argument("--keep", action="append", default=None, help="attribute to hold fixed (repeatable), or 'others': every "
                                                                 "attribute of another label")
    p.add_argument("--sweep", default=None, help="comma-separated scales for a sweep grid (each column edits every attribute by that scale), "
                   "e.g. --sweep=-0.6,-0.3,0,0.3,0.6")
    p.add_argument("--out", "-o", required=True, help="output .png (or folder)")
    _model_args(p)
    _steps_args(p)
    p.set_defaults(func=cmd_manipulate)
