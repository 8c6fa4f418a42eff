"""Small helpers used across the package."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled(flag: bool | None) -> bool:
    """Progress bars are on unless ``flag`` is False or ``SEMDIFF_PROGRESS=0`` is set."""
    if flag is not None:
        return flag
    return os.environ.get("SEMDIFF_PROGRESS", "1") not in ("0", "false", "False", "")


def progress_bar(iterable: Iterable[T], *, total: int | None = None, enabled: bool = True, desc: str = "") -> Iterator[T]:
    """A tqdm bar when enabled, otherwise the plain iterable."""
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))
