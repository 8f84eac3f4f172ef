"""Morph one face into another: a video (or GIF) from two photos, with FaceMath's VAE.

The second photo is first warped so its face lands on the first face (a similarity transform
between the two faces' landmarks). Each output frame ``t`` in [0, 1] is the cross-fade of the two
photos, plus ``decode(lerp(z_a, z_b, t)) - lerp(decode(z_a), decode(z_b), t)``: the change that
interpolating the *codes* makes over interpolating the *pixels* (the face's shape moves instead
of two faces ghosting over each other). That change is warped back onto the face and feathered
like every other paste-back, so the first and last frames are exactly the two photos.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from . import align
from .errors import InputError, OutputError, UnsupportedInput
from .images import _orient, exif_orientation, is_image_path, read_image, to_rgb8
from .media import partial_name

log = logging.getLogger(__name__)

MORPH_EXTS = {".mp4", ".mov", ".mkv", ".gif"}
MAX_SIDE = 1920  # larger first photos are scaled down: a morph is for watching, not archiving


@dataclass
class MorphResult:
    frames: int
    width: int
    height: int


def check_morph(src: Path, to: str | None, dst: Path) -> Path:
    """Validate a morph's inputs and output before any work; returns the ``--to`` path."""
    from .errors import InputNotFound

    if not is_image_path(src):
        raise UnsupportedInput(f"{src}: morph takes two images (this is not an image file)")
    if not to:
        raise InputError(f"{src}: morph needs a second face: --to OTHER.jpg")
    other = Path(to)
    if not other.exists():
        raise InputNotFound(f"{other}: no such file")
    if not is_image_path(other):
        raise UnsupportedInput(f"{other}: morph takes two images (this is not an image file)")
    if dst.suffix.lower() not in MORPH_EXTS:
        raise OutputError(f"{dst}: a morph is written as .mp4, .mov, .mkv or .gif")
    return other


def _upright_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(to_rgb8(np.ascontiguousarray(_orient(read_image(path), exif_orientation(path)))))


def _largest_face(detector, rgb: np.ndarray, path: Path):
    faces = detector.detect_image(rgb)
    if not faces:
        raise InputError(f"{path}: no face found to morph")
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def morph_frames(a: np.ndarray, b: np.ndarray, la: np.ndarray, lb: np.ndarray, fm, frames: int,
                 *, crisp: bool = False):
    """Yield ``frames`` RGB uint8 frames (a's size) morphing image ``a`` into ``b``.

    la, lb: (5, 2) landmarks of the two faces; fm: a ``models.facemath.FaceMath``.
    """
    import torch

    h, w = a.shape[:2]
    to_a, _ = cv2.estimateAffinePartial2D(lb.astype(np.float64), la.astype(np.float64), method=cv2.LMEDS)
    if to_a is None:
        raise InputError("the two faces' landmarks are degenerate; cannot align them")
    b_on_a = cv2.warpAffine(b, to_a, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    lb_on_a = np.hstack([lb, np.ones((5, 1))]) @ to_a.T
    size = 128
    ma = align.estimate_transform(la, size)
    mb = align.estimate_transform(lb_on_a, size)
    crops = np.stack([align.warp_face(a, ma, size), align.warp_face(b_on_a, mb, size)])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255.0).to(fm.device)
    za, zb = fm.encode(x)
    da, db = fm.decode(torch.stack([za, zb]), crisp=crisp)
    ts = np.linspace(0.0, 1.0, frames)
    af, bf = a.astype(np.float32), b_on_a.astype(np.float32)
    for t in ts:
        # the face moves along the landmarks' path as well as the codes'
        m = align.estimate_transform(la * (1 - t) + lb_on_a * t, size)
        frame = af * (1 - t) + bf * t
        if 0.0 < t < 1.0:
            zt = za * (1 - t) + zb * t
            dt = fm.decode(zt[None], crisp=crisp)[0]
            change = (dt - (da * (1 - t) + db * t)) * 255.0
            change = torch.nn.functional.interpolate(change[None], size=(size, size), mode="bilinear",
                                                     align_corners=False)[0]
            delta = change.permute(1, 2, 0).cpu().numpy().astype(np.float32)
            placed = align.warp_delta(delta, m, size, (h, w))
            if placed is not None:
                (x0, y0, x1, y1), d = placed
                frame[y0:y1, x0:x1] += d
        yield np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def write_morph(src: Path, other: Path, dst: Path, *, detector, fm, frames: int = 48, fps: float = 24.0,
                crisp: bool = False, crf: int = 18) -> MorphResult:
    """Morph the largest face of ``src`` into that of ``other``; write ``dst`` (.mp4/.mov/.mkv/.gif)
    under a temporary name, renamed when complete. The output has the first photo's size (its
    long side capped at ``MAX_SIDE``, even sides for video)."""
    if frames < 2:
        raise InputError(f"{src}: a morph needs at least 2 frames (got {frames})")
    a, b = _upright_rgb(src), _upright_rgb(other)
    fa, fb = _largest_face(detector, a, src), _largest_face(detector, b, other)
    la = fa.landmarks
    if max(a.shape[:2]) > MAX_SIDE:
        s = MAX_SIDE / max(a.shape[:2])
        a = cv2.resize(a, (round(a.shape[1] * s), round(a.shape[0] * s)), interpolation=cv2.INTER_AREA)
        la = la * s
    h, w = a.shape[:2]
    if dst.suffix.lower() != ".gif" and (h % 2 or w % 2):  # yuv420p needs even sides
        a = a[: h - h % 2, : w - w % 2]
        h, w = a.shape[:2]
    it = morph_frames(a, b, la, fb.landmarks, fm, frames, crisp=crisp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(dst)
    try:
        if dst.suffix.lower() == ".gif":
            from PIL import Image

            ims = [Image.fromarray(f) for f in it]
            ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:],
                        duration=max(20, int(round(1000 / fps))), loop=0)
        else:
            _write_video(tmp, it, w, h, fps, crf)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return MorphResult(frames, w, h)


def _write_video(path: Path, frames, w: int, h: int, fps: float, crf: int) -> None:
    import av

    rate = Fraction(fps).limit_denominator(1001)
    fmt = {".mov": "mov", ".mkv": "matroska"}.get(path.suffix.lower(), "mp4")
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": str(crf), "preset": "medium"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
