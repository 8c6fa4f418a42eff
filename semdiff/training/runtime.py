"""Where the training loop runs: one plain process, or many through Hugging Face ``accelerate``.

The trainer talks only to a :class:`Runtime`: device, rank, world size, ``prepare`` (wrap for
data-parallel), ``backward``, ``clip_grad_norm``, ``autocast``, ``barrier``. Multi-GPU and multi-node
training is ``accelerate launch -m semdiff train ...``; semdiff has no distributed code of its own.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterable

import torch
from torch import nn

MIXED_PRECISION = ("no", "bf16", "fp16")


def accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


class Runtime:
    """Single process; autocast and a grad scaler on the GPU."""

    name = "single"

    def __init__(self, device: str | None = None, mixed_precision: str = "no"):
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.mixed_precision = _check_precision(mixed_precision, self.device)
        self.rank = 0
        self.world_size = 1
        self.scaler = None
        if self.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        return module.to(self.device), optimizer

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float, optimizer) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def barrier(self) -> None:
        pass

    def mean(self, value: float) -> float:
        return value

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def raw_optimizer(self, optimizer):
        return optimizer


class AccelerateRuntime(Runtime):
    """Data-parallel training through ``accelerate.Accelerator`` (DDP on CPU or GPU, any node count)."""

    name = "accelerate"

    def __init__(self, device: str | None = None, mixed_precision: str = "no"):
        from accelerate import Accelerator

        cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        self.device = self.accelerator.device
        self.mixed_precision = mixed_precision
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.scaler = None

    def prepare(self, module, optimizer):
        return self.accelerator.prepare(module, optimizer)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params, max_norm, optimizer):
        return self.accelerator.clip_grad_norm_(list(params), max_norm)

    def step(self, optimizer):
        optimizer.step()

    def scaler_state(self):
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state):
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)

    def barrier(self):
        self.accelerator.wait_for_everyone()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def unwrap(self, module):
        return self.accelerator.unwrap_model(module)

    def raw_optimizer(self, optimizer):
        return getattr(optimizer, "optimizer", optimizer)


def _check_precision(mixed_precision: str, device: torch.device) -> str:
    if mixed_precision == "no":
        return "no"
    if device.type == "cpu":
        if mixed_precision == "fp16":
            raise ValueError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 or no on the CPU")
        warnings.warn("bf16 autocast on the CPU is usually slower than float32", stacklevel=3)
    if device.type == "cuda" and mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; use --mixed-precision fp16")
    return mixed_precision


def make_runtime(distributed: str = "auto", device: str | None = None, mixed_precision: str = "no") -> Runtime:
    """``"none"``: one plain process. ``"accelerate"``: always through accelerate. ``"auto"``: accelerate
    when the process was started by a multi-process launcher (``accelerate launch``, ``torchrun``)."""
    if distributed not in ("auto", "accelerate", "none"):
        raise ValueError(f"distributed must be auto, accelerate or none, got {distributed!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed == "none":
        if launched:
            raise ValueError("this process was started by a multi-process launcher but distributed='none'")
        return Runtime(device, mixed_precision)
    if distributed == "accelerate" or launched:
        if not accelerate_available():
            raise ImportError("multi-process training needs accelerate: pip install 'semdiff[train]'")
        return AccelerateRuntime(device, mixed_precision)
    return Runtime(device, mixed_precision)
