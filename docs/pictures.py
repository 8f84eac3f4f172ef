"""Make the README's FaceMath pictures with the shipped weights (small PNGs in docs/).

    python docs/pictures.py

- ``facemath_morph.png``: a morph strip between two photos from ../shared/data/scenes;
- ``facemath_age.png``: validation-split UTKFace photos (never trained on) aged by -20 .. +40
  years, through the same detection, alignment and paste-back as ``submit --task age``;
- ``facemath_gender.png``: the same faces with ``--task gender --amount -1 / +1``;
- ``facemath_grid.png``: ``generate --count 16`` (random faces from the prior, seed 0);
- ``restore_examples.jpg``: per restoration task, validation faces (aligned 128 px crops) with
  the task's evaluation degradation, the shipped network's output and the original.

    python docs/pictures.py restore      # only the restoration picture (or: facemath)
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.training import data as D  # noqa: E402
from models.facemath import FaceEditor, FaceMath  # noqa: E402
from models.tasks import resolve  # noqa: E402
from pipeline.faces import FaceDetector  # noqa: E402
from pipeline.generate import grid, write_grid  # noqa: E402
from pipeline.morph import _largest_face, _upright_rgb, morph_frames  # noqa: E402
from pipeline.restore import FaceRestorer  # noqa: E402

OUT = ROOT / "docs"
SCENES = ROOT.parent / "shared" / "data" / "scenes"


def label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def save(name: str, rgb: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if name.endswith(".jpg") else [cv2.IMWRITE_PNG_COMPRESSION, 9]
    cv2.imwrite(str(OUT / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    print(OUT / name, rgb.shape)


def edited(photo: np.ndarray, det: FaceDetector, restorer: FaceRestorer) -> np.ndarray:
    faces = det.detect_image(photo)
    out = photo.astype(np.float32)
    for (x0, y0, x1, y1), d in restorer.deltas([photo], [faces])[0]:
        out[y0:y1, x0:x1] += d
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def restoration() -> None:
    import models
    from models.training.degrade import degrade_batch
    from models.training.evaluate import run_model

    names = sorted(p.name for p in D.UTKFACE_DIR.iterdir() if D.parse_utkface_name(p.name) and D.is_val(p.name))
    crops, _ = D.make_crops([D.UTKFACE_DIR / n for n in names[5::97][:6]])
    crops = crops[:4]
    tiles = []
    for task in ("denoise", "enhance", "unmask"):
        bad, _ = degrade_batch(task, crops, seed=0, evaluation=True)
        out = run_model(models.load(task), bad)
        for b, o, c in zip(bad, out, crops):
            tiles += [label(b, task), label(o, "model"), label(c, "original")]
    save("restore_examples.jpg", grid(np.stack(tiles), columns=6))


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("all", "restore"):
        restoration()
    if what in ("all", "facemath"):
        facemath()


def facemath() -> None:
    fm = FaceMath.load("cpu")
    det = FaceDetector()
    # morph strip
    a_path, b_path = SCENES / "pyfeat_single_face.jpg", SCENES / "facerec_lin-manuel-miranda.png"
    a, b = _upright_rgb(a_path), _upright_rgb(b_path)
    fa, fb = _largest_face(det, a, a_path), _largest_face(det, b, b_path)
    frames = list(morph_frames(a, b, fa.landmarks, fb.landmarks, fm, 7))
    x0, y0, x1, y1 = fa.box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 0.8 * max(x1 - x0, y1 - y0)
    ys, xs = slice(max(0, int(cy - half)), int(cy + half)), slice(max(0, int(cx - half)), int(cx + half))
    tiles = [cv2.resize(f[ys, xs], (128, 128), interpolation=cv2.INTER_AREA) for f in frames]
    save("facemath_morph.png", grid(np.stack(tiles), columns=len(tiles)))
    # ageing and gender rows on validation faces
    names = sorted(p.name for p in D.UTKFACE_DIR.iterdir() if D.parse_utkface_name(p.name) and D.is_val(p.name))
    picks = [n for n in names if 20 <= D.parse_utkface_name(n).age <= 40][::37][:4]
    rows_age, rows_gender = [], []
    for n in picks:
        photo = cv2.cvtColor(cv2.imread(str(D.UTKFACE_DIR / n)), cv2.COLOR_BGR2RGB)
        lab = D.parse_utkface_name(n)
        row = [label(photo, f"{lab.age} y")]
        for amount in (-20, 20, 40):
            r = FaceRestorer(FaceEditor(resolve("age"), fm, amount=amount))
            row.append(label(edited(photo, det, r), f"{amount:+d}"))
        rows_age += row
        row = [label(photo, "M" if lab.gender == 0 else "F")]
        for amount in (-1.0, 1.0):
            r = FaceRestorer(FaceEditor(resolve("gender"), fm, amount=amount))
            row.append(label(edited(photo, det, r), f"{amount:+g}"))
        rows_gender += row
    size = 128
    save("facemath_age.png", grid(np.stack([cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA)
                                            for t in rows_age]), columns=4))
    save("facemath_gender.png", grid(np.stack([cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA)
                                               for t in rows_gender]), columns=3))
    write_grid(fm, OUT / "facemath_grid.png", count=16, seed=0, face_size=96, columns=8)
    print(OUT / "facemath_grid.png")


if __name__ == "__main__":
    main()
