"""Attribute directions from your own labels: linear heads on normalised semantic codes.

    from semdiff import SemanticAutoencoder
    from semdiff.attributes import fit_attributes

    model = SemanticAutoencoder.from_pretrained("path/to/model")
    report = fit_attributes(model, "photos/", "labels.csv")   # or codes + {"smiling": tensor}
    print(report.table())                                     # held-out accuracy / R^2 per attribute
    model.manipulate(img, attribute="smiling", scale=0.3)     # the new heads are in the model now
    report.save("path/to/model")                              # ... and in its folder

The recipe is Diff-AE's (``experiment_classifier.py: ClsModel``): one ``nn.Linear(code_dim, A)`` on
codes normalised with the model's ``codes_mean``/``codes_std`` (computed from the given codes when the
model has none), trained with Adam (lr 1e-3, batch 32, 9,375 steps by default) on BCE-with-logits,
a label > 0 counting as positive. Continuous labels get a regression head instead (MSE on the
standardised label); its weight vector is the edit direction. Categorical labels become one binary
head per value, one-vs-rest, named ``<label>_<value>`` (a text value ``none`` means "absent" and gets
no head). The heads are trained on the training split only, so the held-out numbers describe
exactly the heads that are stored.

Heads are merged into the model's classifier (:func:`add_attributes_to_model`): attributes it
already has stay as they are (an attribute fitted again is replaced), so the official CelebA-40
heads and your own live side by side, and ``manipulate``, ``classify`` and ``--keep`` use them all.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "AttributeFitReport",
    "add_attributes_to_model",
    "fit_attributes",
    "fit_linear_heads",
    "parse_labels",
    "read_labels_csv",
    "save_attributes",
]

#: the official classifier recipe: Adam, lr 1e-3, batch 32, 300k samples = 9,375 steps
OFFICIAL_STEPS = 9375
OFFICIAL_LR = 1e-3
OFFICIAL_BATCH = 32

_MISSING = {"", "na", "n/a", "nan", "null", "?"}
_TRUE = {"true", "yes", "y", "t"}
_FALSE = {"false", "no", "n", "f"}
KINDS = ("auto", "binary", "categorical", "continuous")


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", str(text).lower()).strip("_") or "value"


# ---------------------------------------------------------------------------------------------
# Labels


def read_labels_csv(path: str | os.PathLike) -> tuple[list[str], dict[str, list[str]]]:
    """A labels CSV -> (file names, {column: raw values}).

    The first row names the columns; the first column holds image file names (relative to the
    images folder, or absolute), every other column one label. Comma, semicolon or tab separated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no labels file {path}")
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path} needs a header row and at least one data row")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(lines, dialect))
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise ValueError(f"{path}: the header must name the file column and at least one label column, got {header}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate column names {dupes}")
    files: list[str] = []
    columns: dict[str, list[str]] = {h: [] for h in header[1:]}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, row {lineno}: {len(row)} fields, the header has {len(header)}")
        files.append(row[0].strip())
        for h, v in zip(header[1:], row[1:]):
            columns[h].append(v.strip())
    return files, columns


def _as_float(values: Sequence[str]) -> list[float] | None:
    out = []
    for v in values:
        if v.lower() in _MISSING:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except ValueError:
            return None
    return out


@dataclass
class _Heads:
    """Targets of the heads of one label column."""

    column: str
    kind: str  # binary | categorical | continuous
    names: list[str]
    targets: torch.Tensor  # (N, len(names)) float, NaN = missing
    classes: list[str] = field(default_factory=list)  # categorical: the value of each head
    class_index: torch.Tensor | None = None  # categorical: (N,) index into all_classes, -1 missing
    all_classes: list[str] = field(default_factory=list)
    target_mean: float = 0.0
    target_std: float = 1.0


def _binary_from_numbers(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), x, (x > 0).float())  # the official rule: label > 0 is positive


def _column_heads(column: str, values: Any, kind: str, value_names: Sequence[str] | None,
                  max_classes: int) -> _Heads:
    """One label column (strings, numbers, a tensor) -> the heads it becomes."""
    if kind not in KINDS:
        raise ValueError(f"kind of {column!r} must be one of {KINDS}, got {kind!r}")
    numbers: torch.Tensor | None = None
    texts: list[str] | None = None
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        t = torch.as_tensor(values)
        if t.dim() != 1:
            raise ValueError(f"label {column!r} must be one value per image, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool:
            numbers, kind = t.float(), ("binary" if kind == "auto" else kind)
        else:
            numbers = t.double()
    else:
        values = [str(v).strip() for v in values]
        floats = _as_float(values)
        if floats is not None:
            numbers = torch.tensor(floats, dtype=torch.float64)
        else:
            lowered = {v.lower() for v in values} - _MISSING
            if kind in ("auto", "binary") and lowered <= (_TRUE | _FALSE):
                numbers = torch.tensor([math.nan if v.lower() in _MISSING else float(v.lower() in _TRUE)
                                        for v in values], dtype=torch.float64)
                kind = "binary"
            else:
                texts = values
    if texts is not None:
        if kind == "continuous":
            raise ValueError(f"label {column!r} has text values, it cannot be continuous")
        if kind == "binary":
            raise ValueError(f"label {column!r} has text values other than true/false/yes/no; use kind 'categorical'")
        kind = "categorical"
        present = [v for v in texts if v.lower() not in _MISSING]
        all_classes = sorted(set(present))
        index = torch.tensor([all_classes.index(v) if v.lower() not in _MISSING else -1 for v in texts])
    else:
        assert numbers is not None
        observed = numbers[~torch.isnan(numbers)]
        distinct = torch.unique(observed)
        integer = bool(torch.all(observed == observed.round())) if len(observed) else True
        if kind == "auto":
            if integer and set(distinct.tolist()) <= {-1.0, 0.0, 1.0}:
                kind = "binary"
            elif integer and len(distinct) <= 10:
                kind = "categorical"
            else:
                kind = "continuous"
        if kind == "binary":
            return _Heads(column, "binary", [column], _binary_from_numbers(numbers).float()[:, None])
        if kind == "continuous":
            mean = float(observed.mean()) if len(observed) else 0.0
            std = float(observed.std()) if len(observed) > 1 else 1.0
            std = std if std > 0 else 1.0
            return _Heads(column, "continuous", [column], ((numbers - mean) / std).float()[:, None],
                          target_mean=mean, target_std=std)
        if not integer:
            raise ValueError(f"label {column!r} has non-integer numbers; it cannot be categorical")
        codes = distinct.long().tolist()
        if value_names is not None:
            all_classes = [str(value_names[c]) if 0 <= c < len(value_names) else str(c) for c in codes]
        else:
            all_classes = [str(c) for c in codes]
        lookup = {c: i for i, c in enumerate(codes)}
        index = torch.tensor([-1 if math.isnan(v) else lookup[int(v)] for v in numbers.tolist()])
    if len(all_classes) > max_classes:
        raise ValueError(f"label {column!r} has {len(all_classes)} distinct values, more than max_classes={max_classes} "
                         "one-vs-rest heads; pass kind='continuous' for it, or raise max_classes")
    heads = [i for i, c in enumerate(all_classes) if c.lower() != "none"]
    names = [f"{column}_{_slug(all_classes[i])}" for i in heads]
    targets = torch.stack([(index == i).float() for i in heads], dim=1) if heads else torch.zeros(len(index), 0)
    targets[index < 0] = math.nan
    return _Heads(column, "categorical", names, targets, classes=[all_classes[i] for i in heads],
                  class_index=index, all_classes=all_classes)


def parse_labels(labels: Mapping[str, Any], *, kind: str | Mapping[str, str] = "auto",
                 label_names: Mapping[str, Sequence[str]] | None = None, max_classes: int = 64) -> list[_Heads]:
    """Label columns -> heads: binary (0/1, -1/1, true/false, bool), categorical (one-vs-rest) or continuous.

    ``kind`` is one kind for every column or ``{column: kind}`` (others "auto"). In "auto", text is
    categorical (true/false/yes/no: binary), integers within {-1, 0, 1} binary, other integers with
    at most 10 distinct values categorical, anything else continuous. ``label_names[column]`` names
    the integer values of a categorical column (e.g. a data set's ``label_names``).
    """
    out = []
    for column, values in labels.items():
        k = kind.get(column, "auto") if isinstance(kind, Mapping) else kind
        names = (label_names or {}).get(column)
        out.append(_column_heads(str(column), values, k, names, max_classes))
    return out


# ---------------------------------------------------------------------------------------------
# Training


def _masked_loss(logits: torch.Tensor, y: torch.Tensor, continuous: torch.Tensor) -> torch.Tensor:
    mask = ~torch.isnan(y)
    y0 = torch.nan_to_num(y)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y0, reduction="none")
    mse = (logits - y0) ** 2
    per = torch.where(continuous[None, :], mse, bce)
    return (per * mask).sum() / mask.sum().clamp_min(1)


def fit_linear_heads(zn: torch.Tensor, targets: torch.Tensor, continuous: torch.Tensor, *, steps: int = OFFICIAL_STEPS,
                     lr: float = OFFICIAL_LR, batch_size: int = OFFICIAL_BATCH, weight_decay: float = 0.0,
                     seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``Linear(D, A)`` on normalised codes ``zn`` (N, D) for ``targets`` (N, A) (NaN = missing).

    BCE-with-logits on the binary columns, MSE on the ``continuous`` ones; Adam; shuffled epochs of
    ``batch_size``. Deterministic for a given ``seed``. Returns ``(weight (A, D), bias (A,))``.
    """
    n, d = zn.shape
    a = targets.shape[1]
    layer = nn.Linear(d, a)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    zn, targets = zn.float(), targets.float()
    bs = min(batch_size, n)
    threads = torch.get_num_threads()
    # tiny matrix products: one thread is 10-30x faster than several fighting over the cores
    torch.set_num_threads(1)
    try:
        _train_loop(layer, opt, zn, targets, continuous, steps, bs, n, gen, progress)
    finally:
        torch.set_num_threads(threads)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _train_loop(layer, opt, zn, targets, continuous, steps, bs, n, gen, progress) -> None:
    from semdiff.utils import progress_bar

    perm, pos = torch.randperm(n, generator=gen), 0
    with torch.enable_grad():
        for _ in progress_bar(range(steps), total=steps, enabled=progress, desc="fit-attributes"):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs]
            pos += bs
            loss = _masked_loss(layer(zn[idx]), targets[idx], continuous)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _auc(score: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = score[y > 0.5], score[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    ranks = torch.empty(len(score), dtype=torch.float64)
    order = torch.argsort(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    # average ranks of ties
    s_sorted = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and s_sorted[j + 1] == s_sorted[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j + 2) / 2
        i = j + 1
    r = ranks[y > 0.5].sum()
    return float((r - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _binary_metrics(logit: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = (logit > 0).float()
    pos = y > 0.5
    acc = float((pred == y).float().mean())
    tpr = float(pred[pos].mean()) if pos.any() else math.nan
    tnr = float(1 - pred[~pos].mean()) if (~pos).any() else math.nan
    rate = float(y.mean())
    return {"accuracy": acc, "balanced_accuracy": float(torch.tensor([tpr, tnr]).nanmean()),
            "baseline_accuracy": max(rate, 1 - rate), "auc": _auc(logit, y), "positives": int(pos.sum()),
            "n": int(len(y))}


def _continuous_metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    sst = float(((y - y.mean()) ** 2).sum())
    sse = float(((y - pred) ** 2).sum())
    r2 = 1 - sse / sst if sst > 0 else math.nan
    corr = float(torch.corrcoef(torch.stack([pred, y]))[0, 1]) if len(y) > 1 else math.nan
    return {"r2": r2, "pearson_r": corr, "n": int(len(y))}


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class AttributeFitReport:
    """Fitted heads and their held-out quality.

    ``weight`` (A, D) and ``bias`` (A,) act on codes normalised with ``codes_mean``/``codes_std``;
    ``metrics[name]`` holds held-out ``accuracy``, ``balanced_accuracy``, ``baseline_accuracy``
    (always guessing the majority), ``auc`` for binary heads and ``r2``/``pearson_r`` for
    continuous ones; ``groups[column]`` the multi-class accuracy of a categorical label's heads
    (argmax); ``skipped`` lists ``(head, reason)`` of heads that could not be fitted.
    """

    names: list[str]
    kinds: dict[str, str]
    weight: torch.Tensor
    bias: torch.Tensor
    codes_mean: torch.Tensor
    codes_std: torch.Tensor
    metrics: dict[str, dict[str, float]]
    groups: dict[str, dict[str, Any]]
    n_train: int
    n_test: int
    steps: int
    info: dict[str, dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    codes_stats_computed: bool = False

    def table(self) -> str:
        """A plain-text table of the held-out numbers."""
        lines = [f"{'attribute':<32} {'kind':<11} {'held-out':>9} {'balanced':>9} {'baseline':>9} {'AUC':>6} {'n':>6}"]
        for name in self.names:
            m = self.metrics.get(name, {})
            if self.kinds[name] == "continuous":
                lines.append(f"{name:<32} {'continuous':<11} {'R2 ' + _fmt(m.get('r2')):>9} {'':>9} {'':>9} "
                             f"{'':>6} {m.get('n', 0):>6}")
            else:
                lines.append(f"{name:<32} {self.kinds[name]:<11} {_fmt(m.get('accuracy')):>9} "
                             f"{_fmt(m.get('balanced_accuracy')):>9} {_fmt(m.get('baseline_accuracy')):>9} "
                             f"{_fmt(m.get('auc')):>6} {m.get('n', 0):>6}")
        for column, g in self.groups.items():
            lines.append(f"{column + ' (' + str(g['classes']) + '-way)':<32} {'argmax':<11} {_fmt(g.get('accuracy')):>9} "
                         f"{'':>9} {_fmt(g.get('baseline_accuracy')):>9} {'':>6} {g.get('n', 0):>6}")
        for name, reason in self.skipped:
            lines.append(f"{name:<32} skipped: {reason}")
        lines.append(f"trained on {self.n_train} codes, held out {self.n_test}, {self.steps} Adam steps")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"attributes": list(self.names), "kinds": dict(self.kinds), "metrics": self.metrics,
                "groups": self.groups, "n_train": self.n_train, "n_test": self.n_test, "steps": self.steps,
                "skipped": [list(s) for s in self.skipped]}

    def apply(self, model) -> None:
        """Merge the heads into ``model`` (a SemanticAutoencoder or family)."""
        add_attributes_to_model(model, self.names, self.weight, self.bias, info=self.info,
                                codes_mean=self.codes_mean, codes_std=self.codes_std)

    def save(self, model, folder: str | os.PathLike) -> Path:
        """Merge the heads into ``model`` (if not done yet) and write the model folder."""
        family = _family(model)
        missing = [n for n in self.names if n not in family.attribute_names]
        if missing:
            self.apply(family)
        return save_attributes(family, folder)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _family(model):
    from semdiff.families.base import Family

    return model if isinstance(model, Family) else model.family


# ---------------------------------------------------------------------------------------------
# Merging into a model


def add_attributes_to_model(model, names: Sequence[str], weight: torch.Tensor, bias: torch.Tensor, *,
                            info: Mapping[str, Mapping[str, Any]] | None = None,
                            codes_mean: torch.Tensor | None = None, codes_std: torch.Tensor | None = None) -> list[str]:
    """Merge linear heads into a model's attribute classifier; returns the model's attribute names.

    ``model`` is a SemanticAutoencoder or a family. Attributes the classifier already has are kept
    (a name given again is replaced in place), the new ones are appended, the ``Linear`` grows and
    ``config["attributes"]`` follows. A model without code statistics takes ``codes_mean``/
    ``codes_std`` (they must be the ones the heads were fitted with).
    """
    family = _family(model)
    names = list(names)
    d = family.code_dim
    weight = torch.as_tensor(weight, dtype=torch.float32).reshape(len(names), -1)
    bias = torch.as_tensor(bias, dtype=torch.float32).reshape(len(names))
    if weight.shape[1] != d:
        raise ValueError(f"the heads act on {weight.shape[1]}-d codes, the model's codes are {d}-d")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate attribute names in {names}")
    device = next(family.parameters()).device
    if family.codes_mean is None:
        if codes_mean is None or codes_std is None:
            raise ValueError("the model has no code statistics (codes_mean/codes_std); pass the ones the heads "
                             "were fitted with")
        del family.codes_mean, family.codes_std
        family.register_buffer("codes_mean", torch.as_tensor(codes_mean).float().reshape(1, d).to(device))
        family.register_buffer("codes_std", torch.as_tensor(codes_std).float().reshape(1, d).to(device))
    old = list(family.attribute_names)
    all_names = old + [n for n in names if n not in old]
    w = torch.zeros(len(all_names), d)
    b = torch.zeros(len(all_names))
    if family.classifier is not None and old:
        w[:len(old)] = family.classifier.weight.detach().float().cpu()
        b[:len(old)] = family.classifier.bias.detach().float().cpu()
    for i, n in enumerate(names):
        j = all_names.index(n)
        w[j], b[j] = weight[i], bias[i]
    layer = nn.Linear(d, len(all_names))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    layer.requires_grad_(False)
    family.classifier = layer.to(device)
    family.attribute_names = all_names
    family.config["attributes"] = list(all_names)
    family.config["has_code_stats"] = True
    if info:
        merged = dict(family.config.get("attribute_info") or {})
        merged.update({k: dict(v) for k, v in info.items()})
        family.config["attribute_info"] = merged
    return all_names


def save_attributes(model, folder: str | os.PathLike) -> Path:
    """Write the model (with its classifier) to a model folder: ``config.json`` + ``model.safetensors``."""
    from semdiff.io import save_model_folder

    return save_model_folder(_family(model), folder)


# ---------------------------------------------------------------------------------------------
# Codes and file matching


def _codes_of(model, source: Any, *, resize: bool, batch_size: int | None, progress: bool | None, hflip: bool = False
              ) -> tuple[torch.Tensor, list[str] | None, Path | None, torch.Tensor | None]:
    """(codes, file names or None, images root or None, codes of the mirror images or None)."""
    from semdiff.features import FeatureResult, iter_folder_codes, list_images, load_features

    def no_flip(what: str) -> None:
        if hflip:
            raise ValueError(f"hflip needs images, not {what}: pass the images (a folder, files or a tensor)")

    if isinstance(source, FeatureResult):
        no_flip("a features result")
        return source.z.float().cpu(), list(source.files), None, None
    if isinstance(source, torch.Tensor):
        if source.dim() == 2:
            no_flip("codes")
            if source.shape[1] != model.code_dim:
                raise ValueError(f"codes must be (N, {model.code_dim}), got {tuple(source.shape)}")
            return source.detach().float().cpu(), None, None, None
        z = model.encode(source, resize=resize, progress=False).cpu()
        flipped = model.encode(source.flip(-1), resize=resize, progress=False).cpu() if hflip else None
        return z, None, None, flipped
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix in (".safetensors", ".npy") \
            and Path(source).is_file():
        no_flip("a features file")
        feats = load_features(source)
        root = feats.metadata.get("root")
        return feats.z.float(), list(feats.files), Path(root) if root else None, None
    root = Path(source) if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() else None
    files = list_images(source)
    from semdiff.utils import progress_bar, progress_enabled

    bar = progress_enabled(progress if progress is not None else model.progress)
    out = []
    for flip in ([False, True] if hflip else [False]):
        stream = iter_folder_codes(model, files, batch_size=batch_size, resize=resize, hflip=flip)
        names, zs = [], []
        with warnings.catch_warnings():
            if flip:
                warnings.simplefilter("ignore")  # the same files were reported on the first pass
            for paths, z, _ in progress_bar(stream, total=len(stream), enabled=bar and len(stream) > 1,
                                            desc="encode mirrored" if flip else "encode"):
                names += paths
                zs.append(z)
        if not zs:
            raise ValueError(f"none of the images in {source} could be read")
        out.append((torch.cat(zs), names))
    return out[0][0], out[0][1], root, out[1][0] if hflip else None


def _match_rows(label_files: Sequence[str], code_files: Sequence[str], root: Path | None,
                labels_dir: Path | None) -> tuple[list[int], list[int], list[str]]:
    """Pairs (label row, code row) whose file names agree; and the label names with no image."""
    keys: dict[str, int] = {}
    basenames: dict[str, list[int]] = {}
    for i, f in enumerate(code_files):
        p = Path(f)
        keys.setdefault(str(p), i)
        keys.setdefault(p.as_posix(), i)
        keys.setdefault(str(p.resolve()), i)
        if root is not None:
            for a, b in ((p, root), (p.resolve(), root.resolve())):
                try:
                    keys.setdefault(a.relative_to(b).as_posix(), i)
                except ValueError:
                    pass
        basenames.setdefault(p.name, []).append(i)
    rows, code_rows, unmatched = [], [], []
    for r, name in enumerate(label_files):
        cands = [name, Path(name).as_posix()]
        if root is not None:
            cands.append(str((root / name).resolve()))
        if labels_dir is not None:
            cands.append(str((labels_dir / name).resolve()))
        cands.append(str(Path(name).resolve()))
        hit = next((keys[c] for c in cands if c in keys), None)
        if hit is None and len(basenames.get(Path(name).name, [])) == 1:
            hit = basenames[Path(name).name][0]
        if hit is None:
            unmatched.append(name)
        else:
            rows.append(r)
            code_rows.append(hit)
    return rows, code_rows, unmatched


# ---------------------------------------------------------------------------------------------
# The whole job


def fit_attributes(
    model,
    codes_or_images: Any,
    labels: Mapping[str, Any] | str | os.PathLike,
    *,
    kind: str | Mapping[str, str] = "auto",
    label_names: Mapping[str, Sequence[str]] | None = None,
    columns: Sequence[str] | None = None,
    steps: int | None = None,
    lr: float = OFFICIAL_LR,
    batch_size: int = OFFICIAL_BATCH,
    weight_decay: float = 0.0,
    holdout: float = 0.2,
    seed: int = 0,
    resize: bool = True,
    hflip: bool = False,
    apply: bool = True,
    max_classes: int = 64,
    min_count: int = 2,
    encode_batch_size: int | None = None,
    progress: bool | None = None,
) -> AttributeFitReport:
    """Fit linear attribute heads on normalised codes from labels; report held-out quality.

    Args:
        model: a :class:`semdiff.SemanticAutoencoder`.
        codes_or_images: codes (N, code_dim); images (a (N,3,H,W) tensor in [0, 1]); a folder, glob or
            list of image files; or a features file / ``FeatureResult`` from ``semdiff features``.
        labels: ``{name: values}`` with one value per row of ``codes_or_images``, or a CSV whose
            first column names the image files (then ``codes_or_images`` must carry file names:
            files, a folder, or a features file).
        kind: "auto", "binary", "categorical" or "continuous", for all labels or ``{label: kind}``.
        label_names: names of the integer values of categorical labels (for the head names).
        columns: use only these label columns.
        steps, lr, batch_size, weight_decay: Adam on BCE (binary) / MSE (continuous); the default
            ``steps`` is the official 9,375.
        holdout: the fraction held out (random, ``seed``) to measure accuracy / R^2; 0 for none.
        resize: resize + centre-crop images of another size.
        hflip: the official augmentation: train on the mirror images too (their codes are encoded
            alongside; the held-out numbers use unmirrored images only). Needs images, not codes;
            leave it off where mirroring changes the label (arrows, text, left/right).
        apply: merge the heads into ``model`` (``manipulate(..., attribute=name)`` works right away).
        min_count: a binary head needs at least this many positives and negatives to be trained.
    """
    from semdiff.utils import progress_enabled

    family = model.family
    steps = OFFICIAL_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    codes, files, root, flipped = _codes_of(model, codes_or_images, resize=resize, batch_size=encode_batch_size,
                                            progress=progress, hflip=hflip)
    # labels -> aligned with the code rows
    if isinstance(labels, (str, os.PathLike)):
        if files is None:
            raise ValueError("labels from a CSV are matched by file name: pass image files, a folder or a "
                             "features file as codes_or_images, not bare codes or tensors")
        label_files, raw = read_labels_csv(labels)
        rows, code_rows, unmatched = _match_rows(label_files, files, root, Path(labels).parent)
        if unmatched:
            more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
            warnings.warn(f"{len(unmatched)} label row(s) name no readable image: {', '.join(unmatched[:5])}{more}",
                          stacklevel=2)
        if not rows:
            raise ValueError(f"no file in {labels} matches an image (e.g. {label_files[0]!r} vs {files[0]!r})")
        codes = codes[code_rows]
        flipped = flipped[code_rows] if flipped is not None else None
        label_map: dict[str, Any] = {k: [v[r] for r in rows] for k, v in raw.items()}
    else:
        label_map = dict(labels)
        for k, v in label_map.items():
            if len(v) != len(codes):
                raise ValueError(f"label {k!r} has {len(v)} values for {len(codes)} codes")
    if columns is not None:
        unknown = [c for c in columns if c not in label_map]
        if unknown:
            raise KeyError(f"no label column(s) {unknown}; the labels have {sorted(label_map)}")
        label_map = {c: label_map[c] for c in columns}
    if not label_map:
        raise ValueError("no label columns given")
    heads = parse_labels(label_map, kind=kind, label_names=label_names, max_classes=max_classes)

    n = len(codes)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_test = int(round(holdout * n))
    if holdout > 0 and n_test == 0 and n >= 2:
        n_test = 1
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if len(train_idx) == 0:
        raise ValueError("no training rows left after the hold-out split")

    # normalisation: the model's statistics, or the data's
    computed = family.codes_mean is None
    if computed:
        mean = codes.mean(0, keepdim=True)
        std = codes.std(0, keepdim=True) if n > 1 else torch.ones_like(mean)
        std = std.clamp_min(max(1e-6, float(std.max()) * 1e-6) if n > 1 else 1.0)
    else:
        mean = family.codes_mean.detach().float().cpu()
        std = family.codes_std.detach().float().cpu()
    zn = (codes.float() - mean) / std

    names: list[str] = []
    kinds: dict[str, str] = {}
    cols, continuous = [], []
    skipped: list[tuple[str, str]] = []
    owner: dict[str, _Heads] = {}
    for h in heads:
        for j, name in enumerate(h.names):
            y = h.targets[train_idx, j]
            y = y[~torch.isnan(y)]
            if len(y) == 0:
                skipped.append((name, "no labelled training rows"))
                continue
            if h.kind != "continuous":
                pos, neg = int((y > 0.5).sum()), int((y <= 0.5).sum())
                if pos < min_count or neg < min_count:
                    skipped.append((name, f"{pos} positive and {neg} negative training rows (< {min_count})"))
                    continue
            elif len(y) < 2:
                skipped.append((name, "fewer than 2 labelled training rows"))
                continue
            names.append(name)
            kinds[name] = h.kind
            cols.append(h.targets[:, j])
            continuous.append(h.kind == "continuous")
            owner[name] = h
    for name, reason in skipped:
        warnings.warn(f"attribute {name!r} not fitted: {reason}", stacklevel=2)
    if not names:
        raise ValueError("no attribute could be fitted: " + "; ".join(f"{n}: {r}" for n, r in skipped))
    targets = torch.stack(cols, dim=1)
    cont = torch.tensor(continuous)
    zn_train, targets_train = zn[train_idx], targets[train_idx]
    if flipped is not None:
        zn_train = torch.cat([zn_train, (flipped[train_idx].float() - mean) / std])
        targets_train = torch.cat([targets_train, targets_train])
    weight, bias = fit_linear_heads(zn_train, targets_train, cont, steps=steps, lr=lr,
                                    batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                                    progress=progress_enabled(progress if progress is not None else model.progress))

    # held-out numbers
    metrics: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, Any]] = {}
    if n_test:
        logits = zn[test_idx] @ weight.T + bias
        for j, name in enumerate(names):
            y = targets[test_idx, j]
            ok = ~torch.isnan(y)
            if not ok.any():
                continue
            metrics[name] = (_continuous_metrics if cont[j] else _binary_metrics)(logits[ok, j], y[ok])
        for h in heads:
            if h.kind != "categorical" or h.class_index is None:
                continue
            fitted = [i for i, nm in enumerate(h.names) if nm in names]
            if not fitted:
                continue
            truth = h.class_index[test_idx]
            ok = truth >= 0
            if not ok.any():
                continue
            cls_of_head = [h.all_classes.index(h.classes[i]) for i in fitted]
            cols_idx = [names.index(h.names[i]) for i in fitted]
            lg = logits[:, cols_idx]
            best = lg.argmax(1)
            pred = torch.tensor(cls_of_head)[best]
            none = [i for i, c in enumerate(h.all_classes) if c.lower() == "none"]
            if none:  # "none" has no head: predicted when no head fires
                pred = torch.where(lg.max(1).values > 0, pred, torch.tensor(none[0]))
            counts = torch.bincount(truth[ok], minlength=len(h.all_classes))
            groups[h.column] = {"accuracy": float((pred[ok] == truth[ok]).float().mean()),
                                "baseline_accuracy": float(counts.max()) / int(ok.sum()),
                                "classes": len(h.all_classes), "n": int(ok.sum())}

    info: dict[str, dict[str, Any]] = {}
    for name in names:
        h = owner[name]
        entry: dict[str, Any] = {"kind": h.kind, "label": h.column, "source": "fit-attributes",
                                 "n_train": int((~torch.isnan(targets[train_idx, names.index(name)])).sum())}
        if h.kind == "continuous":
            entry.update(target_mean=h.target_mean, target_std=h.target_std,
                         note="regression head on the standardised label; classify() gives sigmoid of it")
        m = metrics.get(name, {})
        for key in ("accuracy", "balanced_accuracy", "auc", "r2"):
            if key in m and not math.isnan(m[key]):
                entry[f"heldout_{key}"] = round(float(m[key]), 4)
        info[name] = entry
    report = AttributeFitReport(names=names, kinds=kinds, weight=weight, bias=bias, codes_mean=mean, codes_std=std,
                                metrics=metrics, groups=groups, n_train=len(train_idx), n_test=n_test, steps=steps,
                                info=info, skipped=skipped, codes_stats_computed=computed)
    if apply:
        report.apply(model)
    return report
