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
  and ear straps, ``models.training.masks``) drawn over nose and mouth from the crop template's
  landmarks. The mask is returned as well (uint8 0/255, for the Telea baseline and loss
  weighting); the model never sees it. Training may also draw lower-face occluders
  (``draw_occluder``: flat-coloured polygons over mouth and chin, their top anywhere from the
  nose tip to the lips).

Fixed evaluation degradations (``degrade_eval``): denoise = one of Gaussian sigma 25/255 (noise
added in float, clipped to [0, 255], rounded to uint8), JPEG q20 or libx264 at CRF 40, drawn in
equal shares per crop (the damage it is trained to remove); enhance = x4 INTER_AREA down then bicubic
up; restore = x2 down-up, Gaussian sigma 10, then libx264 at CRF 32 (``MIX``); unmask = the
training mask generator, seeded per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from .masks import draw_mask, draw_occluder

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
    if task == "denoise":  # sensor noise, JPEG and H.264 in equal shares
        kind = rng.random()
        if kind < 1 / 3:
            return Degraded(gaussian_noise(img, 25.0, rng))
        if kind < 2 / 3:
            return Degraded(jpeg(img, 20))
        return Degraded(video_codec(img, rng, codec="libx264", quality=40.0))
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
