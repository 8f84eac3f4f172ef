"""The product's quality as a user gets it: degrade real clips and photos, run the CLI, score the file.

    python -m bench.quality [--quick] [--json] [--tasks denoise,enhance] [--sources closeup,scenes]
        [--frames N] [--crf 0] [--out DIR] [--sheets DIR]

For each source (``SOURCES``: real clips and photos from ``../shared/data``) the clean frames are
decoded as the pipeline decodes them, faces are found on them (the product's detector and
settings), and each case (``CASES``: a task and a seeded degradation) is run:
1. the degraded frames are stored losslessly (a clip: H.264 at CRF 0 in the clip's own YUV
   matrix and timing; photos: PNG in a folder);
2. ``cli.main(["submit", ...])`` restores them, the same code path as ``cli.py submit`` (the
   embedded job), and the output file is decoded again;
3. the output is scored against the clean frames over each face's head (forehead to chin, cheek
   to cheek: the detector's box grown by ``HEAD``): PSNR and SSIM; PSNR outside the heads against
   the degraded input (a plain re-encode leaves those pixels as they were); flicker, the mean
   absolute frame-to-frame change inside the heads, as a ratio to the clean clip's.
Beside the output, on the same heads: the degraded input; the classical filter a user could run
instead (``classical``: OpenCV's non-local means, unsharp mask, Telea given the mask); and the
network alone on an axis-aligned crop of each head at the frame's own resolution (``ceiling``:
nothing resampled, no paste-back; restoration tasks only).

Prints one table; ``--json`` prints one object. ``--quick`` is a cut small enough for a test.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SEED = 0
HEAD = (0.12, 0.35, 0.05)  # the detector's box grown by these fractions: sides, top, bottom


@dataclass(frozen=True)
class Source:
    name: str
    path: str  # under DATA; a folder of photos or a clip
    frames: int  # clips: frames used (the first N)
    quick_frames: int = 0


SOURCES = (
    Source("walking", "videos/walking_1080p.mp4", 8),
    Source("closeup", "videos/closeup_pexels.mp4", 12, 6),
    Source("selfie", "videos/selfie_mp3audio.mp4", 12),
    Source("scenes", "scenes", 0),
)
SCENE_PHOTOS = ("facenetpt_multiface.jpg", "facerec_obama_partial_face.jpg", "facerec_two_people.jpg",
                "pyfeat_multi_face.jpg", "pyfeat_single_face.jpg")


@dataclass(frozen=True)
class Case:
    task: str
    degradation: str  # see ``degrade``
    classical: str  # see ``classical``


CASES = (
    Case("denoise", "noise10", "nlmeans"),
    Case("denoise", "noise20", "nlmeans"),
    Case("denoise", "noise30", "nlmeans"),
    Case("denoise", "jpeg20", "nlmeans"),
    Case("denoise", "h264crf40", "nlmeans"),
    Case("enhance", "down2", "unsharp"),
    Case("enhance", "down4", "unsharp"),
    Case("enhance", "blur2", "unsharp"),
    Case("denoise", "mix", "nlmeans"),
    Case("enhance", "mix", "unsharp"),
    Case("restore", "mix", "nlmeans"),
    Case("restore", "noise20", "nlmeans"),
    Case("restore", "jpeg20", "nlmeans"),
    Case("restore", "h264crf40", "nlmeans"),
    Case("restore", "down4", "unsharp"),
    Case("restore", "blur2", "unsharp"),
    Case("unmask", "mask", "telea"),
    Case("identity", "noise20", "none"),
)
QUICK = {("closeup", "denoise", "noise20"), ("closeup", "enhance", "down4"), ("closeup", "unmask", "mask"),
         ("closeup", "identity", "noise20"), ("closeup", "restore", "mix"), ("closeup", "denoise", "mix")}


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


def degrade(name: str, frames: list[np.ndarray], faces: list[list], rng_seed: int = SEED):
    """The degraded frames and, for ``mask``, each frame's mask (uint8 0/255) else None."""
    from models.training import degrade as D

    out, masks = [], None
    if name.startswith("noise"):
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
                m = np.maximum(m, a)
            out.append(img)
            masks.append(((m > 0.05) * 255).astype(np.uint8))
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
            elif name == "telea":
                r = cv2.inpaint(np.ascontiguousarray(region), np.ascontiguousarray(masks[i][Y0:Y1, X0:X1]),
                                3, cv2.INPAINT_TELEA)
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
    """The task's network alone on an axis-aligned crop of each head (a margin of 16 px, reflected
    to the network's multiple): no resampling, no blending; the head pasted as the network gave
    it. None for tasks whose network needs an aligned face (unmask) or has none."""
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


# ---------------------------------------------------------------------------------------------
# faces and scores


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


# ---------------------------------------------------------------------------------------------
# running the product


def submit(path: Path, out: Path, task: str, crf: int) -> None:
    """``cli.py submit`` in this process, embedded (no broker)."""
    sys.path.insert(0, str(ROOT))
    import cli

    args = ["submit", str(path), "--task", task, "-o", str(out), "--overwrite", "-q", "--crf", str(crf)]
    with _no_broker(), contextlib.redirect_stdout(sys.stderr):  # stdout is the bench's
        rc = cli.main(args)
    if rc != 0:
        raise SystemExit(f"cli {' '.join(args)} exited {rc}")


@contextlib.contextmanager
def _no_broker():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in ("FACEMEND_BROKER", "CELERY_BROKER_URL")}
    try:
        yield
    finally:
        os.environ.update(saved)


def load_source(src: Source, quick: bool, frames: int | None):
    """(kind, clean frames, faces per frame, heads per frame, writer, reader) for a source."""
    from pipeline.faces import FaceDetector

    det = FaceDetector()
    path = DATA / src.path
    if path.is_dir():
        names = SCENE_PHOTOS[:1] if quick else SCENE_PHOTOS
        clean = [read_photo(path / n) for n in names]
        faces = [det.detect_image(f) for f in clean]
        kind = "photos"
        ctx = names
    else:
        n = frames or (src.quick_frames if quick else src.frames)
        vplan, clean, yuvs = read_clip(path, n)
        faces = det.detect(clean)
        kind = "clip"
        ctx = (vplan, yuvs)
    heads = [[head_box(f, img.shape) for f in fs] for img, fs in zip(clean, faces)]
    return kind, clean, faces, heads, ctx


def run_case(src: Source, case: Case, kind: str, clean, faces, heads, ctx, work: Path, crf: int,
             sheets: Path | None = None) -> dict:
    bad, masks = degrade(case.degradation, clean, faces)
    tag = f"{src.name}.{case.task}.{case.degradation}"
    t0 = time.perf_counter()
    if kind == "clip":
        vplan, yuvs = ctx
        given_path = work / f"{tag}.in.mp4"
        write_clip(given_path, vplan, yuvs, bad, clean)
        given = read_rgb_clip(given_path, len(clean))
        out_path = work / f"{tag}.out.mp4"
        t0 = time.perf_counter()
        submit(given_path, out_path, case.task, crf)
        seconds = time.perf_counter() - t0
        out = read_rgb_clip(out_path, len(clean))
        if len(out) != len(clean):
            raise SystemExit(f"{out_path}: {len(out)} frames, expected {len(clean)}")
    else:
        folder = work / f"{tag}.in"
        folder.mkdir(parents=True, exist_ok=True)
        for name, b in zip(ctx, bad):
            write_photo(folder / (Path(name).stem + ".png"), b)
        given = [read_photo(folder / (Path(name).stem + ".png")) for name in ctx]
        out_dir = work / f"{tag}.out"
        t0 = time.perf_counter()
        submit(folder, out_dir, case.task, crf)
        seconds = time.perf_counter() - t0
        out = [read_photo(out_dir / (Path(name).stem + ".png")) for name in ctx]
    video = kind == "clip"
    row = {
        "source": src.name, "task": case.task, "degradation": case.degradation,
        "frames": len(clean), "seconds": round(seconds, 1),
        "clean": {"flicker": 1.0} if video else {},
        "input": score(given, clean, heads, video=video),
        "classical": {"name": case.classical,
                      **score(classical(case.classical, case.degradation, given, heads, masks), clean, heads,
                              video=video)},
        "facemend": score(out, clean, heads, given, video=video, areas=write_areas(case.task, clean, faces)),
    }
    ceil = ceiling(case.task, given, heads)
    row["ceiling"] = score(ceil, clean, heads, video=video) if ceil is not None else None
    if case.task == "identity":
        row["identity_exact"] = all(np.array_equal(a, b) for a, b in zip(out, given))
    if masks is not None:
        row["mask_psnr"] = {k: mask_psnr(v, clean, masks) for k, v in
                            (("input", given), ("classical", classical("telea", "", given, heads, masks)),
                             ("facemend", out))}
    if sheets is not None:
        write_sheet(sheets / f"{tag}.png", clean, given, out, heads)
    return row


def mask_psnr(frames, clean, masks) -> float:
    err = n = 0.0
    for f, c, m in zip(frames, clean, masks):
        inside = m > 0
        err += float(((f[inside].astype(np.float64) - c[inside]) ** 2).sum())
        n += int(inside.sum()) * 3
    return round(float(10 * np.log10(255.0**2 / max(err / max(n, 1), 1e-10))), 2)


def write_sheet(path: Path, clean, given, out, heads, limit: int = 4, size: int = 256) -> None:
    """Rows of (clean, degraded, facemend) head crops at ``size`` px high: the last frame's
    heads (a clip's output there has been through every frame before it), largest first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in reversed(range(len(clean))):
        for x0, y0, x1, y1 in sorted(heads[k], key=lambda b: -(b[2] - b[0]))[:limit]:
            # the head and as much again around it: the feathered edge of the paste is in view
            H, W = clean[k].shape[:2]
            mx, my = (x1 - x0) // 4, (y1 - y0) // 4
            x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my)
            tiles = []
            for im in (clean[k], given[k], out[k]):
                crop = im[y0:y1, x0:x1]
                w = max(1, round(crop.shape[1] * size / crop.shape[0]))
                tiles.append(cv2.resize(crop, (w, size), interpolation=cv2.INTER_NEAREST if crop.shape[0] < size else cv2.INTER_AREA))
            rows.append(np.hstack(tiles))
        if rows:
            break
    if rows:
        width = max(r.shape[1] for r in rows)
        sheet = np.vstack([cv2.copyMakeBorder(r, 0, 4, 0, width - r.shape[1], cv2.BORDER_CONSTANT) for r in rows])
        write_photo(path, sheet)


def run(quick: bool = False, tasks: list[str] | None = None, sources: list[str] | None = None,
        frames: int | None = None, crf: int = 0, out: Path | None = None, sheets: Path | None = None,
        degradations: list[str] | None = None) -> dict:
    import torch

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="facemend-quality-") as tmp:
        work = Path(out) if out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for src in SOURCES:
            if sources and src.name not in sources:
                continue
            cases = [c for c in CASES if (not tasks or c.task in tasks)
                     and (not degradations or c.degradation in degradations)
                     and (not quick or (src.name, c.task, c.degradation) in QUICK)]
            if not cases:
                continue
            loaded = load_source(src, quick, frames)
            for case in cases:
                rows.append(run_case(src, case, *loaded, work, crf, sheets))
                logging.getLogger(__name__).info("%s", rows[-1])
    return {"rows": rows, "quick": quick, "crf": crf, "seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    head = ("source", "task", "degradation", "faces", "input", "classical", "facemend", "ceiling",
            "ssim", "outside", "flicker")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        f = r["facemend"]
        ceil = r["ceiling"]["psnr"] if r["ceiling"] else None
        cl = r["classical"]
        lines.append(" | ".join(str(x) for x in (
            r["source"], r["task"], r["degradation"], f["faces"], r["input"]["psnr"],
            f"{cl['psnr']} ({cl['name']})" if cl["name"] != "none" else "-", f["psnr"],
            ceil if ceil is not None else "-", f["ssim"], f.get("outside_psnr"),
            f"{f['flicker']} (input {r['input']['flicker']})" if "flicker" in f else "-")))
        if "mask_psnr" in r:
            m = r["mask_psnr"]
            lines[-1] += f"  [inside the mask: input {m['input']}, Telea {m['classical']}, facemend {m['facemend']}]"
    return "\n".join(lines)


def make_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small cut (one clip, six cases) for tests")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tasks", help="comma-separated tasks (default: all)")
    p.add_argument("--sources", help=f"comma-separated sources: {', '.join(s.name for s in SOURCES)}")
    p.add_argument("--degradations", help="comma-separated degradations (default: all)")
    p.add_argument("--frames", type=int, help="frames per clip (default: each source's)")
    p.add_argument("--crf", type=int, default=0, help="the output's CRF (default 0: lossless)")
    p.add_argument("--out", type=Path, help="keep the degraded inputs and outputs in this folder")
    p.add_argument("--sheets", type=Path, help="write a before/after sheet per row into this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_argument_parser().parse_args(argv)
    split = lambda s: s.split(",") if s else None  # noqa: E731
    result = run(args.quick, split(args.tasks), split(args.sources), args.frames, args.crf, args.out,
                 args.sheets, split(args.degradations))
    result["command"] = "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
