"""Before/after contact sheet of restored face crops (``--preview PATH.png``)."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from .images import write_image

TILE = 128


def contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], *, columns: int = 4) -> np.ndarray:
    """RGB uint8 sheet: each cell is a before | after pair of crops resized to 128 px wide
    (crops taller than wide, as unmask's, keep their shape)."""
    if not pairs:
        sheet = np.full((TILE, 2 * TILE, 3), 32, np.uint8)
        cv2.putText(sheet, "no faces found", (20, TILE // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (220, 220, 220), 1, cv2.LINE_AA)
        return sheet
    cols = min(columns, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    gap = 4
    tile_h = max(round(TILE * b.shape[0] / b.shape[1]) for b, _ in pairs)
    cell_w, cell_h = 2 * TILE + gap, tile_h + 18
    sheet = np.full((rows * cell_h + gap, cols * (cell_w + gap) + gap, 3), 24, np.uint8)
    for k, (before, after) in enumerate(pairs):
        r, c = divmod(k, cols)
        y, x = gap + r * cell_h, gap + c * (cell_w + gap)
        h = round(TILE * before.shape[0] / before.shape[1])
        b = cv2.resize(before, (TILE, h), interpolation=cv2.INTER_AREA)
        a = cv2.resize(after, (TILE, h), interpolation=cv2.INTER_AREA)
        sheet[y + 14 : y + 14 + h, x : x + TILE] = b
        sheet[y + 14 : y + 14 + h, x + TILE + gap : x + cell_w] = a
        for text, dx in (("before", 2), ("after", TILE + gap + 2)):
            cv2.putText(sheet, text, (x + dx, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                        (200, 200, 200), 1, cv2.LINE_AA)
    return sheet


def write_preview(path: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    sheet = contact_sheet(pairs)
    path = Path(path)
    write_image(path, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), path)


def data_uri(rgb: np.ndarray, *, quality: int = 88) -> str:
    """An RGB uint8 crop as a ``data:image/jpeg;base64,...`` URI (a self-contained HTML page)."""
    import base64

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("a crop could not be encoded as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")
