"""How the bench scores an output: face PSNR/SSIM over each head against the clean frames,
PSNR outside the heads against the degraded input, flicker inside the heads, PSNR inside a mask.

A head is the detector's box grown by ``HEAD`` (fractions of its width and height: sides, top,
bottom): forehead to chin, cheek to cheek, what a viewer looks at.
"""
from __future__ import annotations

import cv2
import numpy as np

HEAD = (0.12, 0.35, 0.05)  # the detector's box grown by these fractions: sides, top, bottom


def head_box(face, shape) -> tuple[int, int, int, int]:
    """The head a viewer sees (forehead to chin, cheek to cheek) from a detector box."""
    x0, y0, x1, y1 = (float(v) for v in face.box)
    w, h = x1 - x0, y1 - y0
    sx, st, sb = HEAD
    H, W = shape[:2]
    return (int(max(0, np.floor(x0 - sx * w))), int(max(0, np.floor(y0 - st * h))),
            int(min(W, np.ceil(x1 + sx * w))), int(min(H, np.ceil(y1 + sb * h))))


def write_areas(task: str, frames: list[np.ndarray], faces: list[list], slack: int = 16) -> list[list] | None:
    """For a task run on heads cut from the frame (``TaskSpec.native``): per frame, the
    rectangles ``pipeline.regions`` lets the product change, grown by ``slack`` pixels (the
    product detects on the degraded frame, so its boxes differ a little from the bench's). None
    for other tasks (their paste follows the aligned crop)."""
    import models
    from pipeline import regions

    if not models.resolve(task).native:
        return None
    return [[(x0 - slack, y0 - slack, x1 + slack, y1 + slack)
             for x0, y0, x1, y1 in regions.regions([f.box for f in fs], img.shape, 16)]
            for img, fs in zip(frames, faces)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse < 1e-10 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    import torch
    from pytorch_msssim import ssim as _ssim

    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float()
    win = 11 if min(a.shape[:2]) > 11 else max(3, (min(a.shape[:2]) - 1) | 1 - 2)
    return float(_ssim(ta, tb, data_range=255, win_size=win))


def score(out: list[np.ndarray], clean: list[np.ndarray], heads: list[list],
          given: list[np.ndarray] | None = None, video: bool = True, areas: list[list] | None = None) -> dict:
    """Face PSNR/SSIM (mean over every head in every frame) against ``clean``; PSNR outside the
    heads against ``given`` (the degraded input), outside ``areas`` (per frame, the rectangles the
    product may write) when given, else outside each head grown by a third; flicker inside the heads (out's mean absolute
    frame-to-frame change over the clean clip's; 1 is the clean clip's)."""
    ps, ss = [], []
    for o, c, hs in zip(out, clean, heads):
        for x0, y0, x1, y1 in hs:
            ps.append(psnr(o[y0:y1, x0:x1], c[y0:y1, x0:x1]))
            ss.append(ssim(o[y0:y1, x0:x1], c[y0:y1, x0:x1]))
    r = {"psnr": round(float(np.mean(ps)), 2) if ps else None,
         "ssim": round(float(np.mean(ss)), 4) if ss else None, "faces": len(ps)}
    if given is not None:
        err, n = 0.0, 0
        for i, (o, g, hs) in enumerate(zip(out, given, heads)):
            keep = np.ones(o.shape[:2], bool)
            if areas is not None:  # where the product may write, from the bench's own detection
                for x0, y0, x1, y1 in areas[i]:
                    keep[max(0, y0) : y1, max(0, x0) : x1] = False
            else:
                for x0, y0, x1, y1 in hs:  # a margin for the feathered paste around each head
                    mx, my = (x1 - x0) // 3, (y1 - y0) // 3
                    keep[max(0, y0 - my) : y1 + my, max(0, x0 - mx) : x1 + mx] = False
            d = (o[keep].astype(np.float64) - g[keep]) ** 2
            err, n = err + d.sum(), n + d.size
        r["outside_psnr"] = 99.0 if n == 0 or err / n < 1e-10 else round(float(10 * np.log10(255.0**2 / (err / n))), 2)
    if video and len(out) > 1:
        r["flicker"] = round(flicker(out, heads) / max(flicker(clean, heads), 1e-6), 3)
    return r


def flicker(frames: list[np.ndarray], heads: list[list]) -> float:
    """Mean absolute change from the previous frame inside each frame's heads."""
    vals = []
    for t in range(1, len(frames)):
        for x0, y0, x1, y1 in heads[t]:
            a = frames[t][y0:y1, x0:x1].astype(np.float32)
            b = frames[t - 1][y0:y1, x0:x1].astype(np.float32)
            vals.append(float(np.abs(a - b).mean()))
    return float(np.mean(vals)) if vals else 0.0


def mask_psnr(frames, clean, masks, value: int | None = None) -> float:
    """PSNR over the masks' pixels (``value``: only those of that value, e.g. the straps)."""
    err = n = 0.0
    for f, c, m in zip(frames, clean, masks):
        inside = m > 0 if value is None else m == value
        err += float(((f[inside].astype(np.float64) - c[inside]) ** 2).sum())
        n += int(inside.sum()) * 3
    return round(float(10 * np.log10(255.0**2 / max(err / max(n, 1), 1e-10))), 2)


def sharpness_ratio(frames, clean, masks, given=None) -> float:
    """The median, over the masks' bodies (255; each face's in each frame), of the painted
    area's high-frequency energy over the clean face's in the same place: the variance of the
    Laplacian of luma, inside the body shrunk by 2 px (its rim is an edge in either). A blur
    scores near 0, a texture as rich as the face's near 1, a noisier one above 1. With
    ``given`` (the degraded frames) only the pixels the output changed by over 8 levels count,
    and a face where under half the body changed is left out: a mask left in place is not
    texture."""
    ratios = []
    for i, (f, c, m) in enumerate(zip(frames, clean, masks)):
        body = (m == 255).astype(np.uint8)
        count, labels = cv2.connectedComponents(body)
        lf, lc = (cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(x[..., :3]), cv2.COLOR_RGB2GRAY).astype(np.float32),
                                cv2.CV_32F) for x in (f, c))
        changed = None
        if given is not None:
            changed = np.abs(f[..., :3].astype(np.int16) - given[i][..., :3]).max(axis=-1) > 8
        for k in range(1, count):
            part = cv2.erode((labels == k).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            if changed is not None:
                if changed[part].mean() < 0.5:
                    continue
                part &= changed
            if part.sum() < 64:
                continue
            ratios.append(float(lf[part].var()) / max(float(lc[part].var()), 1e-6))
    return round(float(np.median(ratios)), 3) if ratios else float("nan")
