"""facemend models: the restoration and FaceMath networks, their weights and inference engines.

Entry point for the pipeline::

    model = models.load("denoise", device="cpu")
    out = model(crops)          # (B, 3, H, W) float32 in [0, 1] -> same shape, same range

``models`` knows nothing of video: tensors in, tensors out. Importing the package does not
import torch (the CLI lists tasks without it); ``load`` does. Crop data, degradations,
training, evaluation and model cards are research commands in ``models.training``, which
nothing the product runs imports.
"""
from __future__ import annotations

from .tasks import ALIASES, LATENT_TASKS, TASKS, TaskSpec, resolve, task_names

__all__ = ["ALIASES", "LATENT_TASKS", "TASKS", "TaskSpec", "Restorer", "load", "resolve", "task_names"]


def load(task: str, device="cpu", *, half: bool = False, amount: float | None = None,
         sharpen: bool = False, engine: str | None = None):
    """The ``Restorer`` (or FaceMath ``FaceEditor``) for ``task`` on ``device`` (see
    ``models.registry.load``)."""
    from .registry import load as _load

    return _load(task, device, half=half, amount=amount, sharpen=sharpen, engine=engine)


def __getattr__(name: str):
    if name == "Restorer":
        from .registry import Restorer

        return Restorer
    raise AttributeError(f"module 'models' has no attribute {name!r}")
