"""Degradations that make training pairs and evaluation inputs from clean aligned face crops.

Shared by training and evaluation; every function takes a ``numpy.random.Generator`` and is
deterministic given it. Images are RGB uint8 (H, W, 3): a degraded image is rounded and clipped
to [0, 255] like a real decoded frame.

Tasks:
- denoise: 45 %: Gaussian noise (sigma uniform in [0, 50] / 255), sometimes low-frequency chroma
  noise, sometimes JPEG (quality 30-95); 55 %: compression after mild sensor noise (half the
  time, sigma up to 15) or none: JPEG quality 10-60 (20 %) or a real video encoder (35 %,
  ``video_codec``: libx264 CRF 30-45, MPEG-2 or MPEG-4 at quantiser 6-31), its block grid at a
  random offset.
- enhance (alias deblur): downscale x1-x4 (INTER_AREA) and back up (bicubic), sometimes Gaussian
  or motion blur, sometimes JPEG.
- restore: what archive footage has, several at once, in the order they happen to a picture:
  blur (Gaussian or motion) -> downscale x1-x4 and back up -> sensor noise (Gaussian or
  Poisson, sometimes chroma) -> compression (a real video encoder or JPEG at any grid offset).
  Each step is drawn on its own (``restore_chain``), so single degradations and clean crops are
  seen too.
- unmask: a synthetic face mask (surgical, cloth or N95-like; random colours, textures, shading
  and ear straps) drawn over nose and mouth from the crop template's landmarks. The mask is
  returned as well (uint8 0/255, for the Telea baseline and loss weighting); the model never
  sees it. Training may also draw lower-face occluders (``draw_occluder``: flat-coloured polygons
  over mouth and chin, their top anywhere from the nose tip to the lips).

Fixed evaluation degradations (``degrade_eval``): denoise = Gaussian sigma 25/255 only (noise
added in float, clipped to [0, 255], rounded to uint8); enhance = x4 INTER_AREA down then bicubic
up; restore = x2 down-up, Gaussian sigma 10, then libx264 at CRF 32 (``MIX``); unmask = the
training mask generator, seeded per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

ALIASES = {"deblur": "enhance"}
TASKS = ("denoise", "enhance", "restore", "unmask")


@dataclass
class Degraded:
    """A degraded crop and, for unmask, the mask that was drawn (uint8 0/255, (H, W))."""

    image: np.ndarray
    mask: np.ndarray | None = None


def canonical(task: str) -> str:
    """The task name with aliases resolved; ValueError for a task without a degradation."""
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"no degradation for task {task!r}; choose one of {', '.join(TASKS)}")
    return name


# ---------------------------------------------------------------------------------------------
# building blocks


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """i.i.d. Gaussian noise of ``sigma`` (0-255 units) on every pixel and channel."""
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return _u8(img.astype(np.float32) + noise)


def poisson_noise(img: np.ndarray, peak: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise: each channel's value scaled to ``peak`` photons at 255, drawn from a Poisson
    law and scaled back (dark pixels noisier relative to their value, as a sensor is)."""
    scale = np.float32(peak / 255.0)
    counts = rng.poisson(img.astype(np.float32) * scale).astype(np.float32)
    return _u8(counts / scale)


def chroma_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Blotchy colour noise: low-resolution Cb/Cr noise upsampled and added in RGB."""
    h, w = img.shape[:2]
    f = int(rng.integers(2, 5))
    small = rng.standard_normal((max(1, h // f), max(1, w // f), 2), dtype=np.float32) * sigma
    cb, cr = np.moveaxis(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), 2, 0)
    delta = np.stack([1.402 * cr, -0.344 * cb - 0.714 * cr, 1.772 * cb], axis=2)
    return _u8(img.astype(np.float32) + delta)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through OpenCV's JPEG codec at ``quality``."""
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok, "JPEG encoding failed"
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


VIDEO_CODECS = ("libx264", "mpeg2video", "mpeg4")


def video_codec(img: np.ndarray, rng: np.random.Generator, codec: str | None = None,
                quality: float | None = None) -> np.ndarray:
    """``img`` through a real video encoder and decoder (PyAV, one frame, yuv420p): blocks,
    ringing and smeared chroma as archive footage has them. codec: one of ``VIDEO_CODECS``
    (default: drawn); quality: libx264's CRF (default U[30, 45]) or the MPEG encoders' fixed
    quantiser (default U[6, 31]). The image is shifted by a random 0..15 pixels (reflected) before
    encoding, so the block grid lands anywhere on it, as it does on a face cut from a frame."""
    import av

    codec = codec or str(rng.choice(VIDEO_CODECS, p=[0.5, 0.25, 0.25]))
    if quality is None:
        quality = rng.uniform(30, 45) if codec == "libx264" else rng.uniform(6, 31)
    oy, ox = (int(v) for v in rng.integers(0, 16, size=2))
    h, w = img.shape[:2]
    ph, pw = oy + h, ox + w
    ph, pw = ph + (-ph) % 16, pw + (-pw) % 16
    big = cv2.copyMakeBorder(img, oy, ph - h - oy, ox, pw - w - ox, cv2.BORDER_REFLECT101)
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = pw, ph, "yuv420p"
    ctx.time_base = Fraction(1, 25)
    ctx.thread_count = 1
    if codec == "libx264":
        ctx.options = {"crf": f"{quality:.1f}", "preset": "veryfast", "tune": "zerolatency"}
    else:
        q = int(round(quality))
        ctx.options = {"qmin": str(q), "qmax": str(q)}
        ctx.bit_rate = 1
    frame = av.VideoFrame.from_ndarray(big, format="rgb24").reformat(format="yuv420p")
    frame.pts = 0
    packets = list(ctx.encode(frame)) + list(ctx.encode(None))
    dec = av.CodecContext.create({"libx264": "h264"}.get(codec, codec), "r")
    out = None
    for pkt in packets:
        for f in dec.decode(pkt):
            out = f.to_ndarray(format="rgb24")
    for f in dec.decode(None):
        out = f.to_ndarray(format="rgb24")
    if out is None:  # no frame came back: an encoder that gave nothing leaves the image as it was
        return img.copy()
    return np.ascontiguousarray(out[oy : oy + h, ox : ox + w])


def jpeg_anywhere(img: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    """``jpeg`` with its 8 x 8 block grid shifted by a random 0..7 pixels (reflected border), as
    it lands on a face cut from a frame at any offset."""
    oy, ox = (int(v) for v in rng.integers(0, 8, size=2))
    h, w = img.shape[:2]
    big = cv2.copyMakeBorder(img, oy, 0, ox, 0, cv2.BORDER_REFLECT101)
    return np.ascontiguousarray(jpeg(big, quality)[oy : oy + h, ox : ox + w])


def down_up(img: np.ndarray, scale: float) -> np.ndarray:
    """Downscale by ``scale`` with INTER_AREA and back to the original size with bicubic."""
    h, w = img.shape[:2]
    if scale <= 1.0:
        return img.copy()
    small = cv2.resize(img, (max(1, round(w / scale)), max(1, round(h / scale))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def motion_blur(img: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Blur along a line of ``length`` pixels at ``angle`` degrees."""
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = np.cos(np.deg2rad(angle)) * c, np.sin(np.deg2rad(angle)) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))),
             1.0, 1, cv2.LINE_AA)
    k /= k.sum()
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT101)


# ---------------------------------------------------------------------------------------------
# synthetic face masks


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


def apply_mask(img: np.ndarray, rng: np.random.Generator, occluder: bool = False) -> Degraded:
    """``img`` with a random face mask composited over nose and mouth (or, with ``occluder``, a
    lower-face occluder from ``draw_occluder``), and that mask. A crop taller than wide is the
    square template crop with rows below it (the product's unmask crop)."""
    colour, alpha = (draw_occluder if occluder else draw_mask)(img.shape[1], rng, img.shape[0])
    out = img.astype(np.float32) * (1 - alpha[..., None]) + colour * alpha[..., None]
    mask = np.where(alpha > 0.02, 255, 0).astype(np.uint8)
    return Degraded(_u8(out), mask)


# ---------------------------------------------------------------------------------------------
# task degradations

MIX = {"scale": 2.0, "sigma": 10.0, "codec": "libx264", "crf": 32.0}  # restore's fixed evaluation


def mix(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The fixed combined degradation (``MIX``): x2 down-up, Gaussian noise, libx264."""
    out = gaussian_noise(down_up(img, MIX["scale"]), MIX["sigma"], rng)
    return video_codec(out, rng, codec=MIX["codec"], quality=MIX["crf"])


def restore_chain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random archive degradation: each step drawn on its own, in the order they happen."""
    out = img
    r = rng.random()
    if r < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 2.0))
    elif r < 0.4:
        out = motion_blur(out, int(rng.integers(3, 8)), rng.uniform(0, 180))
    if rng.random() < 0.55:
        scale = 2.0 if rng.random() < 0.3 else rng.uniform(1.0, 4.0)
        out = down_up(out, scale)
    r = rng.random()
    if r < 0.45:
        out = gaussian_noise(out, rng.uniform(0, 35), rng)
    elif r < 0.6:
        out = poisson_noise(out, rng.uniform(20, 200), rng)
    if rng.random() < 0.2:
        out = chroma_noise(out, rng.uniform(2, 12), rng)
    r = rng.random()
    if r < 0.5:
        codec = str(rng.choice(VIDEO_CODECS, p=[0.6, 0.2, 0.2]))
        crf = rng.uniform(24, 45) if codec == "libx264" else None  # down to the archive's better encodes
        out = video_codec(out, rng, codec=codec, quality=crf)
    elif r < 0.75:
        out = jpeg_anywhere(out, int(rng.integers(10, 81)), rng)
    return out if out is not img else img.copy()


def degrade(task: str, img: np.ndarray, rng: np.random.Generator) -> Degraded:
    """A random training degradation of the uint8 RGB crop ``img`` for ``task``."""
    task = canonical(task)
    if task == "denoise":
        kind = rng.random()
        if kind < 0.45:  # sensor noise
            out = gaussian_noise(img, rng.uniform(0, 50), rng)
            if rng.random() < 0.25:
                out = chroma_noise(out, rng.uniform(2, 15), rng)
            if rng.random() < 0.25:
                out = jpeg(out, int(rng.integers(30, 96)))
            return Degraded(out)
        out = img  # compression, after some sensor noise or none
        if rng.random() < 0.5:
            out = gaussian_noise(out, rng.uniform(0, 15), rng)
            if rng.random() < 0.25:
                out = chroma_noise(out, rng.uniform(2, 10), rng)
        if kind < 0.65:
            return Degraded(jpeg_anywhere(out, int(rng.integers(10, 61)), rng))
        return Degraded(video_codec(out, rng))
    if task == "enhance":
        out = img
        if rng.random() < 0.25:
            out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.5))
        if rng.random() < 0.15:
            out = motion_blur(out, int(rng.integers(3, 8)), rng.uniform(0, 180))
        scale = 4.0 if rng.random() < 0.4 else rng.uniform(1.0, 4.0)  # x4 is the hard case
        out = down_up(out, scale)
        if rng.random() < 0.25:
            out = jpeg(out, int(rng.integers(30, 96)))
        return Degraded(out)
    if task == "restore":
        return Degraded(restore_chain(img, rng))
    return apply_mask(img, rng)


def degrade_eval(task: str, img: np.ndarray, rng: np.random.Generator) -> Degraded:
    """The fixed evaluation degradation of ``task`` (see the module docstring)."""
    task = canonical(task)
    if task == "denoise":
        return Degraded(gaussian_noise(img, 25.0, rng))
    if task == "enhance":
        return Degraded(down_up(img, 4.0))
    if task == "restore":
        return Degraded(mix(img, rng))
    return apply_mask(img, rng)


def degrade_batch(
    task: str, crops: np.ndarray, seed: int, *, evaluation: bool = False, start: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Degrade each crop of (N, H, W, 3) with its own generator seeded by (seed, start + i), so a
    crop's degradation does not depend on the others. Returns (images, masks or None)."""
    fn = degrade_eval if evaluation else degrade
    outs, masks = [], []
    for i, crop in enumerate(crops):
        d = fn(task, crop, np.random.default_rng([seed, start + i]))
        outs.append(d.image)
        masks.append(d.mask)
    has_mask = masks and masks[0] is not None
    return np.stack(outs), (np.stack(masks) if has_mask else None)
