"""Restore the faces of one frame range of a video into a video-only part file.

``process_range`` is the unit of work both modes share: the embedded job runs it once over the
whole video, a distributed job runs it once per segment. It decodes the range plus ``context``
frames on each side (detected and tracked, never written) so that landmark smoothing and gap
filling at a segment's edges see the same neighbours as a single pass would.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Cancelled
from .faces import FaceDetector
from .media import EncoderSettings, VideoEncoder, VideoPlan, add_rgb_delta, i420_to_rgb, iter_frames
from .restore import FaceRestorer
from .track import FaceTracker

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of frames finished since last call
CancelCheck = Callable[[], bool]


@dataclass
class RangeStats:
    """What one range produced; JSON-serialisable."""

    start: int
    stop: int
    frames: int = 0
    faces: int = 0
    frames_with_faces: int = 0
    seconds: float = 0.0
    stages: dict = field(default_factory=lambda: dict.fromkeys(
        ("decode", "detect", "restore", "paste", "encode"), 0.0))


class _Clock:
    def __init__(self, stages: dict) -> None:
        self.stages = stages

    def __call__(self, name: str):
        clock = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.stages[name] += time.perf_counter() - self.t

        return _T()


def process_range(
    vplan: VideoPlan,
    part: Path,
    *,
    detector: FaceDetector,
    restorer: FaceRestorer,
    settings: EncoderSettings,
    start: int = 0,
    stop: int | None = None,
    context: int | None = None,
    detect_batch: int = 8,
    detect_every: int = 1,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> RangeStats:
    """Restore frames ``start <= i < stop`` of the video into ``part`` (renamed when complete).

    detect_every: run the detector on every k-th frame (by absolute index, so segments and a
    single pass pick the same frames) and on the last frame; faces in between come from the
    tracker's interpolation. Must stay within the tracker's gap limit.
    """
    if not 1 <= detect_every <= FaceTracker().max_gap + 1:
        raise ValueError(f"detect_every={detect_every} must be between 1 and {FaceTracker().max_gap + 1}")
    stop = vplan.frames if stop is None else min(stop, vplan.frames)
    ctx = FaceTracker().lookahead if context is None else context
    tracker = FaceTracker(first=max(0, start - ctx))
    first, last = max(0, start - ctx), min(vplan.frames, stop + ctx)
    stats = RangeStats(start=start, stop=stop)
    clock = _Clock(stats.stages)
    t0 = time.perf_counter()
    pending: dict[int, np.ndarray] = {}  # frame index -> I420, awaiting final faces
    with VideoEncoder(part, vplan, settings) as enc:

        def finish(ready):
            idx = [i for i, _ in ready if start <= i < stop]
            faces = {i: fs for i, fs in ready}
            with_faces = [i for i in idx if faces[i]]
            rgbs = [i420_to_rgb(pending[i]) for i in with_faces]
            with clock("restore"):
                deltas = restorer.deltas(rgbs, [faces[i] for i in with_faces])
            with clock("paste"):
                for i, ds in zip(with_faces, deltas):
                    for rect, d in ds:
                        add_rgb_delta(pending[i], rect, d)
            with clock("encode"):
                for i in idx:
                    enc.write(i, pending[i])
            for i, _ in ready:
                pending.pop(i, None)
            stats.frames += len(idx)
            stats.frames_with_faces += len(with_faces)
            stats.faces += sum(len(faces[i]) for i in with_faces)
            if progress and idx:
                progress(len(idx))

        batch: list[tuple[int, np.ndarray]] = []
        frames = iter_frames(vplan, first, last)
        while True:
            with clock("decode"):
                for i, yuv in frames:
                    batch.append((i, yuv))
                    if len(batch) == detect_batch:
                        break
            if not batch:
                break
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"{vplan.path}: cancelled at frame {batch[0][0]}")
            chosen = [k for k, (i, _) in enumerate(batch) if i % detect_every == 0 or i == vplan.frames - 1]
            with clock("detect"):
                found = detector.detect([i420_to_rgb(batch[k][1]) for k in chosen])
            per_frame: list = [None] * len(batch)
            for k, fs in zip(chosen, found):
                per_frame[k] = fs
            for (i, yuv), fs in zip(batch, per_frame):
                pending[i] = yuv
                tracker.add(i, fs)
            batch = []
            finish(tracker.pop_ready())
        finish(tracker.pop_ready(final=True))
        if stats.frames != stop - start:
            raise RuntimeError(f"{vplan.path}: wrote {stats.frames} frames for range {start}..{stop}")
    stats.seconds = time.perf_counter() - t0
    return stats
