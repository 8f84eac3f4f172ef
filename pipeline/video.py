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
from functools import partial
from pathlib import Path

import numpy as np

from .errors import Cancelled
from .faces import FaceDetector
from .media import (EncoderSettings, RgbView, VideoEncoder, VideoPlan, add_rgb_delta, i420_shape, i420_to_rgb,
                    iter_frames)
from .restore import FaceRestorer
from .track import FaceTracker, gap_regions

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
    searched: int = 0  # frames searched only where a face appeared or vanished (``refine``)
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
    vanished, ``track.changed_faces``): then the frames between them are searched around that
    face (``FaceDetector.detect_regions``), so that it is restored from its first frame to its
    last. The decision and the regions depend on those two frames' detections only, so
    segments and a single pass make the same ones. Must stay within
    the tracker's gap limit. detect_batch: frames per detector call (the frames detected;
    about detect_batch * detect_every frames are decoded ahead).

    io_queue: frames decoded ahead and frames waiting for the encoder, each in its own thread
    behind a queue of this many frames (0: decode and encode in this thread).
    """
    return RangeRun(vplan, part, detector=detector, restorer=restorer, settings=settings, start=start,
                    stop=stop, context=context, detect_batch=detect_batch, detect_every=detect_every,
                    io_queue=io_queue, progress=progress, should_cancel=should_cancel).run()


class RangeRun:
    """One ``process_range``; ``loop`` reads as the steps each batch of frames takes. Frames move
    on in order: decoded into ``waiting`` (their faces are not known before the next detected
    frame), handed to the ``tracker`` with their pixels kept in ``pending`` (the tracker settles
    their faces once it has seen enough frames after them), then restored and written.
    ``found`` holds the detections of waiting frames, ``prev`` the last detected frame and its
    faces."""

    def __init__(self, vplan: VideoPlan, part: Path, *, detector: FaceDetector, restorer: FaceRestorer,
                 settings: EncoderSettings, start: int = 0, stop: int | None = None,
                 context: int | None = None, detect_batch: int = 8, detect_every: int = 1,
                 io_queue: int = 8, progress: Progress | None = None,
                 should_cancel: CancelCheck | None = None) -> None:
        max_every = FaceTracker().max_gap + 1
        if not 1 <= detect_every <= max_every:
            raise ValueError(f"detect_every={detect_every} must be between 1 and {max_every}")
        self.vplan, self.part, self.settings = vplan, part, settings
        self.detector, self.restorer = detector, restorer
        self.detect_batch, self.detect_every, self.io_queue = detect_batch, detect_every, io_queue
        self.progress, self.should_cancel = progress, should_cancel
        self.start = start
        self.stop = vplan.frames if stop is None else min(stop, vplan.frames)
        ctx = FaceTracker().lookahead if context is None else context
        self.first, self.last = max(0, start - ctx), min(vplan.frames, self.stop + ctx)  # frames decoded
        self.tracker = FaceTracker(first=self.first, confirm_score=detector.min_score)
        self.stats = RangeStats(start=start, stop=self.stop)
        self.clock = _Clock(self.stats.stages)
        self.matrix = vplan.yuv_matrix  # faces are read and written back in the clip's own colours
        self.waiting: list[tuple[int, np.ndarray]] = []  # decoded, not yet given to the tracker
        self.found: dict[int, list] = {}  # detections of waiting frames
        self.prev: tuple[int, list] | None = None  # the last detected frame and its faces
        self.pending: dict[int, np.ndarray] = {}  # frame index -> I420, awaiting final faces
        self.source = None  # the decoded frames, in order
        self.writer: _Writer | None = None

    def run(self) -> RangeStats:
        reset = getattr(self.restorer, "reset", None)
        if reset is not None:  # per-video state (the last frame's output, smoothed codes) starts anew
            reset()
        t0 = time.perf_counter()
        with VideoEncoder(self.part, self.vplan, self.settings) as enc:
            self.writer = _Writer(enc, self.io_queue)
            self.source = (_Prefetch(self.vplan, self.first, self.last, self.io_queue) if self.io_queue > 0
                           else iter_frames(self.vplan, self.first, self.last))
            try:
                self.loop()
            finally:
                self.source.close()
                self.writer.close()  # on an error: stop the thread before the encoder is aborted
            if self.stats.frames != self.stop - self.start:
                raise RuntimeError(f"{self.vplan.path}: wrote {self.stats.frames} frames for range "
                                   f"{self.start}..{self.stop}")
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def loop(self) -> None:
        while True:
            new, more = self.decode()
            if not new:
                break
            self.check_cancel(new[0][0])
            self.waiting += new
            self.detect([(i, yuv) for i, yuv in new if self.chosen(i)])
            self.search(self.refine())
            self.hand_over()
            self.restore(self.tracker.pop_ready())
            if not more:
                break
        self.track(self.waiting)  # after the range's last detected frame: context frames only
        self.waiting = []
        self.restore(self.tracker.pop_ready(final=True))
        with self.clock("encode"):
            self.writer.finish()

    def chosen(self, i: int) -> bool:
        """Whether frame ``i`` is detected whatever its neighbours (``detect_every``)."""
        return i % self.detect_every == 0 or i == self.vplan.frames - 1

    def decode(self) -> tuple[list[tuple[int, np.ndarray]], bool]:
        """The next frames, up to the ``detect_batch``-th chosen one; and whether more may follow."""
        new: list[tuple[int, np.ndarray]] = []
        n = 0
        with self.clock("decode"):
            for item in self.source:
                new.append(item)
                n += self.chosen(item[0])
                if n == self.detect_batch:
                    return new, True
        return new, False

    def check_cancel(self, frame: int) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"{self.vplan.path}: cancelled at frame {frame}")

    def detect(self, items: list[tuple[int, np.ndarray]]) -> None:
        """Run the detector on ``items``; their faces go to ``found``."""
        if items:
            self.stats.detected += len(items)
            with self.clock("detect"):
                faces = self.detector.detect([self.detector_rgb(yuv) for _, yuv in items],
                                             floor=self.detector.track_score, shape=i420_shape(items[0][1]))
                self.found.update(zip([i for i, _ in items], faces))

    def search(self, items: list[tuple[int, np.ndarray, list]]) -> None:
        """Run the detector on each frame of ``items`` inside its regions only; the faces go
        to ``found``."""
        if items:
            self.stats.searched += len(items)
            with self.clock("detect"):
                for i, yuv, regions in items:
                    self.found[i] = self.detector.detect_regions(self.detector_rgb(yuv), regions,
                                                                 floor=self.detector.track_score, shape=i420_shape(yuv))

    def detector_rgb(self, yuv: np.ndarray) -> np.ndarray:
        """The frame as the detector looks at it: RGB at ``size_for`` (``i420_to_rgb``)."""
        return i420_to_rgb(yuv, self.matrix, self.detector.size_for(*i420_shape(yuv)))

    def refine(self) -> list[tuple[int, np.ndarray, list]]:
        """The waiting frames not detected yet that lie between two detected frames whose faces
        differ, each with the regions where a face appeared or vanished (``track.gap_regions``):
        they are searched there, so that a face is restored from its first frame to its last.
        The faces both frames share come from the tracker's interpolation, as on any frame
        between two detected ones."""
        refine: list[tuple[int, np.ndarray, list]] = []
        gap: list[tuple[int, np.ndarray]] = []
        for i, yuv in self.waiting:
            if i not in self.found:
                gap.append((i, yuv))
                continue
            if gap:
                regions = gap_regions(self.prev, i, self.found[i], gap[0][0], self.vplan.out_width,
                                      self.vplan.out_height, self.detector.min_score)
                refine += [(j, y, regions) for j, y in gap if regions]
            self.prev, gap = (i, self.found[i]), []
        return refine

    def hand_over(self) -> None:
        """Hand the tracker every waiting frame up to the last detected one; the frames after it
        wait for the next detected frame (their faces are not known before)."""
        k = max((k for k, (i, _) in enumerate(self.waiting) if i in self.found), default=-1)
        self.track(self.waiting[: k + 1])
        del self.waiting[: k + 1]

    def track(self, items: list[tuple[int, np.ndarray]]) -> None:
        for i, yuv in items:
            self.pending[i] = yuv
            self.tracker.add(i, self.found.pop(i, None))

    def restore(self, ready: list[tuple[int, list]]) -> None:
        """Restore the faces of the frames the tracker settled (``pop_ready``) and write those
        in the range; context frames are dropped."""
        idx = [i for i, _ in ready if self.start <= i < self.stop]
        faces = {i: fs for i, fs in ready}
        with_faces = [i for i in idx if faces[i]]
        # a local network reads a window about each head: only those pixels are converted
        rgb = partial(RgbView, matrix=self.matrix) if getattr(self.restorer, "local", False) else \
            partial(i420_to_rgb, matrix=self.matrix)
        rgbs = [rgb(self.pending[i]) for i in with_faces]
        with self.clock("restore"):
            deltas = self.restorer.deltas(rgbs, [faces[i] for i in with_faces], frames=with_faces,
                                          aspect=self.vplan.pixel_aspect)  # anamorphic: faces as shown
        with self.clock("paste"):
            for i, ds in zip(with_faces, deltas):
                for rect, d in ds:
                    add_rgb_delta(self.pending[i], rect, d, self.matrix)
        self.write(idx)
        for i, _ in ready:
            self.pending.pop(i, None)
        self.stats.frames += len(idx)
        self.stats.frames_with_faces += len(with_faces)
        self.stats.faces += sum(len(faces[i]) for i in with_faces)
        if self.progress and idx:
            self.progress(len(idx))

    def write(self, idx: list[int]) -> None:
        with self.clock("encode"):
            for i in idx:
                self.writer.write(i, self.pending[i])
