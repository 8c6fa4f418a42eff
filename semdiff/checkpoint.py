"""Reading official PyTorch / Lightning checkpoints without executing pickled code.

Official ``.ckpt`` files are pickles. A pickle can name any importable callable and call it, so
``torch.load(weights_only=False)`` on a file from the internet runs whatever it says. semdiff reads
them with torch's restricted ``weights_only`` unpickler, which rebuilds only tensors, storages and
plain containers, and admits a short list of known harmless classes that Lightning checkpoints pickle
(its callback objects and ``AttributeDict``). Those are rebuilt as inert stand-ins that only hold
their attributes; nothing of theirs is imported or run. Any other global is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, not what was expected, or unsafe to load."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle refers to code that semdiff will not run."""


class InertObject:
    """Stand-in for an allow-listed class: keeps the pickled state as attributes, runs nothing."""

    def __init__(self, *args, **kwargs):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    def __repr__(self):
        return f"<inert {type(self).__qualname__}>"


class InertDict(dict):
    """Stand-in for dict subclasses such as Lightning's ``AttributeDict``."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


# Classes seen in the released checkpoints of the three families (see ../reference notes).
_ALLOWED_OBJECTS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.progress.TQDMProgressBar",
    "pytorch_lightning.callbacks.progress.tqdm_progress.TQDMProgressBar",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "callbacks.EMAWeightUpdate",  # DiffuseVAE's EMA callback
    "util.EMAWeightUpdate",
    "models.callbacks.EMAWeightUpdate",
    "main.models.callbacks.EMAWeightUpdate",
    "main.SetupCallback",  # LDM / LRDM
    "main.ImageLogger",
    "main.CUDACallback",
]
_ALLOWED_DICTS = [
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "omegaconf.dictconfig.DictConfig",
]


_ALLOWED_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"),
    ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_STUBS: dict[str, type] = {}


def _stub(qualified_name: str, base: type) -> type:
    if qualified_name not in _STUBS:
        module, _, name = qualified_name.rpartition(".")
        _STUBS[qualified_name] = type(name, (base,), {"__module__": f"semdiff.inert.{module}", "__qualname__": name})
    return _STUBS[qualified_name]


class RestrictedUnpickler(pickle.Unpickler):
    """Admits tensor rebuilding, plain containers and inert stand-ins for the allow-listed classes."""

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED_OBJECTS:
            return _stub(qualified, InertObject)
        if qualified in _ALLOWED_DICTS:
            return _stub(qualified, InertDict)
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if (module, name) in _ALLOWED_CALLABLES or (module.startswith("numpy") and name.startswith("dtype")):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load: the pickle calls {qualified}, which semdiff does not execute. "
            "Only tensors, plain containers and known Lightning callback records are read."
        )


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` and ``load``."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def load_checkpoint(path: str | os.PathLike, *, expected: str = "checkpoint") -> dict[str, Any]:
    """Load a torch/Lightning checkpoint safely and return its top-level dict.

    Raises ``CheckpointError`` for a missing, truncated or corrupt file and ``UnsafeCheckpointError``
    when its pickle names a class or function outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{expected} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{expected} {path} is empty")
    if not zipfile.is_zipfile(path) and path.read_bytes()[:1] != b"\x80":
        raise CheckpointError(
            f"{expected} {path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle); "
            "is it truncated or a different file?"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError,
            OSError, AttributeError, TypeError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{expected} {path} is corrupt or truncated: {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{expected} {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def state_dict_of(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, or the dict itself if it is a plain state dict."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} has no tensors under 'state_dict'")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Tensors of a torch/Lightning ``.ckpt`` (read safely, see ``load_checkpoint``) or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"{what} not found: {path}")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{what} {path} is corrupt or truncated: {err}") from None
    return state_dict_of(load_checkpoint(path, expected=what), path)


Shapes = Mapping[str, tuple[int, ...]]


def group_blocks(shapes: Shapes, prefix: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """Group ``prefix<i>.<rest>`` keys by block index i: ``{i: {rest: shape}}`` (for architecture inference)."""
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for k, s in shapes.items():
        m = re.match(re.escape(prefix) + r"(\d+)\.(.*)", k)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(s)
    return out
