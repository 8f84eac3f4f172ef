"""The restoration tasks facemend knows and ``load(task)``, the one way to get a model."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .tasks import TaskSpec, resolve

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class Restorer(nn.Module):
    """A task's network with its spec: ``forward`` maps (B, 3, H, W) [0, 1] crops to the same."""

    def __init__(self, spec: TaskSpec, net: nn.Module | None, run=None) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        # the inference engine's callable for ``net`` (models.export.runner); None: torch
        self.run = run

    @property
    def engine(self) -> str:
        """The inference engine running the network: torch, onnxruntime or openvino."""
        from .export import engine_of

        return engine_of(self.run)

    @property
    def precision(self) -> str:
        """What the engine computes in on CPU: f32, bf16 (OpenVINO on a bf16 CPU) or int8
        (OpenVINO with the network's int8 plan elsewhere)."""
        from .export import precision_of

        return precision_of(self.run)

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is not None:
            return self.run(x)
        p = next(self.net.parameters(), None)
        if p is not None and x.dtype != p.dtype:  # fp16 crops into an fp32 network (or back): run in its dtype
            return self.net(x.to(p.dtype)).to(x.dtype)
        return self.net(x)

    @property
    def task(self) -> str:
        return self.spec.name

    @property
    def multiple(self) -> int:
        """Crop sides must be multiples of this (the network's total stride)."""
        return int(getattr(self.net, "multiple", 1)) if self.net is not None else 1

    def forward(self, x: torch.Tensor, mirror: bool | None = None) -> torch.Tensor:
        """mirror: average with the mirrored crop's output (default: the task's ``spec.mirror``)."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(x.shape)}"
        if self.net is None:
            return x
        if self.spec.mirror if mirror is None else mirror:  # one call on crops and mirror images
            y = self._net(torch.cat([x, x.flip(-1)]))
            return (0.5 * (y[: len(x)] + y[len(x):].flip(-1))).clamp_(0.0, 1.0)
        return self._net(x).clamp_(0.0, 1.0)


def load(task: str, device: str | torch.device = "cpu", *, half: bool = False,
         amount: float | None = None, sharpen: bool = False, engine: str | None = None):
    """The model for ``task`` on ``device``, in eval mode, weights from safetensors.

    engine: how a restoration network runs (``models.export``): torch, onnxruntime, openvino
    or auto (default: ``$FACEMEND_ENGINE``, else auto: on CPU the fastest installed engine, on
    CUDA torch, in fp16 with ``half``). An engine that cannot run falls back to torch with one
    warning.

    Restoration tasks give a ``Restorer``; FaceMath tasks (age, gender, morph) a
    ``models.facemath.FaceEditor`` with the same calling convention, editing by ``amount``
    (default: the task's) and unsharp-masking the decoder's output when ``sharpen``.
    Raises ValueError for an unknown task and FileNotFoundError when the task's shipped weights
    are missing from models/weights.
    """
    spec = resolve(task)
    if spec.latent:
        from .facemath import load_editor

        return load_editor(spec.name, device, amount=amount, sharpen=sharpen).eval()
    if spec.weights is None:
        return Restorer(spec, None).eval()
    from .nets import load_net  # the networks module is only needed for learned tasks

    path = WEIGHTS_DIR / spec.weights
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights for task {spec.name!r} are missing")
    from .export import runner, weights_hash
    from .quantize import load_plan

    net = load_net(path, device=device)
    # bf16 where the engine and CPU have it: within 0.01 dB of fp32 (models.training.parity);
    # else the network's int8 plan where it ships one: within 0.05 dB (models.training.quantize)

    run = runner(net, spec.name, engine, device, torch.zeros(1, 3, spec.size, spec.size), bf16=True,
                 int8=lambda: load_plan(path, weights_hash(net)))
    model = Restorer(spec, net, run).eval().to(device)
    if half and run is None:  # an engine's runner takes and gives the crops' dtype itself
        model = model.half()
    return model
