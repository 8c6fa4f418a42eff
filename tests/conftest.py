"""Shared test fixtures. Fixtures live in tests/fixtures so the suite stands alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SEMDIFF_PROGRESS", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
