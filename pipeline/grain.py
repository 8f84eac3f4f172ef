"""Grain for painted pixels: the fine texture of the skin around an area a network painted at a
lower resolution than the frame's (unmask's 128 px crop on a larger face).
"""
from __future__ import annotations

import cv2
import numpy as np

from .align import _compose

GRAIN_BAND = 1.0  # px (frame): grain is matched in luma minus its Gaussian blur of this sigma
GRAIN_SIZE = 0.6  # px (frame): the grain's own correlation (sensor noise after demosaicing and a codec)
GRAIN_QUANTILE = 0.25  # of the local energy (``_grain_level``)
GRAIN_RING = 0.15  # the skin around the painted area, in widths of that area (square root of its pixels)


def _luma(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _band(y: np.ndarray) -> np.ndarray:
    return y - cv2.GaussianBlur(y, (0, 0), GRAIN_BAND)


def _grain_level(band: np.ndarray, where: np.ndarray) -> float:
    """The texture level of the smoother part of ``where``: a low quantile (``GRAIN_QUANTILE``)
    of the band's local energy (its square averaged over 5 x 5 px), so that the edges of eyes,
    nostrils, lips and hair in a face do not count as grain."""
    local = cv2.blur(band * band, (5, 5))
    return float(np.quantile(local[where], GRAIN_QUANTILE))


def matched_grain(painted: np.ndarray, region: np.ndarray, weight: np.ndarray, to_rect: np.ndarray,
                  crop_shape: tuple[int, int], seed: int) -> np.ndarray | None:
    """Luma grain that gives the painted area the fine texture of the skin around it, or None
    when it already has as much.

    A network that paints at 128 px leaves a large face's painted area smoother than the rest
    of the frame: the sensor noise, film grain and pores around it stop at the paint's edge.
    Grain is matched as compositors match it: the high band of luma (``GRAIN_BAND``) of the
    unpainted skin in a ring around the paint against the painted area's, each at the level of
    its smoother parts (``_grain_level``), and the part of the difference the enlargement lost
    (1 - 1/scale^2 of it; none when the crop is as large as the face) is added as Gaussian
    grain. The grain is drawn in the crop's coordinates at the frame's resolution from ``seed``
    (a face track's number), so it moves with the face from frame to frame as skin texture does
    instead of flickering. It is grain, not structure: it puts back the texture's level, not the
    mouth's detail.
    painted, region: (h, w, 3) float32, the restored crop warped into the frame rectangle and
    the frame's pixels there; weight: (h, w) the paint's weight there; to_rect: the crop ->
    rectangle map; crop_shape: (height, width) of the crop. Returns (h, w) float32 levels."""
    paint = weight > 0.5
    n = int(paint.sum())
    if n < 64:
        return None
    k = max(3, int(GRAIN_RING * np.sqrt(n)) | 1)
    ring = (cv2.dilate(paint.astype(np.uint8), np.ones((k, k), np.uint8)) > 0) & (weight < 0.02)
    if ring.sum() < 64:
        return None
    scale = float(np.sqrt(abs(np.linalg.det(to_rect[:, :2]))))  # frame px per crop px
    if scale <= 1.0:  # the crop has the face's pixels: the network painted its own texture
        return None
    want = _grain_level(_band(_luma(region)), ring)
    have = _grain_level(_band(_luma(painted)), paint)
    # enlarged ``scale`` times, the paint lacks the part of the band above the crop's own
    # resolution: 1 - 1/scale^2 of a white spectrum (3/4 at 2x)
    add = (want - have) * (1.0 - 1.0 / scale**2)
    if add <= 0.25:  # as much already, or under half a level of grain to add
        return None
    up = max(1, int(np.ceil(scale)))
    height, width = crop_shape
    grain = np.random.default_rng(seed & 0x7FFFFFFF).standard_normal((height * up, width * up)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), GRAIN_SIZE * up / scale)
    to_grain = _compose(to_rect, np.array([[1 / up, 0, 0], [0, 1 / up, 0]], np.float64))
    grain = cv2.warpAffine(grain, to_grain, weight.shape[::-1], flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
    level = _grain_level(_band(grain), paint)
    if level <= 0:
        return None
    return grain * np.float32(np.sqrt(add / level)) * weight
