"""Still images: read any common format keeping alpha, grayscale and bit depth; restore; write.

Pixels are read with OpenCV (``IMREAD_UNCHANGED``: 8/16-bit, gray, alpha) in the file's stored
orientation. Faces are found on the view the EXIF orientation describes (so they are upright for
MTCNN), and the deltas are mapped back to stored orientation, so the written file keeps its
orientation tag and looks like the input everywhere but on the faces. JPEG outputs get the
source's EXIF and ICC segments back.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .align import add_delta
from .errors import CorruptInput, InputError, InputNotFound, UnsupportedInput, output_error
from .faces import FaceDetector
from .media import partial_name
from .restore import FaceRestorer

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ImageResult:
    path: str
    output: str
    faces: int
    width: int
    height: int
    channels: int
    dtype: str
    notes: list = field(default_factory=list)


def read_image(path: Path) -> np.ndarray:
    """Pixels as stored: (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA; uint8 or uint16."""
    if not path.exists():
        raise InputNotFound(f"{path}: no such file")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:  # no permission, a folder, an I/O error
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data[:8].tobytes() == b"\x89PNG\r\n\x1a\n" and data[-4096:].tobytes().rfind(b"IEND") < 0:
        # refused here: libpng would print its own complaint on stderr before OpenCV gives up
        raise CorruptInput(f"{path}: truncated PNG (its end is missing)")
    img, said = _decode(data) if data.size else (None, [])
    if img is None:
        raise CorruptInput(f"{path}: not a readable image (corrupt or unsupported data)")
    for line in said:  # what libjpeg or libpng had to say, as one line naming the file
        level = logging.INFO if "warning" in line.lower() else logging.WARNING
        log.log(level, "%s: decoded with a complaint from the codec: %s", path, line)
    if img.dtype not in (np.uint8, np.uint16):
        raise UnsupportedInput(f"{path}: {img.dtype} pixels are not supported (8 or 16 bit only)")
    return img


def _decode(data: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    """``cv2.imdecode`` with what the codecs print caught: OpenCV's own log is silenced (the
    caller's error says it), and what libjpeg or libpng write straight to file descriptor 2
    ("Corrupt JPEG data: ...", which names no file) is returned as lines instead."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to guard
        saved = None
    try:
        with tempfile.TemporaryFile() as caught:
            if saved is not None:
                os.dup2(caught.fileno(), 2)
            try:
                img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            except cv2.error:
                img = None
            finally:
                if saved is not None:
                    os.dup2(saved, 2)
            caught.seek(0)
            said = [ln.strip() for ln in caught.read().decode(errors="replace").splitlines() if ln.strip()]
    finally:
        if saved is not None:
            os.close(saved)
        cv2.utils.logging.setLogLevel(level)
    return img, said


def exif_orientation(path: Path) -> int:
    """EXIF orientation tag (1..8), 1 when absent or unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


_ORIENT = {  # EXIF orientation -> (stored -> upright, upright -> stored), as PIL's exif_transpose
    2: (lambda x: x[:, ::-1], lambda x: x[:, ::-1]),
    3: (lambda x: x[::-1, ::-1], lambda x: x[::-1, ::-1]),
    4: (lambda x: x[::-1], lambda x: x[::-1]),
    5: (lambda x: np.swapaxes(x, 0, 1), lambda x: np.swapaxes(x, 0, 1)),
    6: (lambda x: np.rot90(x, -1), lambda x: np.rot90(x, 1)),
    7: (lambda x: np.swapaxes(x[::-1, ::-1], 0, 1), lambda x: np.swapaxes(x, 0, 1)[::-1, ::-1]),
    8: (lambda x: np.rot90(x, 1), lambda x: np.rot90(x, -1)),
}


def _orient(a: np.ndarray, o: int) -> np.ndarray:
    """Stored pixels -> the upright view EXIF orientation ``o`` describes."""
    return _ORIENT[o][0](a) if o in _ORIENT else a


def _unorient(a: np.ndarray, o: int) -> np.ndarray:
    """Inverse of ``_orient``: upright view -> stored pixels."""
    return _ORIENT[o][1](a) if o in _ORIENT else a


def too_small_for_faces(detector: FaceDetector, width: int, height: int) -> bool:
    """True when a picture this size cannot hold a face of the detector's ``min_face`` (its
    shorter side, as the detector sees it, is shorter than the smallest face it looks for):
    such a thumbnail or tiny frame goes through unchanged, with 0 faces."""
    scale = min(1.0, detector.max_side / max(width, height, 1))
    return min(width, height) * scale < max(12, round(detector.min_face * scale))


def small_note(path, width: int, height: int, detector: FaceDetector) -> str:
    return (f"{path}: {width}x{height} is smaller than the smallest face looked for "
            f"({detector.min_face} px); left unchanged, 0 faces")


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any stored image -> RGB uint8 for detection and the network."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def restore_image(src: Path, dst: Path, *, detector: FaceDetector, restorer: FaceRestorer,
                  jpeg_quality: int = 95) -> ImageResult:
    """Restore the faces of one image file into ``dst`` (written under a temporary name)."""
    src, dst = Path(src), Path(dst)
    stored = read_image(src)
    o = exif_orientation(src)
    view = np.ascontiguousarray(_orient(stored, o))
    notes = []
    pages = page_count(src)
    if pages > 1:  # OpenCV reads the first page (or frame) only
        notes.append(f"{src}: has {pages} pages; only the first is restored and written, "
                     f"the other {pages - 1} are dropped")
        log.warning("%s", notes[-1])
    if too_small_for_faces(detector, view.shape[1], view.shape[0]):
        notes.append(small_note(src, stored.shape[1], stored.shape[0], detector))
        log.warning("%s", notes[-1])
        faces, deltas = [], []
    else:
        rgb = to_rgb8(view)
        faces = detector.detect_image(rgb)
        deltas = restorer.deltas([rgb], [faces])[0]
    if deltas:
        out_view = view.copy()
        scale = 257.0 if view.dtype == np.uint16 else 1.0
        for (x0, y0, x1, y1), d in deltas:
            if out_view.ndim == 3:
                d = d[..., ::-1]  # RGB delta -> BGR(A) pixel order
                if out_view.shape[2] == 4:  # alpha untouched
                    d = np.concatenate([d, np.zeros_like(d[..., :1])], axis=-1)
            add_delta(out_view, (x0, y0, x1, y1), np.ascontiguousarray(d), scale)
        out = np.ascontiguousarray(_unorient(out_view, o))
    else:
        out = stored
    notes += write_image(dst, out, src, jpeg_quality)
    return ImageResult(str(src), str(dst), len(faces), stored.shape[1], stored.shape[0],
                       1 if stored.ndim == 2 else stored.shape[2], str(stored.dtype), notes)


def page_count(path: Path) -> int:
    """Pages of a multi-page TIFF (frames of an animated WebP); 1 when single or unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return max(1, int(getattr(im, "n_frames", 1) or 1))
    except Exception:
        return 1


def fit_format(dst: Path, img: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``img`` as ``dst``'s format can hold it, and a note for each thing that is lost: the
    transparency of an image written as JPEG (which has no alpha), the low 8 bits of 16-bit
    pixels written as JPEG, WebP or BMP (8 bits per channel; OpenCV would clip them)."""
    ext = dst.suffix.lower()
    notes = []
    if img.ndim == 3 and img.shape[2] == 4 and ext in (".jpg", ".jpeg"):
        if (img[..., 3] < np.iinfo(img.dtype).max).any():
            notes.append(f"{dst}: JPEG has no alpha channel; the transparency is dropped")
        img = np.ascontiguousarray(img[..., :3])
    if img.dtype == np.uint16 and ext not in (".png", ".tif", ".tiff"):
        notes.append(f"{dst}: {ext} holds 8 bits per channel; 16-bit pixels are reduced to 8 bits")
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return img, notes


def write_image(dst: Path, img: np.ndarray, src: Path, jpeg_quality: int = 95) -> list[str]:
    """Write ``img`` to ``dst`` under a temporary name; returns notes on what the format lost
    (each also logged as a warning)."""
    ext = dst.suffix.lower()
    img, notes = fit_format(dst, img)
    for note in notes:
        log.warning("%s", note)
    params = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 100 if _webp_lossless(src) else jpeg_quality]
    ok, buf = cv2.imencode(ext if ext != ".jpeg" else ".jpg", img, params)
    if not ok:
        raise UnsupportedInput(f"{dst}: cannot encode this image as {ext}")
    data = buf.tobytes()
    if ext in (".jpg", ".jpeg") and src.suffix.lower() in (".jpg", ".jpeg"):
        data = _copy_jpeg_metadata(src.read_bytes(), data)
    tmp = partial_name(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    except OSError as e:  # disk full, no permission, a file where a folder should be
        raise output_error(dst, e) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # its folder could not be made, or is gone
            pass
    return notes


def _webp_lossless(src: Path) -> bool:
    try:
        head = src.read_bytes()[:40]
        return head[12:16] == b"VP8L"
    except OSError:
        return False


def _jpeg_segments(data: bytes, markers: set[int]) -> list[bytes]:
    """Raw APPn segments with the given marker bytes, in order, from a JPEG's header."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: header is over
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in markers:
            out.append(data[i : i + 2 + length])
        i += 2 + length
    return out


def _copy_jpeg_metadata(src: bytes, dst: bytes) -> bytes:
    """``dst`` with the EXIF (APP1) and ICC (APP2) segments of ``src`` inserted after SOI."""
    segs = _jpeg_segments(src, {0xE1, 0xE2})
    if not segs or dst[:2] != b"\xff\xd8":
        return dst
    return dst[:2] + b"".join(segs) + dst[2:]
