"""Training batches of the restoration networks: augmented crops, a random patch, degraded on
the fly, and the alignment faults a real face brings (``jitter_alignment``, ``photo_edge``).
"""
from __future__ import annotations

import cv2
import numpy as np

from . import data as D
from .degrade import apply_mask, degrade, down_up, motion_blur


class Batches:
    """Random training batches: augmented crops, a random patch, degraded on the fly."""

    def __init__(self, task: str, crops: np.ndarray, patch: int, batch: int, seed: int,
                 jitter: float = 0.0, clean: float = 0.0, occluders: float = 0.0,
                 square: float = 0.0, edge: float = 0.0, soft: float = 0.0,
                 scale: tuple[float, float] | None = None, small: float = 0.0,
                 sizes: tuple[int, ...] = ()) -> None:
        self.task, self.crops, self.patch, self.batch = task, crops, patch, batch
        self.sizes = tuple(sizes)  # each batch's crops area-shrunk to one of these widths
        self.jitter, self.clean, self.occluders, self.square = jitter, clean, occluders, square
        self.edge, self.soft, self.scale, self.small = edge, soft, scale, small
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        clean, bad, masks = [], [], []
        height, size = self.crops.shape[1:3]
        if self.square and height > size and self.rng.random() < self.square:
            height = size  # this batch sees the square crop only (a batch has one shape)
        width = int(self.rng.choice(self.sizes)) if self.sizes else size
        for _ in range(self.batch):
            crop = np.asarray(self.crops[self.rng.integers(len(self.crops))])[:height]
            if width < size:  # the face at a lower resolution, as the crop of a smaller face
                crop = cv2.resize(crop, (width, round(height * width / size)), interpolation=cv2.INTER_AREA)
                crop = crop[: max(width, len(crop) // 32 * 32)]  # rows: a multiple of the stride
            crop = D.augment(crop, self.rng)
            if self.scale:
                crop = rescale(crop, self.rng.uniform(*np.log(self.scale)), self.patch)
            h, w = crop.shape[:2]
            if self.patch < min(h, w):  # offsets on the 8-pixel JPEG/x4 grid
                y, x = self.rng.integers(0, (np.array([h, w]) - self.patch) // 8 + 1) * 8
                crop = np.ascontiguousarray(crop[y : y + self.patch, x : x + self.patch])
            if self.soft and self.task == "unmask" and self.rng.random() < self.soft:
                crop = soften(crop, self.rng)  # the face as video shows it; the mask drawn sharp on it
            if self.occluders and self.task == "unmask" and self.rng.random() < self.occluders:
                d = apply_mask(crop, self.rng, occluder=True)
            else:
                d = degrade(self.task, crop, self.rng)
            image, mask = d.image, d.mask
            if self.clean and self.rng.random() < self.clean:  # an undamaged (unmasked) face stays as it is
                image, mask = crop, None if mask is None else np.zeros_like(mask)
            if self.small and self.task == "unmask" and self.rng.random() < self.small:
                crop, image, mask = soften_together(self.rng, crop, image, mask)  # a small face, mask and all
            if self.jitter and self.rng.random() < self.jitter:
                crop, image, mask = jitter_alignment(crop, image, mask, self.rng)
            if self.edge and self.rng.random() < self.edge:
                crop, image, mask = photo_edge(crop, image, mask, self.rng)
            clean.append(crop)
            bad.append(image)
            masks.append(mask)
        m = np.stack(masks) if masks[0] is not None else None
        return np.stack(clean), np.stack(bad), m


def rescale(crop: np.ndarray, log_factor: float, patch: int) -> np.ndarray:
    """The face at another size, as video shows faces from 40 to 500 px wide and the pipeline
    restores a local task's face at its own scale: ``crop`` resized by exp(``log_factor``)
    (area filter down, bicubic up), never below ``patch`` pixels on its shorter side. The
    degradation is drawn afterwards, at the new scale."""
    h, w = crop.shape[:2]
    f = max(float(np.exp(log_factor)), patch / min(h, w))
    size = (max(patch, round(w * f)), max(patch, round(h * f)))
    return cv2.resize(crop, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)


SOFT = {"scale": (1.5, 4.0), "blur": 0.5, "length": (3, 9)}  # soften: down-up range, P(motion blur), px


def soften(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A face as a video shows a small or moving one: area-down by a random factor in
    ``SOFT["scale"]`` and bicubic back up (a 40-80 px face the pipeline enlarges to its 128 px
    crop), and with probability ``SOFT["blur"]`` a motion blur along a random direction. Unmask
    trains on such faces as targets, so that it paints a face of the same softness rather than
    leaving the mask on faces softer than the sharp photos it learnt from."""
    return soften_together(rng, crop)[0]


def soften_together(rng: np.random.Generator, *images: np.ndarray | None) -> list[np.ndarray | None]:
    """``soften`` with one draw applied to each of ``images`` (None stays None): a face, the same
    face with a mask drawn on it and the mask's alpha, softened as a small face in a video frame
    is with whatever covers it, so the mask's edges and straps are as soft as the face."""
    scale = float(rng.uniform(*SOFT["scale"]))
    blur = None
    if rng.random() < SOFT["blur"]:
        lo, hi = SOFT["length"]
        blur = (int(rng.integers(lo, hi + 1)), float(rng.uniform(0.0, 180.0)))
    out = []
    for img in images:
        if img is not None:
            img = down_up(img, scale)
            img = np.ascontiguousarray(img if blur is None else motion_blur(img, *blur))
        out.append(img)
    return out


JITTER = {"degrees": 10.0, "scale": 0.1, "shift": 0.05}  # uniform +-; shift as a crop fraction


def jitter_alignment(
    clean: np.ndarray, bad: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One random similarity transform applied to the clean crop, its degraded copy and the mask
    alike: the face *and what degrades it* move together off the template, as they do at work
    when landmarks are off (MTCNN's landmarks on a masked face miss by 0.2-0.3 eye distances).
    Unmask trains with it so the network finds a mask that is not where the template puts it.
    A taller crop turns about the centre of its square template crop, as a square one does."""
    height, size = clean.shape[:2]
    angle = rng.uniform(-JITTER["degrees"], JITTER["degrees"])
    scale = 1.0 + rng.uniform(-JITTER["scale"], JITTER["scale"])
    dx, dy = rng.uniform(-JITTER["shift"], JITTER["shift"], size=2) * size
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += (dx, dy)

    def warp(img: np.ndarray) -> np.ndarray:  # reflected borders, as the crop cache has them
        return cv2.warpAffine(img, m, (size, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT101)

    return warp(clean), warp(bad), None if mask is None else warp(mask)


EDGE_FROM = 0.75  # photo_edge: the photo's last row lies in [EDGE_FROM * width, height)


def photo_edge(
    clean: np.ndarray, bad: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The crop of a face at the photo's bottom edge, as the product makes it: the photo ends at a
    random row under the mouth and ``warp_face`` fills the crop below it by reflection
    (BORDER_REFLECT101). The mask is on the photo, so it is reflected too: under the chin the
    network sees the mask again, mirrored, where training crops (masked after cropping) never
    showed it. Close-cropped portraits and ID photos are like this, and so are whole UTKFace
    photos: the photo's last row falls at crop rows 123-141 of 160 for most of them.
    The rows from ``r`` down are OpenCV's reflection of those above, in the clean crop, the
    masked crop and the mask alike."""
    height, size = clean.shape[:2]
    r = int(rng.integers(int(EDGE_FROM * size), height))

    def cut(a: np.ndarray) -> np.ndarray:
        return cv2.copyMakeBorder(a[:r], 0, height - r, 0, 0, cv2.BORDER_REFLECT_101)

    return cut(clean), cut(bad), None if mask is None else cut(mask)


class Subset:
    """Rows ``idx`` of a (memory-mapped) array, read lazily."""

    def __init__(self, arr: np.ndarray, idx: list[int]) -> None:
        self.arr, self.idx = arr, np.asarray(idx)
        self.shape = (len(idx),) + arr.shape[1:]

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arr[self.idx[i]]
