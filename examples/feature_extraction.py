"""Feature extraction: semantic codes of an image folder, then a linear probe and nearest-neighbour retrieval.

    python examples/feature_extraction.py                                   # emoji, label = Unicode group
    python examples/feature_extraction.py --images photos/ --labels labels.csv --label smiling

1. ``semdiff.features.extract_features`` encodes every image of a folder into one .safetensors file
   (batched, resumable; the same as ``semdiff features photos/ -o codes.safetensors``).
2. Linear probe: softmax regression on the normalised codes of 80% of the images, accuracy on the
   other 20% (against always guessing the most common label).
3. Retrieval: for each held-out image, its k nearest training images by cosine similarity of the
   normalised codes; precision@k = the share of them with the same label (against chance).
   The picture shows a few queries (first column) and their neighbours.

Without ``--images`` the built-in emoji data set (``semdiff.data.emoji``) is written to ``--workdir``
as PNG files with a labels.csv, so the run goes through files exactly as one on your own folder.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from semdiff import SemanticAutoencoder
from semdiff.features import extract_features, read_image_file
from semdiff.images import make_grid, save_image


def load_model(name: str | None, device: str | None) -> SemanticAutoencoder:
    """``name`` (a registered name, a folder or hf-hub:org/repo), or the model bundled with semdiff."""
    return SemanticAutoencoder.from_pretrained(name, device=device)


def write_emoji_folder(folder: Path, size: int, n: int, seed: int) -> tuple[Path, Path]:
    """n random emoji as PNG files and a labels.csv (file, group, skin_tone)."""
    from semdiff.data.emoji import load_emoji

    data = load_emoji(image_size=size)
    keep = [i for i in range(len(data)) if data.label_name("group", i) != "Component"]
    keep = [keep[i] for i in torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:n].tolist()]
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "group", "skin_tone"])
        for i in keep:
            name = f"{data.codepoints[i].replace(' ', '-')}.png"
            if not (images_dir / name).is_file():
                save_image(data.images[i], images_dir / name)
            w.writerow([name, data.label_name("group", i), data.label_name("skin_tone", i)])
    return images_dir, labels


def read_labels(path: Path, column: str) -> dict[str, str]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    if column not in header[1:]:
        raise SystemExit(f"{path} has no column {column!r}; it has {header[1:]}")
    j = header.index(column)
    return {r[0]: r[j] for r in rows[1:] if r[j].strip()}


def match_labels(files: list[str], images_dir: Path, by_name: dict[str, str]) -> tuple[list[int], list[str]]:
    """Rows of the encoded files that have a label: CSV names relative to the images folder or absolute
    (or bare file names, when those are unique)."""
    by_path = {str((images_dir / name).resolve()): v for name, v in by_name.items()}  # absolute names stay
    bare = {Path(name).name: v for name, v in by_name.items()}
    unique = len(bare) == len(by_name)
    rows, values = [], []
    for i, f in enumerate(files):
        value = by_path.get(str(Path(f).resolve()))
        if value is None and unique:
            value = bare.get(Path(f).name)
        if value is not None:
            rows.append(i)
            values.append(value)
    return rows, values


def linear_probe(z_train, y_train, z_test, y_test, classes: int, steps: int = 500) -> float:
    """Softmax regression (Adam, full batch, a little weight decay); held-out accuracy."""
    layer = torch.nn.Linear(z_train.shape[1], classes)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(layer(z_train), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((layer(z_test).argmax(1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the bundled emoji model)")
    p.add_argument("--images", default=None, help="image folder (default: built-in emoji written to --workdir)")
    p.add_argument("--labels", default=None, help="CSV: file name (relative to --images), label columns")
    p.add_argument("--label", default="group", help="label column to probe (default: group)")
    p.add_argument("--n", type=int, default=1500, help="how many emoji in the default data (default 1500)")
    p.add_argument("--k", type=int, default=5, help="neighbours for precision@k")
    p.add_argument("--workdir", default="feature_extraction_data", help="where the default data and codes go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="retrieval.png", help="output PNG of queries and their neighbours")
    args = p.parse_args(argv)

    model = load_model(args.model, args.device)
    workdir = Path(args.workdir)
    if args.images is None:
        images_dir, labels_csv = write_emoji_folder(workdir, model.image_size, args.n, args.seed)
    else:
        if args.labels is None:
            raise SystemExit("--images needs --labels (a CSV: file name, label columns)")
        images_dir, labels_csv = Path(args.images), Path(args.labels)

    # 1. features (resumable: run it again after an interruption and it continues)
    codes_file = workdir / "codes.safetensors"
    workdir.mkdir(parents=True, exist_ok=True)
    result = extract_features(model, images_dir, codes_file)
    print(f"features: {len(result.files)} images -> {codes_file} ({result.computed} encoded, "
          f"{result.images_per_second:.0f} images/s)")
    if result.skipped:
        print(f"  skipped {len(result.skipped)} unreadable files, e.g. {result.skipped[0][0]}")

    # labels for the encoded files
    by_name = read_labels(labels_csv, args.label)
    rows, names = match_labels(result.files, images_dir, by_name)
    if not rows:
        raise SystemExit(f"no file named in {labels_csv} was among the images, e.g. {next(iter(by_name))!r} "
                         f"vs {result.files[0]!r}")
    classes = sorted(set(names))
    if len(classes) > 100:
        raise SystemExit(f"the label {args.label!r} has {len(classes)} distinct values; the probe is a classifier, "
                         "pick a categorical column")
    y = torch.tensor([classes.index(v) for v in names])
    z = result.z[rows]
    if len(classes) < 2:
        raise SystemExit(f"the label {args.label!r} has fewer than two values among the images")

    # 80 / 20 split; codes normalised with the training statistics
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    n_test = max(1, len(y) // 5)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = z[train].mean(0), z[train].std(0).clamp_min(1e-6)
    zn = (z - mean) / std

    # 2. linear probe
    acc = linear_probe(zn[train], y[train], zn[test], y[test], len(classes))
    counts = torch.bincount(y[train], minlength=len(classes)).float()
    baseline = float((y[test] == counts.argmax()).float().mean())
    print(f"linear probe on '{args.label}' ({len(classes)} classes, {len(train)} train / {len(test)} test): "
          f"held-out accuracy {acc:.3f} (majority baseline {baseline:.3f})")

    # 3. nearest-neighbour retrieval: held-out queries against the training images
    q = torch.nn.functional.normalize(zn[test], dim=1)
    g = torch.nn.functional.normalize(zn[train], dim=1)
    k = min(args.k, len(train))
    nn_idx = (q @ g.T).topk(k, dim=1).indices  # (n_test, k) indices into train
    same = (y[train][nn_idx] == y[test][:, None]).float()
    precision = float(same.mean())
    freq = counts / counts.sum()
    chance = float((freq[y[test]]).mean())
    print(f"nearest-neighbour retrieval: precision@{k} {precision:.3f} (chance {chance:.3f})")

    # the picture: 6 queries and their neighbours
    shown = test[:6]
    tiles = []
    for row, qi in enumerate(shown.tolist()):
        tiles.append(read_image_file(result.files[rows[qi]], model.image_size))
        for j in nn_idx[row].tolist():
            tiles.append(read_image_file(result.files[rows[train[j]]], model.image_size))
    save_image(make_grid(torch.stack(tiles), nrow=k + 1), args.out)
    print(f"wrote {args.out}: {len(shown)} queries (first column) and their {k} nearest neighbours")
    numbers = {"probe_accuracy": acc, "probe_baseline": baseline, f"precision_at_{k}": precision, "chance": chance}
    return numbers


if __name__ == "__main__":
    main()
