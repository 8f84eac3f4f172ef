"""A face restored from several crops of it (``TaskSpec.zooms``): the views merged into one.

Each view is the face cropped at another zoom about the same centre and restored on its own;
their results are resampled into the first view's crop and averaged there, so a face is pasted
once however many views it has. The mean of several guesses beats any one of them.

A replacing task (unmask) guesses where the mask is as well as what lies under it, and its
views do not always agree: on a small or turned face one view paints the mask over and another
leaves it as it was. A plain mean then leaves the mask at a third or two thirds of its contrast,
a ghost over the painted face. Its views are therefore weighted, pixel by pixel, by how much
each changed its crop (``change_weight``): where every view painted, the result is about their
mean; where one painted and another did not, the one that painted counts most; where none
changed anything, it is the crop as it was (``bench.quality``, walking_1080p with masks: 24.51 dB
over the heads, 23.85 with a plain mean). In a video, the merged face is then steadied along
its track (``TrackSteady``).
"""
from __future__ import annotations

import cv2
import numpy as np

from .align import _compose

CHANGE_FLOOR = 4.0  # change_weight: levels every view gets, so a pixel none changed is their mean
CHANGE_BLUR = 5  # change_weight: the box over which a view's change is averaged (crop pixels)


def change_weight(restored: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """How much a view changed its crop: the largest change over the channels, averaged over a
    ``CHANGE_BLUR`` box (a painted area, not single pixels), plus ``CHANGE_FLOOR``. (h, S)
    float32, in levels."""
    change = np.abs(np.asarray(restored, np.float32) - crop.astype(np.float32)).max(axis=-1)
    return cv2.blur(change, (CHANGE_BLUR, CHANGE_BLUR)) + CHANGE_FLOOR


def merge_views(matrix: np.ndarray, restored: np.ndarray, views: list[tuple[np.ndarray, np.ndarray]],
                weights: list[np.ndarray] | None = None) -> np.ndarray:
    """The mean of a face's restorations from several crops of it, in the frame of the first:
    ``restored`` (h, S, C) float32 is the crop ``matrix`` makes (frame -> crop), ``views`` the
    (matrix, restored crop) of the others, each resampled (bicubic) into that crop. A pixel is
    the mean over the views that cover it; the crop's own always does. ``weights``: one (h, S)
    map per view, the first's and then the others' in their own crops (``change_weight``): a
    weighted mean instead."""
    height, size = restored.shape[:2]
    w0 = np.ones((height, size), np.float32) if weights is None else np.asarray(weights[0], np.float32)
    total = restored.astype(np.float32) * w0[..., None]  # a copy
    count = w0.copy()
    inv = cv2.invertAffineTransform(matrix)  # this crop -> frame
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP  # sample a view at to_view(pixel)
    for k, (m, rest) in enumerate(views):
        to_view = _compose(m, inv)  # this crop -> the view's crop
        w = np.ones(rest.shape[:2], np.float32) if weights is None else np.asarray(weights[k + 1], np.float32)
        total += cv2.warpAffine(np.asarray(rest, np.float32) * w[..., None], to_view, (size, height), flags=flags,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        count += cv2.warpAffine(w, to_view, (size, height), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=0)
    # bicubic weights can undershoot at a view's edge: a pixel is never divided by less than
    # a small part of the first view's own weight
    return total / np.maximum(count, 0.01 * w0)[..., None]


STEADY = 0.7  # TrackSteady: how much of the previous frame's crop a still pixel keeps
STEADY_LEVELS = 10.0  # the change (0..255 levels, locally averaged) at which a pixel keeps 1/e of that


def steady_blend(cur: np.ndarray, old: np.ndarray, keep: float, levels: float = STEADY_LEVELS) -> np.ndarray:
    """``cur`` blended with the previous frame's ``old`` (same pixels, float32 (h, w, 3)) where
    the two agree: a motion-adaptive recursive filter, as video denoisers use. A pixel keeps
    ``keep`` of ``old`` where their mean channel difference, averaged over 5 x 5 px, is 0, and
    less as it grows (1/e of that at ``levels``): where the face moved or the mouth opened,
    ``cur`` stays as it is."""
    diff = cv2.blur(cv2.transform(cv2.absdiff(old, cur), np.full((1, 3), 1 / 3, np.float32)), (5, 5))
    w = keep * np.exp(-((diff / levels) ** 2))
    return cur + w[..., None] * (old - cur)


LOCAL_STEADY = 0.6  # RegionSteady: how much of the previous frame's output a still pixel keeps


class RegionSteady:
    """A local network's region (video) blended with the previous frame's output where the two
    agree. A network restores each frame alone, so what it leaves of the noise changes from
    frame to frame and a face shimmers more than the clean clip does. The previous frame's
    output is moved with the face before it is compared: by the region's track's box centre
    against the last frame's, to the nearest pixel, or by a pixel more or less either way, or
    not at all (a still face's tracked box jitters by a pixel), whichever matches this frame's
    output best; then blended in where the two differ by little (``steady_blend``: a
    motion-compensated recursive filter, as video denoisers use). Where they differ (the mouth
    opened, another face) this frame's output is kept as it is. A new instance forgets the
    previous frame."""

    def __init__(self, keep: float = LOCAL_STEADY) -> None:
        self.keep = keep
        self._last = self._now = None  # (frame, [(rect, output)], {track: box centre})

    def __call__(self, frame: int, rect, rest: np.ndarray, track: int = -1, faces=()) -> np.ndarray:
        """``rest``: the output (float32 (h, w, 3)) of ``rect`` (x0, y0, x1, y1) in video frame
        ``frame``; ``track``: the region's face's track; ``faces``: the frame's faces."""
        centres = {f.track: (f.box[:2] + f.box[2:4]) / 2 for f in faces if f.track >= 0}
        if self._now is None or self._now[0] != frame:  # a new frame: the current one is done
            self._last, self._now = self._now, (frame, [], centres)
        last = self._last if self._last is not None and self._last[0] == frame - 1 else None
        if last is not None:
            rest = rest.copy()
            dx, dy = (tuple(int(v) for v in np.rint(centres[track] - last[2][track]))
                      if track in centres and track in last[2] else (0, 0))
            shifts = dict.fromkeys([(0, 0)] + [(dx + i, dy + j) for j in (-1, 0, 1) for i in (-1, 0, 1)])
            shift = min(shifts, key=lambda m: _mismatch(_pieces(last[1], rect, m), rest))
            for (sy, sx), old in _pieces(last[1], rect, shift):
                rest[sy, sx] = steady_blend(rest[sy, sx], old, self.keep)
        self._now[1].append((rect, rest))
        return rest


def _pieces(previous: list, rect, shift: tuple[int, int]):
    """(slices of ``rect``, the previous output there) for each of ``previous``'s (rect, output)
    regions overlapping ``rect`` once moved by ``shift`` (dx, dy)."""
    x0, y0, x1, y1 = rect
    for (a0, b0, a1, b1), prev in previous:
        a0, b0, a1, b1 = a0 + shift[0], b0 + shift[1], a1 + shift[0], b1 + shift[1]
        ox0, oy0, ox1, oy1 = max(x0, a0), max(y0, b0), min(x1, a1), min(y1, b1)
        if ox1 > ox0 and oy1 > oy0:
            yield (slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0)), prev[oy0 - b0 : oy1 - b0, ox0 - a0 : ox1 - a0]


def _mismatch(pieces, rest: np.ndarray) -> float:
    """Mean absolute difference between ``rest`` and the previous output over ``pieces``."""
    total, count = 0.0, 0
    for (sy, sx), old in pieces:
        total += float(np.abs(rest[sy, sx] - old).sum())
        count += old.size
    return total / count if count else np.inf


class TrackSteady:
    """A replacing task's face (video) blended with its track's result on the previous frame
    where the two agree. Each frame's paint is the network's guess alone, and what it guesses
    under a mask changes from frame to frame: the painted mouth and chin shimmer. The previous
    frame's merged crop is resampled into this frame's crop (the two crops' matrices) and
    blended in where the two differ by little (``steady_blend``, keeping up to ``STEADY``, as
    ``RegionSteady`` does for local tasks); where they differ this frame's is kept."""

    def __init__(self) -> None:
        self._prev: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # track: (frame, matrix, crop)

    def __call__(self, track: int, frame: int, matrix: np.ndarray, rest: np.ndarray) -> np.ndarray:
        prev = self._prev.get(track)
        if prev is not None and prev[0] == frame - 1:
            height, size = rest.shape[:2]
            to_prev = _compose(prev[1], cv2.invertAffineTransform(matrix))  # this crop -> the last
            old = cv2.warpAffine(prev[2], to_prev, (size, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_REPLICATE)
            rest = steady_blend(np.asarray(rest, np.float32), old, STEADY)
        if track >= 0:
            self._prev[track] = (frame, matrix, rest)
        for t in [t for t, v in self._prev.items() if v[0] < frame - 1]:
            del self._prev[t]
        return rest
