"""facemend models: restoration networks, degradations, training and evaluation.

Entry point for the pipeline::

    model = models.load("denoise", device="cpu")
    out = model(crops)          # (B, 3, H, W) float32 in [0, 1] -> same shape, same range

``models`` knows nothing of video: tensors in, tensors out.
"""
from __future__ import annotations

from .registry import TASKS, Restorer, load, task_names

__all__ = ["TASKS", "Restorer", "load", "task_names"]
