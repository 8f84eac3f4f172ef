"""Synthetic face masks and lower-face occluders, drawn from the crop template's landmarks.

``draw_mask``: a surgical, cloth or N95-like mask (random colours, textures, shading and ear
straps) over nose and mouth; ``draw_occluder``: a flat-coloured polygon over mouth and chin,
its top anywhere from the nose tip to the lips. Both return the colour and the alpha to composite
(``models.training.degrade.apply_mask`` does it) and take a ``numpy.random.Generator``, so a
mask is fixed by its seed. A crop taller than wide is the square template crop with rows below
it (the product's unmask crop); the mask keeps its shape there and its lower edge comes into view.
"""
from __future__ import annotations

import cv2
import numpy as np


def _template(size: int) -> np.ndarray:
    from pipeline.align import template

    return template(size)


def _texture(size: int, rng: np.random.Generator, height: int | None = None) -> np.ndarray:
    """A (height, size) float32 multiplicative texture around 1: plain, stripes, checks, dots or
    fabric noise."""
    height = height or size
    kind = rng.choice(["plain", "stripes", "checks", "dots", "fabric"], p=[0.35, 0.2, 0.15, 0.1, 0.2])
    yy, xx = np.mgrid[0:height, 0:size].astype(np.float32)
    amp = rng.uniform(0.08, 0.35)
    if kind == "plain":
        return np.ones((height, size), np.float32)
    if kind in ("stripes", "checks"):
        period = rng.uniform(4, 16) * size / 128
        a = rng.uniform(0, np.pi)
        t = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
        if kind == "checks":
            t = np.sign(t) * np.sign(np.sin(2 * np.pi * (-xx * np.sin(a) + yy * np.cos(a)) / period))
        return (1 + amp * np.sign(t) * rng.choice([-1, 1])).astype(np.float32)
    if kind == "dots":
        period = rng.uniform(6, 14) * size / 128
        d = np.hypot((xx % period) - period / 2, (yy % period) - period / 2)
        return (1 - amp * (d < period * rng.uniform(0.15, 0.35))).astype(np.float32)
    n = rng.standard_normal((height, size)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), rng.uniform(0.5, 1.5))
    return (1 + amp * 0.6 * n / (n.std() + 1e-6)).astype(np.float32)


def _colour(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A mask colour (RGB float 0-255) typical of ``kind``."""
    if kind == "surgical":
        palette = [(150, 200, 230), (120, 180, 220), (235, 240, 245), (160, 210, 190),
                   (40, 40, 45), (240, 190, 210), (200, 200, 205)]
    elif kind == "n95":
        palette = [(235, 235, 230), (245, 245, 240), (210, 210, 205), (60, 60, 65),
                   (200, 190, 170)]
    else:
        palette = None
    if palette is None or rng.random() < 0.15:
        return rng.uniform(10, 250, size=3).astype(np.float32)
    c = np.array(palette[rng.integers(len(palette))], np.float32)
    return np.clip(c + rng.normal(0, 10, size=3), 0, 255).astype(np.float32)


def _outline(kind: str, t: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Polygon (K, 2) of the mask's outline in crop pixels, from template landmarks ``t``."""
    eye_l, eye_r, nose, m_l, m_r = t
    ed = np.linalg.norm(eye_r - eye_l)
    cx = (eye_l[0] + eye_r[0]) / 2 + rng.normal(0, 0.02) * ed
    eye_y = (eye_l[1] + eye_r[1]) / 2
    mouth_y = (m_l[1] + m_r[1]) / 2
    top = eye_y + (nose[1] - eye_y) * rng.uniform(0.35, 0.6)  # nose bridge
    bottom = mouth_y + (mouth_y - eye_y) * rng.uniform(0.5, 0.75)  # under the chin
    half = ed * rng.uniform(0.9, 1.1)  # cheek to cheek
    side_top = top + (nose[1] - top) * rng.uniform(0.3, 0.8)
    if kind == "surgical":  # trapezoid-ish with pleated, nearly straight edges
        pts = [(cx - half * 0.95, side_top), (cx - half * 0.3, top + ed * 0.05), (cx, top),
               (cx + half * 0.3, top + ed * 0.05), (cx + half * 0.95, side_top),
               (cx + half, mouth_y + ed * 0.1), (cx + half * 0.7, bottom - ed * 0.08),
               (cx, bottom), (cx - half * 0.7, bottom - ed * 0.08), (cx - half, mouth_y + ed * 0.1)]
    elif kind == "n95":  # rounded cup
        cy = (top + bottom) / 2 + ed * 0.05
        ry = (bottom - top) / 2
        ang = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = [(cx + half * 0.92 * np.cos(a), cy + ry * np.sin(a) * (1.0 if np.sin(a) > 0 else 1.05))
               for a in ang]
    else:  # cloth: curved sides, rounder chin
        ang = np.linspace(0, np.pi, 14)
        chin = [(cx + half * np.cos(a), mouth_y + ed * 0.05 + (bottom - mouth_y - ed * 0.05) * np.sin(a))
                for a in ang]
        pts = [(cx - half, side_top), (cx - half * 0.45, top + ed * 0.08), (cx, top),
               (cx + half * 0.45, top + ed * 0.08), (cx + half, side_top)] + chin
    pts = np.array(pts, np.float64)
    # small rotation and shift: landmark noise and head pose at inference time
    pts = _rotate(pts, rng.normal(0, 4), np.array([cx, (top + bottom) / 2]))
    return pts + rng.normal(0, 0.02 * ed, size=2)


def _rotate(pts: np.ndarray, degrees: float, centre: np.ndarray) -> np.ndarray:
    """Points (K, 2) turned by ``degrees`` about ``centre``."""
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (pts - centre) @ rot.T + centre


def draw_mask(size: int, rng: np.random.Generator, height: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random face mask for a ``size`` crop: (colour (H, W, 3) float32 0-255, alpha (H, W)
    float32 0-1). Drawn at 4x and area-downsampled for anti-aliased edges. ``height`` (default
    ``size``): a taller crop, the square template crop and rows below it; the same seed draws
    the same mask shape, now with its lower edge and what lies under it in view."""
    height = height or size
    kind = str(rng.choice(["surgical", "cloth", "n95"], p=[0.4, 0.35, 0.25]))
    t = _template(size)
    up = 4
    poly = _outline(kind, t, size, rng)
    big = np.zeros((height * up, size * up), np.uint8)
    cv2.fillPoly(big, [np.round(poly * up).astype(np.int32)], 255, cv2.LINE_AA)
    # ear straps: from the mask's upper and lower side corners to the crop's side edges
    ed = np.linalg.norm(t[1] - t[0])
    thick = max(1, int(round(rng.uniform(0.025, 0.06) * ed * up)))
    left, right = poly[:, 0].argmin(), poly[:, 0].argmax()
    for side, idx, edge in ((-1, left, -0.02 * size), (1, right, 1.02 * size)):
        x0, y0 = poly[idx]
        ear_y = t[0][1] + rng.uniform(-0.1, 0.25) * ed
        for dy in (rng.uniform(-0.25, -0.05) * ed, rng.uniform(0.15, 0.4) * ed):
            p0 = (int(round(x0 * up)), int(round((y0 + dy) * up)))
            p1 = (int(round(edge * up)), int(round((ear_y + dy * rng.uniform(0.5, 2.0)) * up)))
            cv2.line(big, p0, p1, 255, thick, cv2.LINE_AA)
    alpha = cv2.resize(big, (size, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0

    base = _colour(kind, rng)
    tex = _texture(size, rng, height)
    yy, xx = np.mgrid[0:height, 0:size].astype(np.float32) / size
    # shading: a light direction across the mask plus darker rim toward the edges
    lx, ly = rng.normal(0, 0.6, size=2)
    shade = 1 + 0.35 * (lx * (xx - 0.5) + ly * (yy - 0.75))
    soft = cv2.GaussianBlur(alpha, (0, 0), size / 24)
    shade *= 0.75 + 0.25 * np.clip(soft * 1.6, 0, 1)
    if kind == "surgical":  # pleats: three soft horizontal folds
        top, bottom = poly[:, 1].min(), poly[:, 1].max()
        for k in range(3):
            y = (top + (bottom - top) * (0.3 + 0.17 * k) + rng.normal(0, 1)) / size
            shade -= 0.12 * np.exp(-((yy - y) * size / 1.2) ** 2)
    elif kind == "cloth":  # centre seam
        cx = poly[:, 0].mean() / size
        shade -= 0.12 * np.exp(-((xx - cx) * size / 1.0) ** 2)
    elif kind == "n95" and rng.random() < 0.35:  # exhalation valve
        c = (poly[:, 0].mean() + rng.uniform(0.25, 0.4) * ed, poly[:, 1].mean() + 0.1 * ed)
        r = rng.uniform(0.16, 0.24) * ed
        valve = ((xx * size - c[0]) ** 2 + (yy * size - c[1]) ** 2) < r * r
        shade = np.where(valve, shade * rng.uniform(0.5, 0.8), shade)
    colour = base[None, None, :] * (shade * tex)[..., None]
    colour += rng.normal(0, rng.uniform(1, 5), size=colour.shape).astype(np.float32)
    return np.clip(colour, 0, 255).astype(np.float32), alpha


def draw_occluder(size: int, rng: np.random.Generator, height: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A lower-face occluder for a ``size`` crop, as ``draw_mask`` returns it: a polygon over
    mouth and chin whose top edge lies anywhere from the nose tip to the lips (a mask worn under
    the nose, a censor patch, a hand or a scarf), filled with a flat random colour, plain or
    lightly shaded, with hard or anti-aliased edges, seldom with straps. The training
    generator's masks all reach the nose bridge, and a network trained on them alone paints such
    low patches poorly (``python -m models.training.train --occluders P``). A network trained on
    128 px crops only leaves a mask's band under the chin of the product's 128 x 160 crop, so
    unmask trains on both crop shapes (``--square 0.5``)."""
    height = height or size
    t = _template(size)
    eye_l, eye_r, nose, m_l, m_r = t
    ed = np.linalg.norm(eye_r - eye_l)
    mouth_y = (m_l[1] + m_r[1]) / 2
    cx = (eye_l[0] + eye_r[0]) / 2 + rng.normal(0, 0.1) * ed
    top = nose[1] + (mouth_y - nose[1]) * rng.uniform(-0.3, 1.0)
    bottom = mouth_y + ed * rng.uniform(0.45, 0.85)
    mid = top + (bottom - top) * rng.uniform(0.3, 0.6)
    tilt = rng.normal(0, 0.05) * ed
    w_top, w_mid = ed * rng.uniform(0.5, 1.0), ed * rng.uniform(0.6, 1.1)
    w_bot = ed * rng.uniform(0.15, 0.6)
    w_mid = max(w_mid, w_top)
    pts = np.array([(cx - w_top, top - tilt), (cx + w_top, top + tilt), (cx + w_mid, mid),
                    (cx + w_bot, bottom), (cx - w_bot, bottom), (cx - w_mid, mid)], np.float64)
    pts += rng.normal(0, 0.04 * ed, size=pts.shape)
    pts = _rotate(pts, rng.normal(0, 5), pts.mean(0))
    hard = rng.random() < 0.5
    up = 1 if hard else 4
    big = np.zeros((height * up, size * up), np.uint8)
    cv2.fillPoly(big, [np.round(pts * up).astype(np.int32)], 255, cv2.LINE_8 if hard else cv2.LINE_AA)
    if rng.random() < 0.2:  # straps to the crop's sides
        thick = max(1, int(round(rng.uniform(0.025, 0.06) * ed * up)))
        for x0, y0, edge in ((pts[5][0], pts[5][1], -0.02 * size), (pts[2][0], pts[2][1], 1.02 * size)):
            p1 = (int(round(edge * up)), int(round((eye_l[1] + rng.uniform(0, 0.3) * ed) * up)))
            cv2.line(big, (int(round(x0 * up)), int(round(y0 * up))), p1, 255, thick, cv2.LINE_AA)
    alpha = (cv2.resize(big, (size, height), interpolation=cv2.INTER_AREA) if up > 1 else big)
    alpha = alpha.astype(np.float32) / 255.0
    base = rng.uniform(10, 250, size=3).astype(np.float32)
    if rng.random() < 0.5:
        colour = np.broadcast_to(base, (height, size, 3)).copy()
    else:  # lightly shaded and textured
        yy, xx = np.mgrid[0:height, 0:size].astype(np.float32) / size
        lx, ly = rng.normal(0, 0.4, size=2)
        shade = (1 + 0.25 * (lx * (xx - 0.5) + ly * (yy - 0.75))) * _texture(size, rng, height)
        colour = base[None, None, :] * shade[..., None]
        colour += rng.normal(0, rng.uniform(0.5, 3), size=colour.shape).astype(np.float32)
    return np.clip(colour, 0, 255).astype(np.float32), alpha
