"""``facemend generate``: new faces decoded from random codes, laid out as a grid image."""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from .errors import OutputError
from .media import partial_name


def grid(faces: np.ndarray, columns: int = 0, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(N, S, S, 3) uint8 -> one RGB image, ``columns`` per row (0: square-ish)."""
    n, s = len(faces), faces.shape[1]
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, 3), fill, np.uint8)
    for k, f in enumerate(faces):
        r, c = divmod(k, cols)
        y, x = pad + r * (s + pad), pad + c * (s + pad)
        out[y : y + s, x : x + s] = f
    return out


def write_grid(fm, output: Path, *, count: int = 16, seed: int = 0, temperature: float = 0.8,
               face_size: int = 128, columns: int = 0, crisp: bool = False, prior: str = "fitted") -> int:
    """Decode ``count`` random codes (see ``FaceMath.sample``) and write them as a grid."""
    faces = fm.sample(count, seed=seed, temperature=temperature, crisp=crisp, prior=prior)
    faces = np.clip(np.rint(faces.permute(0, 2, 3, 1).cpu().numpy() * 255), 0, 255).astype(np.uint8)
    if face_size != faces.shape[1]:
        interp = cv2.INTER_CUBIC if face_size > faces.shape[1] else cv2.INTER_AREA
        faces = np.stack([cv2.resize(f, (face_size, face_size), interpolation=interp) for f in faces])
    image = grid(faces, columns)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(output)
    ok = cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{output}: could not be written")
    os.replace(tmp, output)
    return count
