"""Paths of distributed jobs: absolute, and inside the allowed storage roots when configured."""
from __future__ import annotations

from pathlib import Path

from .errors import OutputOutsideStorage, OutsideStorage
from .settings import Settings


def check_roots(src: Path, dst: Path, settings: Settings) -> None:
    """Raise when ``src`` or ``dst`` lies outside every FACEMEND_STORAGE_ROOTS folder."""
    roots = [Path(r).resolve() for r in settings.storage_roots]
    if not roots:
        return
    names = ":".join(settings.storage_roots)
    if not any(src.resolve().is_relative_to(r) for r in roots):
        raise OutsideStorage(f"{src}: outside the shared storage (FACEMEND_STORAGE_ROOTS={names})")
    if not any(dst.resolve().is_relative_to(r) for r in roots):
        raise OutputOutsideStorage(f"{dst}: outside the shared storage (FACEMEND_STORAGE_ROOTS={names})")
