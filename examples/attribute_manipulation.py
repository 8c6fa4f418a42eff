"""Attribute manipulation: move images along a classifier direction in the semantic code space.

    python examples/attribute_manipulation.py                       # a few emoji, towards dark skin tone
    python examples/attribute_manipulation.py --images me.png --attribute skin_tone_light --out edit.png

Each image is encoded (semantic code z), inverted to its stochastic code x_T (DDIM inversion), moved
along the attribute's direction by a sweep of scales (``z_n + s * sqrt(d) * w / |w|`` in the normalised
code space, Diff-AE's recipe) and decoded. The picture: one row per image, one column per scale.

The number: how strongly the model's own attribute classifier sees the attribute in each column,
measured by *re-encoding the edited images* (so it scores pixels, not the edited codes). If the
model has no head for the attribute, one is fitted first from the built-in emoji data set's skin-tone
labels (``semdiff.attributes.fit_attributes``) and its held-out accuracy is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from semdiff import SemanticAutoencoder
from semdiff.features import read_image_file
from semdiff.images import make_grid, save_image

DEFAULT_EMOJI = ["waving hand", "woman", "man", "baby"]
PREFERRED = ["skin_tone_dark", "skin_tone_5", "skin_tone_medium_dark", "skin_tone_4"]


def load_model(name: str | None, device: str | None) -> SemanticAutoencoder:
    """``name`` (a registered name, a folder or hf-hub:org/repo), or the model bundled with semdiff."""
    return SemanticAutoencoder.from_pretrained(name, device=device)


def emoji_by_name(names: list[str], size: int) -> torch.Tensor:
    from semdiff.data.emoji import load_emoji

    data = load_emoji(image_size=size)
    missing = [n for n in names if n not in data.names]
    if missing:
        raise SystemExit(f"no emoji named {missing}")
    return data.images[[data.names.index(n) for n in names]]


def fit_skin_tone(model: SemanticAutoencoder, n: int, steps: int | None) -> None:
    """Fit one-vs-rest skin-tone heads from emoji labels (held-out accuracy is printed)."""
    from semdiff.attributes import fit_attributes
    from semdiff.data.emoji import load_emoji

    data = load_emoji(image_size=model.image_size, groups=["People & Body"], limit=n, seed=0)
    codes = model.encode(data.images, progress=False)
    report = fit_attributes(model, codes, {"skin_tone": data.labels["skin_tone"]},
                            label_names={"skin_tone": data.label_names["skin_tone"]}, kind="categorical",
                            steps=steps)
    print(f"fitted skin-tone heads on {report.n_train} emoji codes:")
    print(report.table())


def main(argv: list[str] | None = None) -> dict[float, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the bundled emoji model)")
    p.add_argument("--images", nargs="+", default=None,
                   help=f"image files (default: the emoji {', '.join(DEFAULT_EMOJI)})")
    p.add_argument("--attribute", default=None, help="attribute name (default: a dark skin tone)")
    p.add_argument("--keep", nargs="*", default=[], help="attributes to hold fixed while editing")
    p.add_argument("--keep-others", action="store_true",
                   help="hold every other attribute of the model fixed (the edit direction is made orthogonal "
                        "to all their classifier weights)")
    p.add_argument("--sweep", default="-0.6,-0.3,0,0.3,0.6", help="comma-separated edit scales")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the model's)")
    p.add_argument("--inversion-steps", type=int, default=None, help="DDIM inversion steps (default: the model's)")
    p.add_argument("--fit-n", type=int, default=2000, help="emoji used to fit a head when the model has none")
    p.add_argument("--fit-steps", type=int, default=None, help="Adam steps for that fit (default: official 9375)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="attribute_manipulation.png", help="output PNG")
    args = p.parse_args(argv)

    model = load_model(args.model, args.device)
    print(model)
    attribute = args.attribute
    if attribute is None:
        attribute = next((a for a in PREFERRED if a in model.attributes), None)
        if attribute is None:
            fit_skin_tone(model, args.fit_n, args.fit_steps)
            attribute = next(a for a in PREFERRED if a in model.attributes)
    elif attribute not in model.attributes:
        raise SystemExit(f"the model has no attribute {attribute!r}; it has: {', '.join(model.attributes) or 'none'}")

    if args.images:
        images = torch.stack([read_image_file(f, model.image_size) for f in args.images])  # RGB, resized
    else:
        images = emoji_by_name(DEFAULT_EMOJI, model.image_size)
    scales = [float(s) for s in args.sweep.split(",")]
    keep = [a for a in model.attributes if a != attribute] if args.keep_others else args.keep

    t0 = time.perf_counter()
    z = model.encode(images)
    x_T = model.encode_stochastic(images, z, steps=args.inversion_steps)
    columns = [model.manipulate((z, x_T), attribute, scale=s, steps=args.steps, keep=keep) for s in scales]
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # rows: images, columns: scales
    save_image(make_grid(grid, nrow=len(scales)), args.out)
    print(f"wrote {args.out}: {len(images)} images x scales {scales} ({time.perf_counter() - t0:.1f} s)")

    # re-encode the edited images and ask the classifier
    probs = {}
    for s, col in zip(scales, columns):
        probs[s] = float(model.classify(col)[attribute].mean())
    print(f"P({attribute}) of the re-encoded edits, by scale:")
    for s, v in probs.items():
        print(f"  scale {s:+.2f}: {v:.3f}")
    return probs


if __name__ == "__main__":
    main()
