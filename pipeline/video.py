"""Restore the faces of one frame range of a video into a video-only part file.

``process_range`` is the unit of work both modes share: the embedded job runs it once over the
whole video, a distributed job runs it once per segment. It decodes the range plus ``context``
frames on each side (detected and tracked, never written) so that landmark smoothing and gap
filling at a segment's edges see the same neighbours as a single pass would. Decoding and
encoding run in threads of their own behind bounded queues (``io_queue``), overlapping the
detector and the restorer; frames keep their order and errors reach the caller.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Cancelled
from .faces import FaceDetector
from .media import EncoderSettings, VideoEncoder, VideoPlan, add_rgb_delta, i420_to_rgb, iter_frames
from .restore import FaceRestorer
from .track import FaceTracker, same_faces

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
    detected: int = 0  # frames run through the detector (context frames included)
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


class _Prefetch:
    """Runs ``iter_frames`` in a thread that keeps up to ``size`` decoded frames ready in a
    bounded queue (PyAV decodes with the GIL released). Iterating gives the same items in the
    same order; an error in the thread is raised here; ``close`` stops the thread early."""

    _END = object()

    def __init__(self, vplan: VideoPlan, first: int, last: int, size: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(vplan, first, last),
                                        name="facemend-decode", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, vplan: VideoPlan, first: int, last: int) -> None:
        frames = iter_frames(vplan, first, last)
        try:
            for item in frames:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
        finally:
            frames.close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Writer:
    """Hands frames to ``enc.write`` in order, in a thread behind a bounded queue when
    ``size`` > 0 (PyAV encodes with the GIL released), else at once. An encoder error is raised
    by the next ``write`` or by ``finish``."""

    _END = object()

    def __init__(self, enc: VideoEncoder, size: int) -> None:
        self.enc = enc
        self._error: BaseException | None = None
        self._closing = False
        self._thread = None
        if size > 0:
            self._q: queue.Queue = queue.Queue(maxsize=size)
            self._thread = threading.Thread(target=self._run, name="facemend-encode", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if self._error is None and not self._closing:
                try:
                    self.enc.write(*item)
                except BaseException as e:
                    self._error = e  # keep draining so that the producer never blocks

    def write(self, index: int, yuv: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self.enc.write(index, yuv)
        else:
            self._q.put((index, yuv))

    def finish(self) -> None:
        """Wait until every frame is written; raise the encoder's error if there was one."""
        if self._thread is not None:
            self._q.put(self._END)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread, dropping frames not written yet (after an error elsewhere)."""
        if self._thread is not None:
            self._closing = True
            self._q.put(self._END)
            self._thread.join()
            self._thread = None


@dataclass
class _Failure:
    error: BaseException


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
    io_queue: int = 8,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> RangeStats:
    """Restore frames ``start <= i < stop`` of the video into ``part`` (renamed when complete).

    detect_every: run the detector on every k-th frame (by absolute index, so segments and a
    single pass pick the same frames) and on the last frame; faces in between come from the
    tracker's interpolation, unless the faces of two such frames differ (one appeared or
    vanished, ``track.same_faces``): then the frames between them are detected too, so that a
    face is restored from its first frame to its last. The decision depends on those two
    frames' detections only, so segments and a single pass make the same one. Must stay within
    the tracker's gap limit. detect_batch: frames per detector call (the frames detected;
    about detect_batch * detect_every frames are decoded ahead).

    io_queue: frames decoded ahead and frames waiting for the encoder, each in its own thread
    behind a queue of this many frames (0: decode and encode in this thread).
    """
    if not 1 <= detect_every <= FaceTracker().max_gap + 1:
        raise ValueError(f"detect_every={detect_every} must be between 1 and {FaceTracker().max_gap + 1}")
    stop = vplan.frames if stop is None else min(stop, vplan.frames)
    ctx = FaceTracker().lookahead if context is None else context
    tracker = FaceTracker(first=max(0, start - ctx))
    first, last = max(0, start - ctx), min(vplan.frames, stop + ctx)
    stats = RangeStats(start=start, stop=stop)
    reset = getattr(restorer, "reset", None)
    if reset is not None:  # per-video state (the last frame's output, smoothed codes) starts anew
        reset()
    clock = _Clock(stats.stages)
    t0 = time.perf_counter()
    pending: dict[int, np.ndarray] = {}  # frame index -> I420, awaiting final faces
    matrix = vplan.yuv_matrix  # faces are read and written back in the clip's own colours

    def chosen(i: int) -> bool:
        return i % detect_every == 0 or i == vplan.frames - 1

    with VideoEncoder(part, vplan, settings) as enc:
        writer = _Writer(enc, io_queue)

        def finish(ready):
            idx = [i for i, _ in ready if start <= i < stop]
            faces = {i: fs for i, fs in ready}
            with_faces = [i for i in idx if faces[i]]
            rgbs = [i420_to_rgb(pending[i], matrix) for i in with_faces]
            with clock("restore"):
                deltas = restorer.deltas(rgbs, [faces[i] for i in with_faces], frames=with_faces)
            with clock("paste"):
                for i, ds in zip(with_faces, deltas):
                    for rect, d in ds:
                        add_rgb_delta(pending[i], rect, d, matrix)
            with clock("encode"):
                for i in idx:
                    writer.write(i, pending[i])
            for i, _ in ready:
                pending.pop(i, None)
            stats.frames += len(idx)
            stats.frames_with_faces += len(with_faces)
            stats.faces += sum(len(faces[i]) for i in with_faces)
            if progress and idx:
                progress(len(idx))

        def detect(items: list[tuple[int, np.ndarray]]) -> None:
            if items:
                stats.detected += len(items)
                with clock("detect"):
                    found.update(zip([i for i, _ in items],
                                     detector.detect([i420_to_rgb(yuv, matrix) for _, yuv in items])))

        def add(items: list[tuple[int, np.ndarray]]) -> None:
            for i, yuv in items:
                pending[i] = yuv
                tracker.add(i, found.pop(i, None))

        waiting: list[tuple[int, np.ndarray]] = []  # decoded, not yet given to the tracker
        found: dict[int, list] = {}  # detections of waiting frames
        prev: tuple[int, list] | None = None  # the last detected frame and its faces
        frames = _Prefetch(vplan, first, last, io_queue) if io_queue > 0 else iter_frames(vplan, first, last)
        try:
            ended = False
            while not ended:
                new: list[tuple[int, np.ndarray]] = []
                ended = True
                with clock("decode"):
                    n = 0
                    for item in frames:
                        new.append(item)
                        n += chosen(item[0])
                        if n == detect_batch:
                            ended = False
                            break
                if not new:
                    break
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"{vplan.path}: cancelled at frame {new[0][0]}")
                waiting += new
                detect([(i, yuv) for i, yuv in new if chosen(i)])
                # frames between two detected frames whose faces differ are detected too
                refine: list[tuple[int, np.ndarray]] = []
                gap: list[tuple[int, np.ndarray]] = []
                for i, yuv in waiting:
                    if i not in found:
                        gap.append((i, yuv))
                        continue
                    if gap and not (same_faces(prev[1], found[i], i - prev[0]) if prev else not found[i]):
                        refine += gap
                    prev, gap = (i, found[i]), []
                detect(refine)
                # hand the tracker every frame up to the last detected one; frames after it
                # wait for the next detected frame (their faces are not known before)
                k = max((k for k, (i, _) in enumerate(waiting) if i in found), default=-1)
                add(waiting[: k + 1])
                del waiting[: k + 1]
                finish(tracker.pop_ready())
            add(waiting)  # after the range's last detected frame: context frames only
            finish(tracker.pop_ready(final=True))
            with clock("encode"):
                writer.finish()
        finally:
            frames.close()
            writer.close()  # on an error: stop the thread before the encoder is aborted
        if stats.frames != stop - start:
            raise RuntimeError(f"{vplan.path}: wrote {stats.frames} frames for range {start}..{stop}")
    stats.seconds = time.perf_counter() - t0
    return stats
