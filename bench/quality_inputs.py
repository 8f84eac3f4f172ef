"""The bench's inputs and its comparisons: real frames in and out, the seeded degradations, the
classical filters a user could run instead, and the task's network alone on each head.

``degrade(name, frames, faces)`` gives the same degraded frames for the same frames (noise is
seeded by the frame's index, a mask by the face's place); ``classical`` is OpenCV's non-local
means, an unsharp mask or Telea given the true mask, at the strengths ``NLM_H`` and
``UNSHARP_SIGMA`` picked on the close-up clip's faces; ``ceiling`` runs the network on an
axis-aligned crop of each head, nothing resampled (``bench.quality`` runs the product itself).
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

SEED = 0


# ---------------------------------------------------------------------------------------------
# frames in and out


def read_clip(path: Path, frames: int):
    """(plan, clean RGB frames, their I420 arrays) of the first ``frames`` frames, read as the
    pipeline reads them (``pipeline.media``: I420, the clip's own YUV matrix)."""
    from pipeline import media

    vplan = media.plan(path)
    n = min(frames, vplan.frames)
    yuvs = [yuv for _, yuv in media.iter_frames(vplan, 0, n)]
    return vplan, [media.i420_to_rgb(y, vplan.yuv_matrix) for y in yuvs], yuvs


def write_clip(dst: Path, vplan, yuvs: list[np.ndarray], rgbs: list[np.ndarray], clean: list[np.ndarray],
               crf: int = 0) -> None:
    """The frames ``rgbs`` as a video with the source's timing and colour description: each is
    written as its source frame (``yuvs``, read as ``clean``) plus the RGB change, through the
    clip's matrix, as the pipeline writes a restored face. CRF 0: lossless."""
    from pipeline import media

    settings = media.EncoderSettings(codec="libx264", crf=crf, preset="ultrafast")
    with media.VideoEncoder(dst, vplan, settings) as enc:
        for i, (yuv, rgb, c) in enumerate(zip(yuvs, rgbs, clean)):
            out = yuv.copy()
            media.add_rgb_delta(out, (0, 0, rgb.shape[1], rgb.shape[0]),
                                rgb.astype(np.float32) - c.astype(np.float32), vplan.yuv_matrix)
            enc.write(i, out)


def read_rgb_clip(path: Path, frames: int) -> list[np.ndarray]:
    return read_clip(path, frames)[1]


def read_photo(path: Path) -> np.ndarray:
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise SystemExit(f"{path}: not a readable image")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def write_photo(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# ---------------------------------------------------------------------------------------------
# degradations (seeded; the same frames give the same degraded frames)


STRAP = 128  # a mask's value under an ear strap (``degrade``)


def straps(mask: np.ndarray, landmarks) -> np.ndarray:
    """The ear straps of one face's drawn mask (bool (H, W)): what an opening with a disc a
    quarter of the eye distance across leaves out (a strap is at most 6 % of it thick), grown by
    a pixel so the body's anti-aliased rim is not counted as strap."""
    pts = np.asarray(landmarks, np.float64).reshape(5, 2)
    k = max(3, int(0.25 * np.linalg.norm(pts[1] - pts[0])) | 1)
    m = mask.astype(np.uint8)
    body = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    body = cv2.dilate(body, np.ones((3, 3), np.uint8))
    return (m > 0) & (body == 0)


def degrade(name: str, frames: list[np.ndarray], faces: list[list], rng_seed: int = SEED):
    """The degraded frames and, for ``mask``, each frame's mask else None: uint8, 255 under a
    face mask's body, ``STRAP`` under its ear straps, 0 elsewhere."""
    from models.training import degrade as D

    out, masks = [], None
    if name == "clean":  # undamaged: what a task does to a face that needs nothing
        out = [f.copy() for f in frames]
    elif name.startswith("noise"):
        out = noisy(frames, float(name[5:]), rng_seed)
    elif name == "mix":  # old footage: upscaled SD, sensor noise, then a video encoder (D.MIX)
        ups = [D.down_up(f, D.MIX["scale"]) for f in frames]
        out = h264(noisy(ups, D.MIX["sigma"], rng_seed), int(D.MIX["crf"]))
    elif name.startswith("jpeg"):
        out = [D.jpeg(f, int(name[4:])) for f in frames]
    elif name.startswith("down"):
        out = [D.down_up(f, float(name[4:])) for f in frames]
    elif name.startswith("blur"):
        s = float(name[4:])
        out = [cv2.GaussianBlur(f, (0, 0), s) for f in frames]
    elif name.startswith("h264crf"):
        out = h264(frames, int(name[7:]))
    elif name == "mask":
        from models.training.evaluate import mask_photo

        masks = []
        for f, fs in zip(frames, faces):
            img, m = f, np.zeros(f.shape[:2], np.float32)
            for k, face in enumerate(sorted(fs, key=lambda x: x.box[0])):
                # the same mask on a face in every frame: seeded by its place, not the frame
                img, a = mask_photo(img, face.landmarks, np.random.default_rng((rng_seed, k)))
                m = np.maximum(m, np.where(straps(a > 0.05, face.landmarks), STRAP, (a > 0.05) * 255.0))
            out.append(img)
            masks.append(m.astype(np.uint8))
    else:
        raise ValueError(f"unknown degradation {name!r}")
    return out, masks


def noisy(frames: list[np.ndarray], sigma: float, rng_seed: int) -> list[np.ndarray]:
    """Gaussian noise of ``sigma`` on each frame, seeded by the frame's index."""
    out = []
    for i, f in enumerate(frames):
        rng = np.random.default_rng((rng_seed, i))
        out.append(np.clip(np.rint(f + rng.normal(0, sigma, f.shape)), 0, 255).astype(np.uint8))
    return out


def h264(frames: list[np.ndarray], crf: int) -> list[np.ndarray]:
    """Frames through a real libx264 encode at ``crf`` (yuv420p, BT.601) and back: a clip as one
    stream, photos of different sizes one by one."""
    if len({f.shape for f in frames}) > 1:
        return [h264([f], crf)[0] for f in frames]
    import av

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        s.options = {"crf": str(crf), "preset": "medium"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: h - h % 2, : w - w % 2]), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    buf.seek(0)
    out = []
    with av.open(buf) as c:
        for frame in c.decode(video=0):
            g = frames[len(out)].copy()
            g[: h - h % 2, : w - w % 2] = frame.to_ndarray(format="rgb24")
            out.append(g)
    return out


# ---------------------------------------------------------------------------------------------
# classical filters and the network alone


def classical(name: str, degradation: str, frames: list[np.ndarray], heads: list[list],
              masks: list[np.ndarray] | None) -> list[np.ndarray]:
    """What a user could run instead, applied around the heads (the filters are local, so the
    heads come out as a whole-frame run would give them)."""
    if name == "none":
        return [f.copy() for f in frames]
    if name == "telea":  # given the whole mask, straps included, wherever they run
        return [cv2.inpaint(np.ascontiguousarray(f), np.ascontiguousarray(m), 3, cv2.INPAINT_TELEA)
                for f, m in zip(frames, masks)]
    out = []
    for i, (f, hs) in enumerate(zip(frames, heads)):
        g = f.copy()
        for x0, y0, x1, y1 in hs:
            p = 24
            X0, Y0 = max(0, x0 - p), max(0, y0 - p)
            X1, Y1 = min(f.shape[1], x1 + p), min(f.shape[0], y1 + p)
            region = f[Y0:Y1, X0:X1]
            if name == "nlmeans":
                h = NLM_H.get(degradation, 10)
                r = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(region), None, h, h, 7, 21)
            elif name == "unsharp":
                s = UNSHARP_SIGMA.get(degradation, 1.5)
                blur = cv2.GaussianBlur(region.astype(np.float32), (0, 0), s)
                r = np.clip(np.rint(region + 1.0 * (region - blur)), 0, 255).astype(np.uint8)
            else:
                raise ValueError(name)
            g[y0:y1, x0:x1] = r[y0 - Y0 : y1 - Y0, x0 - X0 : x1 - X0]
        out.append(g)
    return out


# filter strengths picked per degradation on the closeup clip's faces (the best of h 3..30 and
# sigma 0.7..3): the strongest version of the classical answer, not its default
NLM_H = {"noise10": 11, "noise20": 20, "noise30": 26, "jpeg20": 4, "h264crf40": 4}
UNSHARP_SIGMA = {"down2": 0.7, "down4": 1.5, "blur2": 3.0}


def ceiling(task: str, frames: list[np.ndarray], heads: list[list]) -> list[np.ndarray] | None:
    """The task's network alone on an axis-aligned crop of each head (a margin of 16 px, grown to
    start on the frame's grid of the network's multiple, where codec blocks and an upscale's
    pixel grid start, and reflected to that multiple): no resampling, no blending; the head
    pasted as the network gave it. None for tasks whose network needs an aligned face (unmask)
    or has none."""
    import torch

    import models

    spec = models.resolve(task)
    if not spec.native or spec.weights is None:
        return None

    model = models.load(task)
    m = model.multiple
    out = []
    with torch.inference_mode():
        for f, hs in zip(frames, heads):
            g = f.copy()
            for x0, y0, x1, y1 in hs:
                p = 16
                X0, Y0 = max(0, x0 - p), max(0, y0 - p)
                X0, Y0 = X0 - X0 % m, Y0 - Y0 % m
                X1, Y1 = min(f.shape[1], x1 + p), min(f.shape[0], y1 + p)
                region = f[Y0:Y1, X0:X1]
                h, w = region.shape[:2]
                ph, pw = (-h) % m, (-w) % m
                padded = cv2.copyMakeBorder(region, 0, ph, 0, pw, cv2.BORDER_REFLECT101)
                x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255
                y = model(x)[0].permute(1, 2, 0).numpy() * 255
                r = np.clip(np.rint(y[:h, :w]), 0, 255).astype(np.uint8)
                g[y0:y1, x0:x1] = r[y0 - Y0 : y1 - Y0, x0 - X0 : x1 - X0]
            out.append(g)
    return out
