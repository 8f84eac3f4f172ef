"""Shared helpers: real data from ../shared/data, the CLI as a subprocess, media probes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VIDEOS = DATA / "videos"
SCENES = DATA / "scenes"
UTKFACE = DATA / "faces" / "utkface"


def pytest_sessionstart(session):
    if not VIDEOS.is_dir():  # a missing data set is a failure, never a skip
        raise pytest.UsageError(f"{DATA}: the shared data folder is missing")


def run_cli(*args, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def run_json(*args) -> dict:
    proc = run_cli(*args, "--json", check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(path: Path) -> dict:
    """What a user checks on a video: frames, pts, duration, audio packets, size, rotation, and
    the colour description (primaries, transfer, matrix, range) players decode it with."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        tb = v.time_base
        pts = []
        rotation = color = None
        for f in c.decode(v):
            pts.append(f.pts)
            if rotation is None:
                rotation = int(round(f.rotation or 0)) % 360
                color = [int(getattr(f, k)) for k in ("color_primaries", "color_trc", "colorspace", "color_range")]
        audio = {}
        for s in c.streams.audio:
            c.seek(0)
            audio[s.index] = [bytes(p) for p in c.demux(s) if p.size]
        codecs = [s.codec_context.name for s in c.streams.audio]
        return {
            "frames": len(pts), "pts": [float(p * tb) for p in sorted(pts)],
            "fps": float(v.average_rate or 0), "width": v.codec_context.width,
            "height": v.codec_context.height, "rotation": rotation, "color": color,
            "audio": list(audio.values()), "audio_codecs": codecs,
        }


def decode_rgb(path: Path, every: int = 1, limit: int | None = None) -> list[np.ndarray]:
    out = []
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if limit is not None and i >= limit:
                break
            if i % every == 0:
                out.append(f.to_ndarray(format="rgb24"))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def face_mask(frames: list[np.ndarray], grow: float = 0.0) -> list[np.ndarray]:
    """Boolean masks of the detected face boxes (grown by ``grow`` of their size) per frame."""
    from pipeline.faces import FaceDetector

    det = FaceDetector()
    masks = []
    for frame, faces in zip(frames, det.detect(frames)):
        m = np.zeros(frame.shape[:2], bool)
        for f in faces:
            x0, y0, x1, y1 = f.box
            gx, gy = (x1 - x0) * grow, (y1 - y0) * grow
            x0, y0 = int(max(0, x0 - gx)), int(max(0, y0 - gy))
            x1, y1 = int(min(frame.shape[1], x1 + gx)), int(min(frame.shape[0], y1 + gy))
            m[y0:y1, x0:x1] = True
        masks.append(m)
    return masks


def masked_psnr(a_frames, b_frames, masks) -> float:
    se, n = 0.0, 0
    for a, b, m in zip(a_frames, b_frames, masks):
        d = (a[m].astype(np.float64) - b[m].astype(np.float64)) ** 2
        se += d.sum()
        n += d.size
    assert n > 0, "empty mask"
    return float("inf") if se == 0 else 10 * np.log10(255.0**2 / (se / n))


def cut(src: Path, dst: Path, seconds: float) -> Path:
    """Stream-copy the start of a clip (video up to the first keyframe at/after ``seconds``)."""
    with av.open(str(src)) as c, av.open(str(dst), "w") as o:
        v = c.streams.video[0]
        keys = [float(p.pts * v.time_base) for p in c.demux(v) if p.is_keyframe and p.pts is not None]
        end = min([k for k in keys if k >= seconds - 1e-6] or [1e9])
        c.seek(0)
        outs = {s.index: o.add_stream_from_template(s) for s in c.streams if s.type in ("video", "audio")}
        for p in c.demux(*[s for s in c.streams if s.index in outs]):
            if p.dts is None or p.size == 0 or p.pts is None:
                continue
            if float(p.pts * p.stream.time_base) >= end - 1e-6:
                continue
            p.stream = outs[p.stream.index]
            o.mux(p)
    return dst


def sheet_pairs(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (before, after) 128 px tiles of a ``--preview`` contact sheet (cells of 2 tiles with a
    4 px gap under a 14 px label, on a dark background), empty cells dropped."""
    import cv2

    sheet = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    tile, gap, label = 128, 4, 14
    cell_w, cell_h = 2 * tile + gap, tile + 18
    rows, cols = (sheet.shape[0] - gap) // cell_h, (sheet.shape[1] - gap) // (cell_w + gap)
    assert (rows * cell_h + gap, cols * (cell_w + gap) + gap) == sheet.shape[:2], sheet.shape
    pairs = []
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * cell_h + label, gap + c * (cell_w + gap)
            before, after = sheet[y : y + tile, x : x + tile], sheet[y : y + tile, x + tile + gap : x + cell_w]
            if before.std() > 0:  # an unused cell is flat background
                pairs.append((before, after))
    return pairs
