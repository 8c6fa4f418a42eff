"""Model folders: ``config.json`` + ``model.safetensors``, written atomically, read without pickle."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from semdiff.families.base import Family

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelFolderError(ValueError):
    """A model folder is missing files, or its config and weights do not fit together."""


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_model_folder(model: "Family", out_dir: str | os.PathLike, *, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for a family module into ``out_dir``.

    The files are written to a temporary folder beside ``out_dir`` and moved into place, so an
    interrupted save never leaves a half-written model that loads.
    """
    from safetensors.torch import save_file

    from semdiff import __version__

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config = {"semdiff_version": __version__, **model.get_config()}
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "family": model.family_name})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not a semdiff model folder: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or "family" not in config:
        raise ModelFolderError(f"{path} has no 'family' entry; is it a semdiff model folder?")
    return config


def load_model_folder(folder: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None) -> "Family":
    """Build the family module described by ``config.json`` and load ``model.safetensors`` strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from semdiff.families.base import get_family_class

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelFolderError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFolderError(f"{weights} is corrupt or truncated: {err}") from None
    cls = get_family_class(config["family"])
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = _diff_keys(model, state)
    if missing or unexpected:
        raise ModelFolderError(
            f"{weights} does not fit {config['family']} config {folder / CONFIG_NAME}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [(k, tuple(v.shape), tuple(state[k].shape)) for k, v in model.state_dict().items() if v.shape != state[k].shape]
    if wrong:
        k, want, got = wrong[0]
        raise ModelFolderError(f"{weights}: {k} has shape {got}, the config needs {want} ({len(wrong)} mismatched)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelFolderError(f"{weights} contains NaN or infinite values in {bad[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def _diff_keys(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)
