"""Training checkpoints: safetensors and JSON only, written atomically.

A checkpoint is a folder ``<out>/checkpoints/ckpt-<global step>/`` holding

- ``model.safetensors`` / ``ema.safetensors``: the weights (and buffers) of the model and its EMA;
- ``aux.safetensors``: modules the objective trains but does not export (if any);
- ``optimizer.safetensors``: the optimizer's per-parameter state flattened to
  ``state.<param index>.<name>`` tensors (its param groups go into ``state.json``);
- ``rng-rank<r>.safetensors``: each process's torch RNG states (CPU, and CUDA when used);
- ``state.json``: stage, step, config, param groups, grad-scaler state. Written last.

The folder is assembled under a temporary name and moved into place with one ``os.replace``, so a
process killed at any moment leaves either a complete checkpoint or none; ``latest_checkpoint``
only considers complete folders. No pickle is written or read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_NAME = "state.json"
CKPT_PATTERN = re.compile(r"^ckpt-(\d{9})$")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(_tensors(tensors), str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


# ------------------------------------------------------------------------------------------------
# optimizer state <-> flat tensors


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors, JSON-able rest). Non-tensor per-param values go to the rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------------
# RNG


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in state and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8), device)


# ------------------------------------------------------------------------------------------------
# write / find / read


def tmp_checkpoint_path(out: Path, global_step: int) -> Path:
    return checkpoint_dir(out) / f".tmp-ckpt-{global_step:09d}"


def final_checkpoint_path(out: Path, global_step: int) -> Path:
    return checkpoint_dir(out) / f"ckpt-{global_step:09d}"


def begin_checkpoint(out: Path, global_step: int) -> Path:
    """Create (empty) the temporary folder a checkpoint is assembled in; main process only."""
    tmp = tmp_checkpoint_path(out, global_step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_rng(tmp: Path, rank: int, device: torch.device) -> None:
    path = tmp / f"rng-rank{rank}.safetensors"
    save_tensors(path.with_suffix(".part"), rng_state(device))
    os.replace(path.with_suffix(".part"), path)


def commit_checkpoint(out: Path, tmp: Path, global_step: int, *, model: dict[str, torch.Tensor],
                      ema: dict[str, torch.Tensor], optimizer: dict[str, Any] | None, state: dict[str, Any],
                      keep: int = 2, aux: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the weights and ``state.json`` into ``tmp``, move it into place, prune old checkpoints."""
    save_tensors(tmp / "model.safetensors", model)
    save_tensors(tmp / "ema.safetensors", ema)
    if aux:
        save_tensors(tmp / "aux.safetensors", aux)
    state = dict(state)
    if optimizer is not None:
        tensors, meta = flatten_optimizer_state(optimizer)
        save_tensors(tmp / "optimizer.safetensors", tensors)
        state["optimizer"] = meta
    state["global_step"] = global_step
    with open(tmp / STATE_NAME, "w") as f:
        json.dump(state, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    final = final_checkpoint_path(out, global_step)
    if final.exists():  # the same step written again (e.g. resumed exactly there): replace it
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune_checkpoints(out, keep)
    return final


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    root = checkpoint_dir(out)
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-ckpt-*"):  # left by a killed run
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob("ckpt-*.old"):
        shutil.rmtree(stale, ignore_errors=True)


def read_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    """Everything a checkpoint holds: ``state`` (JSON), ``model``, ``ema``, ``optimizer``, ``rng``."""
    path = Path(path)
    with open(path / STATE_NAME) as f:
        state = json.load(f)
    out: dict[str, Any] = {"state": state, "path": path}
    out["model"] = load_tensors(path / "model.safetensors")
    out["ema"] = load_tensors(path / "ema.safetensors")
    if (path / "optimizer.safetensors").is_file() and "optimizer" in state:
        out["optimizer"] = unflatten_optimizer_state(load_tensors(path / "optimizer.safetensors"), state["optimizer"])
    out["aux"] = load_tensors(path / "aux.safetensors") if (path / "aux.safetensors").is_file() else None
    rng = path / f"rng-rank{rank}.safetensors"
    out["rng"] = load_tensors(rng) if rng.is_file() else None
    return out
