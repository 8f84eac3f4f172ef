"""Paths of distributed jobs: absolute, and inside the allowed storage roots when configured.

A path is judged by where it really is: symlinks are followed (``Path.resolve``), so a link
inside the shared storage that points out of it is refused like the path it points to. Workers
check again, on their own machine, each path they are about to open or write (plan, segment,
chunk: every file of a folder, join: the parts and the output, the preview sheet).
"""
from __future__ import annotations

from pathlib import Path

from .errors import OutputOutsideStorage, OutsideStorage
from .settings import Settings


def _outside(path: Path, settings: Settings) -> str:
    """"" when ``path`` resolves inside a storage root (or none is set), else the refusal."""
    roots = [Path(r).resolve() for r in settings.storage_roots]
    if not roots:
        return ""
    real = Path(path).absolute().resolve()
    if any(real.is_relative_to(r) for r in roots):
        return ""
    where = "" if real == Path(path).absolute() else f" (it resolves to {real})"
    return (f"{path}: outside the shared storage{where} "
            f"(FACEMEND_STORAGE_ROOTS={':'.join(settings.storage_roots)})")


def check_input(path: Path, settings: Settings) -> None:
    """Raise OutsideStorage (exit 3) when ``path`` lies outside every storage root."""
    error = _outside(path, settings)
    if error:
        raise OutsideStorage(error)


def check_output(path: Path, settings: Settings) -> None:
    """Raise OutputOutsideStorage (exit 4) when ``path`` lies outside every storage root."""
    error = _outside(path, settings)
    if error:
        raise OutputOutsideStorage(error)


def check_roots(src: Path, dst: Path, settings: Settings) -> None:
    """Raise when ``src`` or ``dst`` lies outside every FACEMEND_STORAGE_ROOTS folder."""
    check_input(src, settings)
    check_output(dst, settings)


def check_options(opts, dst: Path, settings: Settings) -> None:
    """The other files a job opens: morph's ``--to`` image and the ``--preview`` sheet."""
    if opts.to:
        check_input(Path(opts.to), settings)
    if opts.preview:
        check_output(Path(opts.preview), settings)
