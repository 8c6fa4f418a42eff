"""semdiff in one command: reconstruct, interpolate, sample and edit emoji with the shipped model.

    python examples/demo.py                 # -> semdiff-demo.png, offline, CPU, well under a minute

Everything it needs ships inside the wheel: the model (``semdiff-emoji32-diffae``, a Diff-AE trained
with ``semdiff train --preset emoji32``) and eight emoji from its held-out split, which the model never
saw during training. The PNG has one labelled row per operation:

1. the held-out emoji;
2. their reconstructions from the semantic code z_sem plus the inverted stochastic code x_T;
3. decodings of z_sem alone (x_T drawn at random): what the 128 numbers of z_sem hold;
4. an interpolation between two held-out emoji (z linearly, x_T spherically);
5. new emoji sampled from the latent prior;
6. skin-tone edits along the attribute classifier's direction, one column per edit scale.

Emoji artwork: OpenMoji (https://openmoji.org), CC BY-SA 4.0; so are the model and its outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import semdiff
from semdiff import SemanticAutoencoder

PRETRAINED = Path(semdiff.__file__).resolve().parent / "pretrained"
MODEL = PRETRAINED / "semdiff-emoji32-diffae"
INPUTS = PRETRAINED / "demo-emoji"

STEPS = 20  # DDIM steps for inversion and decoding: sharp at 32x32 and fast on a CPU
PRIOR_STEPS = 50
EDIT_SCALES = (-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def load_inputs(folder: Path = INPUTS) -> tuple[torch.Tensor, list[dict]]:
    """The shipped held-out emoji: ``inputs.png`` (a strip of 32x32 tiles) and ``inputs.json``."""
    import numpy as np
    from PIL import Image

    meta = json.loads((folder / "inputs.json").read_text())
    strip = torch.from_numpy(np.array(Image.open(folder / "inputs.png").convert("RGB"))).float() / 255
    size = meta["image_size"]
    tiles = [strip[:, i * size:(i + 1) * size].permute(2, 0, 1) for i in range(len(meta["items"]))]
    return torch.stack(tiles), meta["items"]


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="semdiff demo: one PNG of reconstructions, interpolation, samples, edits")
    p.add_argument("--model", default=None, help="model name or folder (default: the shipped emoji model)")
    p.add_argument("--out", default="semdiff-demo.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    g = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731

    model = SemanticAutoencoder.from_pretrained(args.model or MODEL, progress=False)
    x, items = load_inputs()
    names = [it["name"] for it in items]

    # 1-3: encode, invert, decode
    z = model.encode(x)
    x_T = model.encode_stochastic(x, z, steps=STEPS)
    recon = model.decode(z, x_T, steps=STEPS)
    from_z = model.decode(z, steps=STEPS, generator=g())

    # 4: interpolation between two held-out emoji
    a, b = (next(i for i, it in enumerate(items) if it.get("role") == r) for r in ("interp_a", "interp_b"))
    interp = model.interpolate((z[a:a + 1], x_T[a:a + 1]), (z[b:b + 1], x_T[b:b + 1]), num=len(x), steps=STEPS)

    # 5: samples from the latent prior
    samples = model.sample(len(x), steps=STEPS, prior_steps=PRIOR_STEPS, generator=g())

    # 6: skin-tone edits of the people among the inputs
    rows_edit = []
    attribute = "skin_tone_dark" if "skin_tone_dark" in model.attributes else None
    if attribute:
        for i in (i for i, it in enumerate(items) if it.get("role") == "edit"):
            edits = [model.manipulate((z[i:i + 1], x_T[i:i + 1]), attribute, scale=s, steps=STEPS) for s in EDIT_SCALES]
            rows_edit.append((f"edit: {attribute}\n{names[i][:22]}", torch.cat(edits)))

    from semdiff.training.grids import save_labelled_grid

    rows = [("held-out emoji", x), ("reconstruction\n(z_sem + x_T)", recon), ("z_sem alone\n(random x_T)", from_z),
            (f"interpolation\n{names[a][:12]} -> {names[b][:12]}", interp), ("samples\n(latent prior)", samples),
            *rows_edit]
    scales = ", ".join(f"{s:g}" for s in EDIT_SCALES)
    out = save_labelled_grid(
        rows, args.out, scale=3,
        title=f"semdiff {semdiff.__version__} - {Path(str(model.name)).name}: emoji the model never saw in training",
        footer=f"edit scales (left to right): {scales}   |   emoji: OpenMoji, CC BY-SA 4.0   |   "
               f"{time.time() - t0:.1f} s on {torch.get_num_threads()} CPU thread(s)")
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main()
