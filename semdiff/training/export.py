"""Ship a trained model inside the package: the bundled model folder, its manifest entry, the demo inputs.

    python -m semdiff.training.export runs/emoji32/model --metrics runs/emoji32/metrics.json

copies ``config.json`` + ``model.safetensors`` (+ the model card) to ``semdiff/pretrained/<name>/``, writes
the manifest fragment ``semdiff/pretrained/manifest_entries.json`` (sha256 and size of every file, checked at
load time like any other model) and the demo's held-out emoji ``semdiff/pretrained/demo-emoji/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
NAME = "semdiff-emoji32-diffae"


#: the manifest fields of every model trained on the OpenMoji emoji (weights and outputs are adaptations)
EMOJI_LICENSE_FIELDS: dict[str, str] = {
    "license": "cc-by-sa-4.0",
    "license_note": "Trained on OpenMoji artwork (CC BY-SA 4.0): the weights and their outputs are adaptations "
                    "shared under CC BY-SA 4.0. Attribution: 'All emojis designed by OpenMoji - the open-source "
                    "emoji and icon project. License: CC BY-SA 4.0'.",
    "data_license": "CC-BY-SA-4.0 (OpenMoji, https://openmoji.org); labels from Unicode emoji-test.txt "
                    "(Unicode License)",
    "training_data": "emoji (semdiff.data.load_emoji, OpenMoji font), held-out split excluded",
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_entry(folder: Path, rel_path: str, config: dict[str, Any], metrics: dict[str, Any] | None) -> dict:
    files = {name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
             for name in ("config.json", "model.safetensors")}
    steps = config.get("default_steps") or {}
    training = config.get("training") or {}
    stages = training.get("stages", {})
    entry: dict[str, Any] = {
        "family": "diffae",
        "kind": "autoencoder",
        "description": (f"Diff-AE trained from scratch with `semdiff train --preset {training.get('preset')}` on "
                        f"{training.get('data_items')} OpenMoji emoji at {config['network']['image_size']}x"
                        f"{config['network']['image_size']} (CPU): semantic encoder (z_dim "
                        f"{config['network']['z_dim']}), UNet, latent DDIM prior, {len(config.get('attributes', []))} "
                        "linear attribute classifiers (skin tone, Unicode group). Ships inside the wheel."),
        "status": "bundled",
        "source": {"type": "bundled", "path": rel_path, "files": files},
        **EMOJI_LICENSE_FIELDS,
        "paper": {
            "title": "Diffusion Autoencoders: Toward a Meaningful and Decodable Representation",
            "authors": "Konpat Preechakul, Nattanat Chatthee, Suttisak Wizadwongsa, Supasorn Suwajanakorn",
            "venue": "CVPR 2022", "arxiv": "2111.15640", "url": "https://arxiv.org/abs/2111.15640",
            "code": "https://github.com/phizaz/diffae",
        },
        "preprocessing": {"image_size": int(config["network"]["image_size"]), "alignment": "none",
                          "resize": "emoji rendered at 4x and area-averaged to 32x32 on white", "range": [-1, 1]},
        "defaults": {"encode_stochastic": int(steps.get("encode_stochastic", 50)), "decode": int(steps.get("decode", 20)),
                     "manipulate": int(steps.get("manipulate", 20)), "prior": int(steps.get("prior", 50))},
        "notes": [
            "Attributes: " + ", ".join(config.get("attributes", [])),
            f"Held-out split: SHA-256 of the codepoints without skin-tone modifiers < {training.get('holdout')}; "
            "all skin-tone variants of a held-out emoji are held out.",
            "Training stages (steps): " + ", ".join(f"{k} {v.get('steps')}" for k, v in stages.items()),
        ],
    }
    if metrics:
        entry["metrics"] = compact_metrics(metrics)
    return entry


def compact_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of an ``evaluate`` result, for the manifest."""
    out: dict[str, Any] = {"split": f"{metrics['data']['split']} ({metrics['data']['items']} images)"}
    for row in (metrics.get("reconstruction") or {}).get("rows", []):
        key = ("recon_z" if row["code"] == "z" else "recon_z_xT") + f"_T{row['T']}"
        out[key] = {"mse": round(row["mse"], 5), "psnr": round(row["psnr"], 2), "ssim": round(row["ssim"], 4)}
    for row in (metrics.get("probe") or {}).get("rows", []):
        out[f"probe_{row['label']}"] = {"z_sem": round(row["z_sem"], 3), "pca": round(row["pca"], 3)}
    edit = metrics.get("edit")
    if edit:
        out["edit_success_mean"] = round(edit["mean_success"], 3)
    sq = metrics.get("sample_quality") or {}
    for key in ("semdiff_fd_samples_vs_heldout", "semdiff_fd_train_vs_heldout"):
        if key in sq:
            out[key] = round(sq[key], 3)
    for prior, value in (sq.get("semdiff_fd_samples_vs_heldout_by_prior") or {}).items():
        out[f"semdiff_fd_samples_vs_heldout_{prior}"] = round(value, 3)
    return out


def export_bundled(model_folder: str | Path, *, name: str = NAME, metrics_path: str | Path | None = None,
                   dest_root: Path = PRETRAINED) -> Path:
    from semdiff.evaluation import write_metrics_card

    src = Path(model_folder)
    dest = dest_root / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(src / f, dest / f)
    metrics = json.loads(Path(metrics_path).read_text()) if metrics_path else None
    if metrics:
        write_metrics_card(dest, metrics)
        (dest / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    elif (src / "README.md").is_file():
        shutil.copyfile(src / "README.md", dest / "README.md")
    config = json.loads((dest / "config.json").read_text())
    entry = family_manifest_entry(config)(dest, f"pretrained/{name}", config, metrics)
    fragment = dest_root / "manifest_entries.json"
    entries = json.loads(fragment.read_text()) if fragment.is_file() else {}
    entries[name] = entry
    fragment.write_text(json.dumps(entries, indent=2) + "\n")
    return dest


def family_manifest_entry(config: dict[str, Any]):
    """``manifest_entry`` of the model's family: its ``semdiff.families.<family>.training`` may define its own."""
    from semdiff.training.config import family_training_module

    return getattr(family_training_module(config.get("family", "diffae")), "manifest_entry", manifest_entry)


def export_demo_inputs(dest: Path = PRETRAINED / "demo-emoji", *, holdout: float = 0.1, image_size: int = 32,
                       picks: list[tuple[str, str]] | None = None) -> Path:
    """Write eight held-out emoji as ``inputs.png`` (a strip) + ``inputs.json`` for the demo.

    ``picks`` are ``(codepoints, role)`` with role ``interp_a``/``interp_b``/``edit``/``""``.
    """
    import numpy as np
    from PIL import Image

    from semdiff.data import load_emoji
    from semdiff.training.data import emoji_split_key, split_key_hash

    ds = load_emoji(image_size)
    index = {cp: i for i, cp in enumerate(ds.codepoints)}
    items, tiles = [], []
    for cp, role in picks or []:
        i = index[cp]
        if split_key_hash(emoji_split_key(cp)) >= holdout:
            raise ValueError(f"{cp} ({ds.names[i]}) is in the training split")
        items.append({"codepoints": cp, "name": ds.names[i], "role": role,
                      "group": ds.label_name("group", i), "skin_tone": int(ds.labels["skin_tone"][i])})
        tiles.append((ds.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    dest.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(dest / "inputs.png")
    (dest / "inputs.json").write_text(json.dumps({
        "image_size": image_size, "items": items,
        "license": "OpenMoji (https://openmoji.org), CC BY-SA 4.0: 'All emojis designed by OpenMoji - the "
                   "open-source emoji and icon project. License: CC BY-SA 4.0'",
        "split": f"held out (SHA-256 of the skin-tone-free codepoints < {holdout}): never used in training"},
        indent=2, ensure_ascii=False) + "\n")
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="copy a trained model into semdiff/pretrained and write its manifest entry")
    p.add_argument("model_folder")
    p.add_argument("--name", default=NAME)
    p.add_argument("--metrics", help="metrics JSON from `semdiff evaluate --out`")
    args = p.parse_args(argv)
    print(export_bundled(args.model_folder, name=args.name, metrics_path=args.metrics))


if __name__ == "__main__":
    main()
