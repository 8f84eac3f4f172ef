"""Face detection with MTCNN (facenet-pytorch's networks), batched over frames of equal size.

Large frames are detected on a downscaled copy (long side ``max_side``) and the boxes and five
landmarks are scaled back to frame pixels. MTCNN's weights ship inside facenet-pytorch, so
nothing is downloaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Face:
    """One detected face in frame pixels."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) left eye, right eye, nose, left mouth, right mouth
    score: float
    track: int = -1  # track id in a video, -1 for still images
    interpolated: bool = field(default=False)  # filled in a detection gap

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


class FaceDetector:
    """Batched MTCNN. ``detect(frames)`` takes a list of equal-size RGB uint8 frames.

    min_face: smallest face (px, in the original frame) to find. max_side: frames whose long
    side is larger are detected on a copy scaled to this size. min_score: faces below this
    MTCNN confidence are dropped (it keeps cartoons and textures out). track_score (video;
    None: min_score): video frames keep faces down to this score, for the tracker to hold a face
    whose score dips (a turned head, motion blur, a mask, heavy noise) on the track of a face it
    confirmed at min_score nearby (``FaceTracker``'s confirm_score); a face never confirmed is
    not restored. thresholds: MTCNN's three stage thresholds. max_overlap: drop a face whose box
    lies more than this fraction inside a higher-scoring face's box (1: keep all). engine:
    MTCNN's inference engine (``models.export``; default ``$FACEMEND_ENGINE`` or auto).
    ``FaceDetector(**MASKED)`` is the setting for faces whose lower half is covered (the unmask
    task), which MTCNN scores low.
    """

    # Masked faces: MTCNN's default settings find 118 of 234 UTKFace validation photos with
    # synthetic masks; lower stage thresholds find more (these: 737 of all 1,034, 71 %,
    # models.training.evaluate --task unmask --whole), but also boxes on the mask or chin below a face,
    # so a box lying mostly inside a stronger face's box is dropped (max_overlap).
    # In video, masked faces score 0.5-0.8 in some frames and above 0.8 in others (a head that
    # turns, a mask that hides more of the face), so tracks carry them down to track_score.
    MASKED = {"thresholds": (0.3, 0.4, 0.5), "min_score": 0.8, "track_score": 0.5, "max_overlap": 0.3}

    def __init__(
        self,
        *,
        device: str = "cpu",
        min_face: int = 40,
        max_side: int = 960,
        min_score: float = 0.92,
        track_score: float | None = 0.7,
        batch_size: int = 16,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        max_overlap: float = 1.0,
        engine: str | None = None,
    ) -> None:
        self.device = device
        self.min_face = int(min_face)
        self.max_side = int(max_side)
        self.min_score = float(min_score)
        self.track_score = self.min_score if track_score is None else min(float(track_score), self.min_score)
        self.batch_size = int(batch_size)
        self.max_overlap = float(max_overlap)
        from .mtcnn import FastMTCNN

        self._net = FastMTCNN(device=device, thresholds=tuple(thresholds), engine=engine)
        self.engine = self._net.engine  # MTCNN's inference engine (models.export)

    def _mtcnn(self, min_size: int):
        self._net.min_face_size = min_size
        return self._net

    # detect_image's further looks, in turn until one finds a face: a grey border of these
    # fractions of the shorter side (MTCNN's scale pyramid lands differently on each canvas)
    RETRY_BORDERS = (0.25, 0.1, 0.4)
    # ... and where the best face found scores under this, one look inside the first border, a
    # face found there replacing the smaller faces it holds (see _enclosing_first)
    RECHECK_BELOW = 0.95

    def size_for(self, height: int, width: int) -> tuple[int, int] | None:
        """The (width, height) the detector looks at a frame of this size at: None where it
        looks at the frame as it is (its long side is at most ``max_side``)."""
        scale = self.max_side / max(height, width)
        if scale >= 1.0:
            return None
        return max(1, int(round(width * scale))), max(1, int(round(height * scale)))

    def detect(self, frames: list[np.ndarray], border: float = 0.0, floor: float | None = None,
               shape: tuple[int, int] | None = None) -> list[list[Face]]:
        """Faces in each frame (a list per frame, possibly empty). ``border``: search the frames
        inside a mid-grey border this fraction of their shorter side wide (coordinates stay the
        frame's). ``floor``: the lowest score kept (default min_score; video: track_score).
        ``shape``: (height, width) of the frames when ``frames`` are copies of them already
        shrunk to ``size_for`` (a video's frames, shrunk as they are converted to RGB); the
        faces are in the frames' coordinates."""
        if not frames:
            return []
        h, w = shape or frames[0].shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        min_size = max(12, int(round(self.min_face * scale)))
        net = self._mtcnn(min_size)
        size = self.size_for(h, w)
        out: list[list[Face]] = []
        for i in range(0, len(frames), self.batch_size):
            chunk = frames[i : i + self.batch_size]
            if size is not None and chunk[0].shape[1::-1] != size:
                chunk = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in chunk]
            batch = np.stack([_rgb(f) for f in chunk])
            pad = int(round(border * min(batch.shape[1:3])))
            if pad:  # a grey frame around the picture: MTCNN finds a face cut by its edge
                batch = np.pad(batch, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=127)
            for b, p, pt in net.detect(batch):
                out.append(self._faces(b, p, pt, 1.0 / scale, pad, floor))
        return out

    REGION_STEP = 32  # detect_regions pads each region to a multiple of this (detector pixels)

    def detect_regions(self, frame: np.ndarray, regions: list[tuple[int, int, int, int]],
                       floor: float | None = None, shape: tuple[int, int] | None = None) -> list[Face]:
        """Faces inside ``regions`` (x0, y0, x1, y1 in frame pixels) of one frame, searched at the
        scale the whole frame is (``max_side``), in frame coordinates; where regions overlap and
        find one face twice, the better-scored copy is kept. ``floor`` and ``shape`` (``frame``
        is a copy shrunk to ``size_for``) as in ``detect``."""
        h, w = shape or frame.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        net = self._mtcnn(max(12, int(round(self.min_face * scale))))
        shrunk = shape is not None and self.size_for(h, w) is not None
        found: list[Face] = []
        for x0, y0, x1, y1 in regions:
            if shrunk:  # the region's pixels of the shrunk copy, its corner in frame pixels
                sx, sy = int(x0 * scale), int(y0 * scale)
                crop = _rgb(frame[sy : int(np.ceil(y1 * scale)), sx : int(np.ceil(x1 * scale))])
                x0, y0 = sx / scale, sy / scale
            else:
                crop = _rgb(frame[y0:y1, x0:x1])
                if scale < 1.0:
                    size = (max(1, int(round((x1 - x0) * scale))), max(1, int(round((y1 - y0) * scale))))
                    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
            if min(crop.shape[:2]) < 12:
                continue
            # grey to a multiple of 32 px on the right and below: a few shapes for the engines
            ph, pw = -crop.shape[0] % self.REGION_STEP, -crop.shape[1] % self.REGION_STEP
            crop = np.pad(crop, ((0, ph), (0, pw), (0, 0)), constant_values=127)
            (b, p, pt), = net.detect(crop[None])
            for f in self._faces(b, p, pt, 1.0 / scale, floor=floor):
                f.box += (x0, y0, x0, y0)
                f.landmarks += (x0, y0)
                found.append(f)
        from .track import iou

        kept: list[Face] = []
        for f in sorted(found, key=lambda f: -f.score):
            if all(iou(f.box, k.box) < 0.5 for k in kept):
                kept.append(f)
        return sorted(kept, key=lambda f: -f.width)

    def detect_image(self, image: np.ndarray) -> list[Face]:
        """Faces in one still image. Where none is found, the image is searched again inside a
        grey border (``RETRY_BORDERS``, widths in turn until a face is found): MTCNN misses a
        face cut by the picture's edge, as in a close-up portrait whose chin or forehead runs
        off it. On whole portrait photos with a mask over the mouth one look misses about one
        face in a hundred; a 0.25 border finds most of them, the 0.1 and 0.4 borders the faces
        that fill the photo. Where the best face found scores under ``RECHECK_BELOW``, a look
        inside the first border may find the face around it (``_enclosing_first``). A found face
        can lie partly outside the image. Video frames get one look (another on every frame
        without a face would multiply the detection cost of footage without faces)."""
        faces = self.detect([image])[0]
        if faces and max(f.score for f in faces) < self.RECHECK_BELOW:
            faces = _enclosing_first(faces, self.detect([image], border=self.RETRY_BORDERS[0])[0])
        for border in self.RETRY_BORDERS:
            if faces:
                break
            faces = self.detect([image], border=border)[0]
        return faces

    def _faces(self, boxes, probs, points, inv: float, pad: int = 0, floor: float | None = None) -> list[Face]:
        floor = self.min_score if floor is None else floor
        boxes = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - pad) * inv
        points = (np.asarray(points, dtype=np.float64).reshape(-1, 5, 2) - pad) * inv
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        faces = []
        for box, lm, p in zip(boxes, points, probs):
            if p < floor or (box[2] - box[0]) < self.min_face * 0.8:
                continue
            faces.append(Face(box=box, landmarks=lm, score=float(p)))
        if self.max_overlap < 1.0:
            faces = _drop_overlapping(faces, self.max_overlap)
        faces.sort(key=lambda f: -f.width)
        return faces


def _enclosing_first(faces: list[Face], again: list[Face]) -> list[Face]:
    """``faces`` with each face of ``again`` (a second look) that holds most of the box of one
    or more of them, 1.3 times wider, in their place. MTCNN with the lenient thresholds of
    ``FaceDetector.MASKED`` can take an eye and brow for a face, score it under 0.95 and miss
    the face around it, which a look inside a grey border finds (masked close-up portraits)."""
    for g in again:
        held = [f for f in faces if g.width > 1.3 * f.width and _inside(f.box, g.box) > 0.5]
        if held:
            faces = [f for f in faces if not any(f is h for h in held)] + [g]
    return sorted(faces, key=lambda f: -f.width)


def _inside(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of box ``a``'s area inside box ``b``."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / max(1e-6, (a[2] - a[0]) * (a[3] - a[1]))


def _drop_overlapping(faces: list[Face], max_overlap: float) -> list[Face]:
    """Faces by falling score, without those whose box lies more than ``max_overlap`` (fraction
    of its own area) inside the box of a face already kept."""
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: -f.score):
        if all(_inside(f.box, k.box) <= max_overlap for k in kept):
            kept.append(f)
    return kept


def _rgb(frame: np.ndarray) -> np.ndarray:
    """MTCNN wants 3-channel RGB: expand grayscale, drop alpha."""
    if frame.ndim == 2:
        return np.repeat(frame[..., None], 3, axis=2)
    if frame.shape[2] == 4:
        return frame[..., :3]
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    return frame
