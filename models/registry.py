"""The restoration tasks facemend knows and ``load(task)``, the one way to get a model."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class TaskSpec:
    """How a task's network is run by the pipeline.

    size: the crop size the network was trained on. native: True when the network may run on
    crops at the face's own resolution (denoising is local: noise lives at pixel scale), False
    when it must see faces at ``size`` (deblur, unmask: their degradations are face-relative);
    the pipeline then upsamples the network's change to the face's size.
    """

    name: str
    description: str
    native: bool
    size: int = 128
    weights: str | None = None  # file name in models/weights, None for identity


TASKS: dict[str, TaskSpec] = {
    "identity": TaskSpec("identity", "restores nothing (a test vehicle: output equals input)", True),
    "denoise": TaskSpec("denoise", "removes sensor noise, chroma noise and JPEG artefacts", True,
                        weights="denoise.safetensors"),
    "enhance": TaskSpec("enhance", "sharpens blurred and low-resolution faces (up to x4)", False,
                        weights="enhance.safetensors"),
    "unmask": TaskSpec("unmask", "removes a face mask covering nose and mouth", False,
                       weights="unmask.safetensors"),
}
ALIASES = {"deblur": "enhance"}


def task_names() -> list[str]:
    """Task names accepted by ``load`` (aliases included)."""
    return sorted(TASKS) + sorted(ALIASES)


def resolve(task: str) -> TaskSpec:
    """The TaskSpec of ``task`` or an alias of it; ValueError naming the choices otherwise."""
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(task_names())}")
    return TASKS[name]


class Restorer(nn.Module):
    """A task's network with its spec: ``forward`` maps (B, 3, H, W) [0, 1] crops to the same."""

    def __init__(self, spec: TaskSpec, net: nn.Module | None) -> None:
        super().__init__()
        self.spec = spec
        self.net = net

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def multiple(self) -> int:
        """Crop sides must be multiples of this (the network's total stride)."""
        return int(getattr(self.net, "multiple", 1)) if self.net is not None else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(x.shape)}"
        if self.net is None:
            return x
        return self.net(x).clamp_(0.0, 1.0)


def load(task: str, device: str | torch.device = "cpu", *, half: bool = False) -> Restorer:
    """The restoration model for ``task`` on ``device``, in eval mode, weights from safetensors.

    Raises ValueError for an unknown task and FileNotFoundError when the task's shipped weights
    are missing from models/weights.
    """
    spec = resolve(task)
    if spec.weights is None:
        return Restorer(spec, None).eval()
    from .nets import load_net  # the networks module is only needed for learned tasks

    path = WEIGHTS_DIR / spec.weights
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights for task {spec.name!r} are missing")
    net = load_net(path, device=device)
    model = Restorer(spec, net).eval().to(device)
    if half:
        model = model.half()
    return model
