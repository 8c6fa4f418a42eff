"""Shared test fixtures. Fixtures live in tests/fixtures so the suite stands alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SEMDIFF_PROGRESS", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for a test, then restore. The tiny networks of the suite gain nothing from
    threads, on a busy machine OpenMP's spinning threads make them many times slower, and bitwise
    comparisons need one thread count. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    yield from _torch_threads(1)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """``one_thread`` for a whole module, so that its module-scoped fixtures run on one thread too."""
    yield from _torch_threads(1)
