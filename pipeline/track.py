"""Faces across video frames: IoU association, short-gap filling, landmark smoothing.

``FaceTracker`` is fed detections frame by frame (``add``) and hands back frames whose faces are
final (``pop_ready``): a frame is final once the tracker has seen ``lookahead`` frames after it,
enough to fill gaps up to ``max_gap`` frames and to smooth landmarks with a Gaussian over
``radius`` frames on both sides (the window KEEP uses for video). Memory stays bounded by the
lookahead, however long the video.

Association is greedy by IoU between a detection and the track's box, taken both where the
track last was and where its last two detections' velocity puts it now (a face 90 px wide that
moves 35 px a frame overlaps its box of two frames before by IoU 0.14 only), confident
detections (``confirm_score``) first. Detections and tracks still unpaired then pair by centre
distance (at most half a box width per frame of gap, widths within 1.5x), so that a fast face
keeps its track across a detection gap; a weak detection only near where the track's motion puts
it (``WEAK_STEP``).

Detections may come with scores below the detector's own bar (``FaceDetector.track_score``):
such a face is handed back only where its track holds a detection scoring at least
``confirm_score`` within ``lookahead`` frames of it, so a face whose score dips for a few frames
(a turned head, motion blur, a mask) stays restored, and a weak box that no confident detection
backs is dropped. A track detected on one frame only, where the detector also looked at other
frames within ``lookahead`` of it and did not find it again, is dropped too (``repeat``): a real
face stays in view longer than a frame, and such a one-frame box is a pattern on a jacket or a
wall (unmask painted a mouth there). The window is bounded, so a range cut out of a longer video
(with ``lookahead`` frames of context each side) decides as the whole video does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .faces import Face


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _centre_distance(a: np.ndarray, b: np.ndarray, gap: int) -> float:
    """Distance of the box centres in widths of ``a`` per frame of ``gap``; inf when the sizes
    differ by more than 1.5x."""
    wa, wb = a[2] - a[0], b[2] - b[0]
    if wa <= 0 or wb <= 0 or max(wa, wb) > 1.5 * min(wa, wb):
        return float("inf")
    d = np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
    return float(d / (wa * max(1, gap)))


def same_faces(a: list[Face], b: list[Face], gap: int, min_iou: float = 0.25) -> bool:
    """True when ``b`` (faces ``gap`` frames after ``a``) are the faces of ``a``, moved: each
    face of one pairs with one of the other (IoU >= ``min_iou``, else centre distance as the
    tracker allows). False means a face appeared or vanished in between."""
    vanished, appeared = changed_faces(a, b, gap, min_iou)
    return not vanished and not appeared


def changed_faces(a: list[Face], b: list[Face], gap: int, min_iou: float = 0.25) -> tuple[list[Face], list[Face]]:
    """The faces of ``a`` with no partner in ``b`` (vanished) and of ``b`` with none in ``a``
    (appeared), ``b`` being ``gap`` frames after ``a``; pairs as in ``same_faces``."""
    pairs = sorted(((iou(f.box, g.box), fi, gi) for fi, f in enumerate(a) for gi, g in enumerate(b)),
                   reverse=True)
    used_a, used_b = set(), set()
    for score, fi, gi in pairs:
        if score >= min_iou and fi not in used_a and gi not in used_b:
            used_a.add(fi)
            used_b.add(gi)
    near = sorted((_centre_distance(a[fi].box, b[gi].box, gap), fi, gi)
                  for fi in range(len(a)) if fi not in used_a for gi in range(len(b)) if gi not in used_b)
    for d, fi, gi in near:
        if d <= 0.5 and fi not in used_a and gi not in used_b:
            used_a.add(fi)
            used_b.add(gi)
    return ([f for fi, f in enumerate(a) if fi not in used_a], [g for gi, g in enumerate(b) if gi not in used_b])


def gap_regions(prev: tuple[int, list[Face]] | None, index: int, faces: list[Face], first_gap: int,
                width: int, height: int, min_score: float = 0.0) -> list[tuple[int, int, int, int]]:
    """Where to search the undetected frames ``first_gap..index-1`` that lie between the
    detected frame ``prev`` (index, faces; None: the range's first detected frame) and frame
    ``index`` with ``faces``: around each face that appeared or vanished between the two
    (``changed_faces``, ``search_regions``); none when the faces are the same. A range's first
    detected frame has nothing before it: each of its faces may have been there before. Only a
    face scoring ``min_score`` or more asks for a search (a weak one that comes and goes does
    not); a face of either frame pairs with any of the other, weak ones included."""
    if prev is None:
        vanished, appeared, span = [], faces, index - first_gap + 1
    else:
        vanished, appeared = changed_faces(prev[1], faces, index - prev[0])
        span = index - prev[0]
    return search_regions([f for f in vanished + appeared if f.score >= min_score], span, width, height)


def search_regions(faces: list[Face], gap: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Where to look for ``faces`` (each appeared or vanished) in the frames of a ``gap``-frame
    stretch: its box widened on every side by half its width per frame of the gap (as far as the
    tracker lets a face move) and half a width more (the detector's context), in the frame."""
    out = []
    for f in faces:
        x0, y0, x1, y1 = (float(v) for v in f.box)
        m = (x1 - x0) * (0.5 + 0.5 * gap)
        out.append((max(0, int(x0 - m)), max(0, int(y0 - m)), min(width, int(np.ceil(x1 + m))),
                    min(height, int(np.ceil(y1 + m)))))
    return [r for r in out if r[2] > r[0] and r[3] > r[1]]


@dataclass
class _Track:
    id: int
    faces: dict[int, Face] = field(default_factory=dict)  # frame index -> face (detected/filled)
    last: int = -1
    velocity: np.ndarray | None = None  # box change per frame between the last two detections

    def last_box(self) -> np.ndarray:
        return self.faces[self.last].box

    def predicted_box(self, index: int) -> np.ndarray:
        box = self.last_box()
        return box if self.velocity is None else box + self.velocity * (index - self.last)


# How far from where its track's motion puts it a weak detection (below ``confirm_score``) may
# be and still continue the track without overlapping it: a fifth of its width per frame of the
# gap, against half a width for a confident one. A masked face looking down is missed for a few
# frames while the detector finds a weak box on the hair above it, a width away: followed, that
# box took the track (and the paint) off the face.
WEAK_STEP = 0.2


class FaceTracker:
    """Streaming tracker. ``add(i, faces)`` for consecutive frames, then ``pop_ready()``."""

    def __init__(self, *, max_gap: int = 5, radius: int = 3, sigma: float = 1.5,
                 min_iou: float = 0.25, first: int = 0, confirm_score: float = 0.0,
                 repeat: bool = True) -> None:
        self.max_gap = max_gap
        self.confirm_score = confirm_score
        self.repeat = repeat
        self._looked: set[int] = set()  # frames run through the detector (whole or searched)
        self.radius = radius
        self.sigma = sigma
        self.min_iou = min_iou
        self.lookahead = max(max_gap + 1, radius)
        self._tracks: list[_Track] = []
        self._next_id = 0
        self._seen = first - 1  # last frame added
        self._emitted = first - 1  # last frame handed back
        self._weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)

    def add(self, index: int, faces: list[Face] | None) -> None:
        """Detections of frame ``index``; None when the frame was not run through the detector
        (its faces are then interpolated between the detected frames around it)."""
        assert index == self._seen + 1, f"frames must be added in order: got {index} after {self._seen}"
        self._seen = index
        if faces is None:
            return
        self._looked.add(index)
        live = [t for t in self._tracks if index - t.last <= self.max_gap + 1]
        pairs = self._pairs(index, live, faces)
        for ti, fi in pairs:
            self._extend(live[ti], index, faces[fi])
        used_f = {fi for _, fi in pairs}
        for fi, f in enumerate(faces):
            if fi not in used_f:
                t = _Track(self._next_id)
                self._next_id += 1
                self._extend(t, index, f)
                self._tracks.append(t)

    def _pairs(self, index: int, live: list[_Track], faces: list[Face]) -> list[tuple[int, int]]:
        """(track, face) pairs: greedy by IoU (last or predicted box), confident detections
        (``confirm_score``) before weak ones, then by centre distance. Where the detector finds
        two boxes on one head (a masked face looking down: its lower face and, weakly, the eyes
        and hair above), the track keeps the confident one."""
        scored = sorted(
            ((f.score >= self.confirm_score, overlap, ti, fi)
             for ti, t in enumerate(live) for fi, f in enumerate(faces)
             for overlap in [max(iou(t.last_box(), f.box), iou(t.predicted_box(index), f.box))]
             if overlap >= self.min_iou),
            reverse=True,
        )
        used_t, used_f, out = set(), set(), []
        for _, _, ti, fi in scored:
            if ti in used_t or fi in used_f:
                continue
            used_t.add(ti)
            used_f.add(fi)
            out.append((ti, fi))
        near = sorted(
            (d, ti, fi) for ti, t in enumerate(live) if ti not in used_t
            for fi, f in enumerate(faces) if fi not in used_f
            for d in [_centre_distance(t.predicted_box(index), f.box, index - t.last)]
            if d <= (0.5 if f.score >= self.confirm_score else WEAK_STEP)
        )
        for d, ti, fi in near:
            if ti in used_t or fi in used_f:
                continue
            used_t.add(ti)
            used_f.add(fi)
            out.append((ti, fi))
        return out

    def _extend(self, t: _Track, index: int, face: Face) -> None:
        if t.last >= 0 and 1 < index - t.last <= self.max_gap + 1:
            a, b = t.faces[t.last], face
            n = index - t.last
            for k in range(1, n):  # linear interpolation over the gap
                w = k / n
                t.faces[t.last + k] = Face(
                    box=(1 - w) * a.box + w * b.box,
                    landmarks=(1 - w) * a.landmarks + w * b.landmarks,
                    score=min(a.score, b.score), track=t.id, interpolated=True,
                )
        if t.last >= 0:
            t.velocity = (face.box - t.faces[t.last].box) / (index - t.last)
        face.track = t.id
        t.faces[index] = face
        t.last = index

    def pop_ready(self, final: bool = False) -> list[tuple[int, list[Face]]]:
        """Frames whose faces can no longer change, with smoothed landmarks, in order."""
        upto = self._seen if final else self._seen - self.lookahead
        out = []
        for i in range(self._emitted + 1, upto + 1):
            out.append((i, self._smoothed(i)))
            self._emitted = i
        self._forget(self._emitted - self.lookahead)
        return out

    def _confirmed(self, t: _Track, i: int) -> bool:
        """Whether track ``t`` holds a detection scoring ``confirm_score`` or more within
        ``lookahead`` frames of frame ``i``, and (``repeat``) a second detection there unless
        the detector looked at no other frame in that window."""
        near = [k for k, g in t.faces.items() if not g.interpolated and abs(k - i) <= self.lookahead]
        if not any(t.faces[k].score >= self.confirm_score for k in near):
            return False
        if not self.repeat or len(near) > 1:
            return True
        # found once: kept only where the detector looked at no other frame near it
        return not any(k in self._looked and k != near[0] for k in range(i - self.lookahead, i + self.lookahead + 1))

    def _smoothed(self, i: int) -> list[Face]:
        faces = []
        for t in self._tracks:
            f = t.faces.get(i)
            if f is None or not self._confirmed(t, i):
                continue
            acc = np.zeros((5, 2))
            wsum = 0.0
            for k, w in zip(range(i - self.radius, i + self.radius + 1), self._weights):
                g = t.faces.get(k)
                if g is not None:
                    acc += w * g.landmarks
                    wsum += w
            faces.append(Face(box=f.box, landmarks=acc / wsum, score=f.score, track=t.id,
                              interpolated=f.interpolated))
        return faces

    def _forget(self, before: int) -> None:
        keep = []
        for t in self._tracks:
            for k in [k for k in t.faces if k < before]:
                del t.faces[k]
            if t.faces:
                keep.append(t)
        self._tracks = keep
        self._looked = {k for k in self._looked if k >= before}
