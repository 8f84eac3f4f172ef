"""Axis-aligned face regions at the frame's own resolution, for networks that work at pixel scale.

Noise, compression blocks and ringing live on the frame's pixel grid. Warping a face into a
template crop (rotated, scaled to a crop size) resamples them into correlated noise the network
never saw, and warping the correction back low-passes it again. A local network is instead given
the face's head region cut straight out of the frame at integer offsets, and its result is
blended back in the same grid: nothing is resampled on the way in or out.

``regions(faces, shape)`` gives the rectangles to restore in one frame: each face's head (the
detector's box grown to take in forehead, hairline, cheeks and jaw) with a margin over which the
result is feathered in, overlapping heads merged into one rectangle (a pixel is restored once),
sides grown to a multiple of the network's stride where the frame allows (and in steps of
``quantum`` so that the crops of one face in consecutive frames share a shape and batch together).
``feather(h, w, ...)`` is the blending weight: 1 inside, falling smoothly to 0 at the sides that
lie inside the frame.

A face's region changes size from frame to frame, so the network is not given the region itself
but a window of the frame around it whose sides are rounded up to a multiple of ``BUCKET``
(``bucket``, ``window``): regions of nearby sizes then share one shape, run in one batch, and an
inference engine sees a handful of input shapes over a whole clip instead of one per region
(every new shape costs it a new plan and memory). Only the region's own pixels of the result
are used: the window just gives the network more of the frame around the head.
"""
from __future__ import annotations

import functools

import numpy as np

Rect = tuple[int, int, int, int]

# the head around a detector box (fractions of its width and height): MTCNN's box runs from the
# brows to the chin and between the cheeks
HEAD_SIDES, HEAD_TOP, HEAD_BOTTOM = 0.22, 0.45, 0.12
FEATHER = 0.08  # the blending ramp, a fraction of the head's shorter side (at least 4 px)
BUCKET = 32  # the network's input sides are multiples of this (``bucket``)


def head_rect(box, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """The head around a detector box (x0, y0, x1, y1), before the feather margin; unclipped."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    return x0 - HEAD_SIDES * w, y0 - HEAD_TOP * h, x1 + HEAD_SIDES * w, y1 + HEAD_BOTTOM * h


def ramp_width(h: float, w: float) -> int:
    return max(4, int(round(FEATHER * min(h, w))))


def regions(boxes, shape: tuple[int, ...], multiple: int = 1, quantum: int = 16) -> list[Rect]:
    """Integer rectangles (x0, y0, x1, y1) inside the frame that hold each head and its feather
    ramp; overlapping ones merged; sides grown (about their centre, within the frame) to a
    multiple of ``quantum`` rounded up to one of ``multiple``, and moved by less than a
    ``multiple`` (the nearer way the frame allows) onto the frame's grid of ``multiple`` px. A
    side longer than the frame's stays the frame's (the caller pads it)."""
    H, W = shape[:2]
    rects = []
    for box in boxes:
        x0, y0, x1, y1 = head_rect(box, shape)
        r = ramp_width(y1 - y0, x1 - x0)
        rects.append([x0 - r, y0 - r, x1 + r, y1 + r])
    rects = _merged(rects)
    step = quantum if quantum % multiple == 0 else np.lcm(quantum, multiple)
    out = []
    for x0, y0, x1, y1 in rects:
        x0, x1 = _span(x0, x1, W, step, multiple)
        y0, y1 = _span(y0, y1, H, step, multiple)
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1, y1))
    # growing can make two rectangles overlap again: merge those (they then keep their union)
    merged = _merged([list(map(float, r)) for r in out])
    return [tuple(int(v) for v in r) for r in merged]


def _merged(rects: list[list[float]]) -> list[list[float]]:
    rects = [r[:] for r in rects]
    changed = True
    while changed:
        changed = False
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                a, b = rects[i], rects[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    rects[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del rects[j]
                    changed = True
                    break
            if changed:
                break
    return rects


def _span(a: float, b: float, limit: int, step: int, grid: int = 1) -> tuple[int, int]:
    """[a, b) as integers inside [0, limit), its length grown to a multiple of ``step`` about its
    centre where the frame allows (shifted inward at the frame's edges), then moved to start on
    a multiple of ``grid`` where the frame allows. Codec and JPEG blocks and the pixel grid of an
    upscaled frame all start at the frame's corner, as they did at the corner of each training
    crop, so a window cut on that grid shows the network the damage in the phase it learned
    (enhance on x4 down-up footage, ``bench.quality``: +0.06 to +0.51 dB per source)."""
    a, b = max(0, int(np.floor(a))), min(limit, int(np.ceil(b)))
    if b <= a:
        return a, a
    want = min(limit, -(-(b - a) // step) * step)
    grow = want - (b - a)
    a -= grow // 2
    b += grow - grow // 2
    if a < 0:
        b, a = b - a, 0
    if b > limit:
        a, b = max(0, a - (b - limit)), limit
    off = a % grid
    for move in sorted((-off, grid - off), key=abs) if off else ():
        if 0 <= a + move and b + move <= limit:
            return a + move, b + move
    return a, b


def feather(h: int, w: int, rect: Rect, shape: tuple[int, ...]) -> np.ndarray:
    """Blending weight for a (h, w) region at ``rect``: 1 inside, a smooth ramp to 0 over
    ``ramp_width`` px at each side that lies inside the frame (a side on the frame's edge stays 1:
    nothing lies beyond it). float32 (h, w)."""
    H, W = shape[:2]
    x0, y0, x1, y1 = rect
    r = ramp_width(h, w)
    wy = _ramp(h, r, y0 > 0, y1 < H)
    wx = _ramp(w, r, x0 > 0, x1 < W)
    return np.outer(wy, wx)


@functools.lru_cache(maxsize=64)
def _ramp(n: int, r: int, lo: bool, hi: bool) -> np.ndarray:
    """1-D weight of length n: a raised-cosine ramp of r px from 0 at each end flagged."""
    w = np.ones(n, np.float32)
    r = min(r, n // 2)
    if r > 0:
        t = (np.arange(r, dtype=np.float32) + 0.5) / r
        up = (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)
        if lo:
            w[:r] = up
        if hi:
            w[n - r:] = up[::-1]
    w.setflags(write=False)
    return w


def bucket(n: int, step: int = BUCKET, multiple: int = 1) -> int:
    """``n`` rounded up to a multiple of ``step`` (itself rounded up to one of ``multiple``)."""
    step = step if step % multiple == 0 else int(np.lcm(step, multiple))
    return -(-n // step) * step


def window(rect: Rect, shape: tuple[int, ...], size: tuple[int, int], phase: int = 1) -> Rect:
    """The frame's window of ``size`` (h, w) that holds ``rect``: centred on it, shifted to stay
    inside the frame, and where the frame allows placed so that the region's offset in it is a
    multiple of ``phase`` (the network's stride: the region then sees the network's grid as it
    would cut alone). A side longer than the frame's is the frame's (the caller pads it)."""
    H, W = shape[:2]
    x0, y0, x1, y1 = rect
    wx0, wx1 = _place(x0, x1, size[1], W, phase)
    wy0, wy1 = _place(y0, y1, size[0], H, phase)
    return wx0, wy0, wx1, wy1


def _place(a: int, b: int, n: int, limit: int, phase: int) -> tuple[int, int]:
    """[s, s + n) holding [a, b) inside [0, limit), as centred on it as it can be."""
    if n >= limit:
        return 0, limit
    lo, hi = max(0, b - n), min(a, limit - n)  # starts that hold [a, b) inside the frame
    if lo > hi:  # [a, b) is longer than n: cannot happen for a bucketed size
        raise ValueError(f"a window of {n} cannot hold [{a}, {b})")
    centred = min(max(a - (n - (b - a)) // 2, lo), hi)
    down = centred - (centred - a) % phase  # the nearest starts whose offset is a multiple of phase
    best = min((s for s in (down, down + phase) if lo <= s <= hi), key=lambda s: abs(s - centred), default=centred)
    return best, best + n
