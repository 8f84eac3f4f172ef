"""Decode a range of frames as I420 arrays in presentation order."""
from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from ..errors import CorruptInput
from .colour import source_range
from .probe import VideoPlan, _open

log = logging.getLogger(__name__)


def iter_frames(vplan: VideoPlan, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode frames ``start <= index < stop`` as (index, I420 array) in presentation order.

    Seeks to a keyframe at or before ``start`` and drops the frames before it. Raises
    CorruptInput when the data cannot be decoded or frames are missing.

    A seek is asked for by the keyframe's own timestamp, never the start frame's: containers
    that index by decode time (MP4 with B-frames, MPEG-PS) would otherwise land on the keyframe
    just after ``start``. A seek that still lands wrong (the first frame is past ``start``, or
    its timestamp is not one the plan saw, as MPEG program streams can give after a seek) is
    tried once from the keyframe before, then the range is decoded from the first frame, so
    a queued segment gets exactly the frames a single pass would.
    """
    stop = vplan.frames if stop is None else min(stop, vplan.frames)
    if start >= stop:
        return
    path = Path(vplan.path)
    seeks: list[int | None] | None = None
    n = 0
    while seeks is None or n < len(seeks):
        with _open(path) as c:  # each try on a fresh demuxer: "from the first frame" is exact
            v = c.streams.video[0]
            v.thread_type = "AUTO"
            # AVI stores no presentation times: its packets are numbered in decode order, and
            # with B-frames the decoder hands those numbers out of order. Frames come out in
            # presentation order all the same, so they are counted from the first one. After a
            # seek that first one is a keyframe whose number is its place only in a closed GOP,
            # which a stream with B-frames need not have (MPEG-4 ASP): such a file is decoded
            # from its first frame.
            counted = vplan.counted or "avi" in c.format.name.split(",")
            if seeks is None:
                # a deinterlaced frame is made with its neighbours': start a frame earlier
                keys = [k for k in vplan.keyframes if 0 < k <= start - vplan.interlaced][-2:]
                if counted and v.codec_context.has_b_frames:
                    keys = []
                seeks = [vplan.pts[k] for k in reversed(keys)] + [None]
            target = seeks[n]
            n += 1
            if target is not None:
                try:
                    c.seek(target, stream=v, backward=True, any_frame=False)
                except av.error.FFmpegError:  # a demuxer that cannot seek (FLV without an index)
                    log.debug("%s: cannot seek; decoding from the first frame", path)
                    seeks[n:-1] = []
                    continue
            if (yield from _decode(c, v, vplan, path, start, stop, counted, strict=n == len(seeks))):
                return
        log.debug("%s: the seek for frame %d landed wrong; trying further back", path, start)


def _decode(c, v, vplan: VideoPlan, path: Path, start: int, stop: int, counted: bool, *, strict: bool):
    """Yield frames ``start..stop`` from where the container is; return True when done. A
    non-strict call returns False, having yielded nothing, when the first frame it meets is
    past ``start`` or has a timestamp the plan did not see, or no frame comes at all (the seek
    landed wrong)."""
    index = {p: i for i, p in enumerate(vplan.pts)}
    expected = start
    counter = 0 if vplan.counted else None  # such a plan is always decoded from its first frame
    try:
        for frame in _frames(c, v, vplan):
            i = index.get(frame.pts) if counter is None else counter
            if counted and i is not None:
                counter = i + 1
            if not strict and expected == start and (i is None or i > start):
                return False
            if i is None:
                log.warning("%s: frame with pts %s not seen in the plan; dropped", path, frame.pts)
                continue
            if i < start:
                continue
            if i >= stop:
                break
            if i != expected:
                raise CorruptInput(f"{path}: frame {expected} is missing (decoder gave frame {i})")
            expected += 1
            yield i, to_i420(frame, vplan)
    except av.error.FFmpegError as e:
        raise CorruptInput(f"{path}: cannot decode frame {expected} ({e})") from None
    if expected == start and not strict:  # the seek landed past every frame asked for
        return False
    if expected != stop:
        raise CorruptInput(f"{path}: truncated: decoded {expected - start} of {stop - start} frames")
    return True


# yadif, one frame out per frame in, field order from each frame (top first where unflagged);
# deint: only the frames flagged interlaced, or every frame (``VideoPlan.deinterlace_all``)
DEINTERLACE = "mode=send_frame:parity=auto:deint={}"


def _frames(c, v, vplan: VideoPlan) -> Iterator[av.VideoFrame]:
    """The stream's frames in presentation order; an interlaced source's deinterlaced.

    Each output frame is built from its own fields and its neighbours' (the filter hands a
    frame on once the next one is in), so a segment, which decodes from a keyframe before its
    context frames, gets the same pixels as a single pass."""
    if not vplan.interlaced:
        yield from c.decode(v)
        return
    graph = av.filter.Graph()
    src = graph.add_buffer(template=v)
    deint = graph.add("yadif", DEINTERLACE.format("all" if vplan.deinterlace_all else "interlaced"))
    sink = graph.add("buffersink")
    src.link_to(deint)
    deint.link_to(sink)
    graph.configure()

    pts: deque = deque()  # one frame out per frame in, in order: each keeps its source pts
    # (the filter counts time in half frames)

    def drain():
        while True:
            try:
                out = sink.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            out.pts = pts.popleft()
            yield out

    for frame in c.decode(v):
        pts.append(frame.pts)
        src.push(frame)
        yield from drain()
    src.push(None)
    yield from drain()


def to_i420(frame: av.VideoFrame, vplan: VideoPlan) -> np.ndarray:
    """The frame as an I420 array of the plan's even output size.

    Other pixel formats (4:2:2, 4:4:4, 10-bit, yuvj) are converted to yuv420p by FFmpeg in the
    source's own range: a full-range source stays full range, and the plan's colour description
    keeps saying so (``source_range``), so the output is tagged as its values are. An odd-sized
    frame is padded in YUV itself (its last row and column repeated; its chroma planes already
    have the padded size), so no colour conversion touches it."""
    w, h = frame.width, frame.height
    if frame.format.name != "yuv420p":
        code = source_range(frame) or None
        frame = frame.reformat(format="yuv420p", src_color_range=code, dst_color_range=code)
    if w % 2 == 0 and h % 2 == 0:
        return frame.to_ndarray()
    ew, eh = w + w % 2, h + h % 2

    def plane(k: int, pw: int, ph: int) -> np.ndarray:
        p = frame.planes[k]
        return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:ph, :pw]

    y = cv2.copyMakeBorder(plane(0, w, h), 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    u, v = plane(1, ew // 2, eh // 2), plane(2, ew // 2, eh // 2)
    return np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(-1, ew)
