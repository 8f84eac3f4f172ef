"""The tasks facemend knows, without importing torch (the CLI parses arguments with these)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """How a task's network is run by the pipeline.

    size: the crop size the network was trained on. native: True when the network runs on each
    head cut straight out of the frame at the frame's own resolution (``pipeline.regions``):
    noise, compression artefacts, blur and the softness of an upscaled frame live on the frame's
    pixel grid, and a crop resampled to a template size would change them into something the
    network never saw (``bench/quality.py`` compares the two geometries on real clips). False
    when the network must see the face aligned to its ``size`` template (unmask paints a mouth
    where the template puts it; FaceMath edits).
    replaces: True when the network paints new content over part of the face (unmask): the
    pipeline then blends the restored pixels themselves in where the network changed the crop,
    instead of adding the upsampled change, which would leave the mask's fine texture and edges
    on faces larger than the crop (``pipeline.align.warp_replace``). Such faces are partly covered,
    so the pipeline also finds them with ``FaceDetector.MASKED`` (MTCNN scores covered faces low).
    below: rows of context added under the square template crop (a multiple of the network's
    stride; non-native tasks). The 128 px template ends at the chin, and a face mask reaches
    under it: unmask runs on a crop 160 rows tall, so the mask's lower edge is inside the crop and
    painted over instead of being left as a band under the chin. The network is fully
    convolutional and is trained on both shapes (``models.training.train --square``). ``rows_below`` is
    what the pipeline adds.
    aside: columns added on each side of the square template crop (non-native tasks; with the
    width a multiple of the network's stride). The 128 px template ends at the cheeks, and a
    mask's ear straps run past it to the ears: unmask runs on a 160 x 160 crop, so the straps lie
    inside it, where the network paints them over, and not under the crop's feathered border.
    The network is fully convolutional; the square template sits in the middle of the crop.
    ``cols_aside`` is what the pipeline adds.
    steady: a native task's output in a video is steadied over time (``FaceRestorer._steady``):
    for networks that remove damage drawn anew in every frame (noise), whose leftovers would
    otherwise shimmer. A network whose input does not flicker (blur, low resolution) gains
    nothing from it and loses detail where the face moves, so it is off there. A replacing
    task's paint is steadied along each face's track instead (``pipeline.views.TrackSteady``):
    what it guesses under a mask changes from frame to frame.
    mirror: the network's output is averaged with its output on the mirrored crop, mirrored back
    (a flip self-ensemble: the aligned template is left-right symmetric, and a local window
    flipped keeps its sides on the frame's 8 px grid). For unmask, whose network guesses what the
    mask hides, this is worth its twice the network's cost; a guessed mouth also comes out
    symmetric. For enhance, which guesses detail the blur removed, too (``bench.quality``:
    +0.17 dB on x4 down-up, +0.37 on blur); denoise and restore gain under 0.07 dB from it.
    zooms: the scales at which the pipeline crops and restores each face (a scale self-ensemble):
    1 is the aligned crop, 1.1 a crop showing the face 1/1.1 times as large about the same
    centre. The other crops' restorations are resampled into the first crop and averaged there
    (``pipeline.views``; for a replacing task weighted by how much each view changed its crop,
    so a view that painted a mask over outvotes one that left it), so a face is pasted once. One
    zoom alone is no better than the aligned crop: the gain is the mean of different guesses. The mirror and the zooms
    together are six network passes per face; ``FaceRestorer(ensemble=False)`` (the CLI's
    ``--fast``) runs one (``docs/models.md`` has the figures).
    """

    name: str
    description: str
    native: bool
    size: int = 128
    weights: str | None = None  # file name in models/weights, None for identity
    latent: bool = False  # a FaceMath edit of the VAE's code (models.facemath), not a restoration
    default_amount: float = 0.0  # latent edits: the --amount used when none is given
    replaces: bool = False
    steady: bool = False
    below: int = 0
    aside: int = 0
    mirror: bool = False
    zooms: tuple[float, ...] = (1.0,)
    sizes: tuple[int, ...] = ()  # a replacing task's template sides, one chosen per face by its size

    @property
    def cols_aside(self) -> int:
        """Columns the pipeline adds on each side of the square crop: ``aside`` for replacing
        tasks that run at the network's size, 0 otherwise."""
        return self.aside if self.replaces and not self.native else 0

    @property
    def rows_below(self) -> int:
        """Rows the pipeline adds under the square crop: ``below`` for replacing tasks that run
        at the network's size, 0 otherwise."""
        return self.below if self.replaces and not self.native else 0


TASKS: dict[str, TaskSpec] = {
    "identity": TaskSpec("identity", "restores nothing (a test vehicle: output equals input)", True),
    "denoise": TaskSpec("denoise", "removes sensor noise, chroma noise, JPEG and video codec artefacts", True,
                        weights="denoise.safetensors", steady=True),
    "enhance": TaskSpec("enhance", "sharpens blurred and low-resolution faces (up to x4)", True,
                        weights="enhance.safetensors", mirror=True),
    "restore": TaskSpec("restore", "repairs old footage: codec blocks and ringing, noise, softness"
                        " and upscaling blur, together (blind)", True, weights="restore.safetensors",
                        steady=True),
    "unmask": TaskSpec("unmask", "removes a face mask covering nose and mouth", False,
                       weights="unmask.safetensors", replaces=True, below=32, aside=16, mirror=True,
                       zooms=(1.0, 0.9, 1.1), steady=True),
    "age": TaskSpec("age", "ages (--amount +N years) or rejuvenates (-N) faces (FaceMath)", False,
                    weights="facemath.safetensors", latent=True, default_amount=30.0),
    "gender": TaskSpec("gender", "adds (--amount > 0) or removes (< 0) female-typical features"
                       " (FaceMath)", False, weights="facemath.safetensors", latent=True,
                       default_amount=1.0),
    "morph": TaskSpec("morph", "a video or GIF morphing the input image's face into --to's (FaceMath)",
                      False, weights="facemath.safetensors", latent=True),
}
ALIASES = {"deblur": "enhance"}
LATENT_TASKS = tuple(name for name, spec in TASKS.items() if spec.latent)


def task_names() -> list[str]:
    """Task names accepted by ``load`` (aliases included)."""
    return sorted(TASKS) + sorted(ALIASES)


def resolve(task: str) -> TaskSpec:
    """The TaskSpec of ``task`` or an alias of it; ValueError naming the choices otherwise."""
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(task_names())}")
    return TASKS[name]
