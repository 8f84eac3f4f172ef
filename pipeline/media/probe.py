"""Probe a video once: its streams, frame count, timing, rotation and colour (``plan``)."""
from __future__ import annotations

import bisect
import logging
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av

from ..errors import (CorruptInput, InputNotFound, UnsupportedInput)
from .colour import YuvMatrix, source_range, yuv_matrix

log = logging.getLogger(__name__)


VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".wmv", ".flv", ".3gp", ".3g2", ".vob", ".divx", ".asf",
                    ".ogv", ".dv", ".mxf", ".f4v"}


DEINTERLACE_MODES = ("auto", "all", "off")  # --deinterlace (``VideoPlan.deinterlaced``)


@dataclass
class VideoPlan:
    """What one demux pass learns about a video; JSON-serialisable (``asdict``)."""

    path: str
    width: int  # coded width of the source
    height: int
    out_width: int  # even dimensions the encoder receives (source padded by at most 1 px)
    out_height: int
    time_base: str  # "num/den" of the video stream
    rate: str  # average frame rate "num/den"
    pts: list[int]  # presentation timestamps of every frame, ascending
    keyframes: list[int]  # frame indices that start a GOP (seek points)
    duration_s: float
    rotation: int  # display rotation in degrees (from the display matrix)
    codec: str
    audio_streams: int
    other_streams: int
    # the source's colour description (AVColorPrimaries/TRC/Space/Range codes), copied to the
    # output so players decode its YUV as they did the source's (0 or 2: unspecified)
    color: dict = field(default_factory=dict)
    interlaced: bool = False  # the first frame is interlaced: frames are deinterlaced on decode
    # every frame goes through the deinterlacer, flagged interlaced or not (``deinterlaced``)
    deinterlace_all: bool = False
    sar: str = ""  # sample (pixel) aspect ratio "num/den" where not square (anamorphic DVD, DV)
    # the demuxer gave a frame's pts twice (it guesses the pts of MPEG program stream packets
    # that carry none): frames are numbered by their order out of the decoder, from the first
    # frame on, and ``pts`` are the first frame's spaced by the frame rate
    counted: bool = False

    def deinterlaced(self, mode: str) -> "VideoPlan":
        """The plan as ``--deinterlace`` asks: ``auto`` deinterlaces the frames flagged interlaced
        when the first one is; ``all`` every frame (a source whose flags were lost: unflagged
        frames are taken as top field first); ``off`` none (a progressive source flagged
        interlaced)."""
        if mode not in DEINTERLACE_MODES:
            raise ValueError(f"deinterlace must be one of {', '.join(DEINTERLACE_MODES)}, got {mode!r}")
        if mode == "auto":
            return self
        return replace(self, interlaced=mode == "all", deinterlace_all=mode == "all")

    @property
    def frames(self) -> int:
        return len(self.pts)

    @property
    def pixel_aspect(self) -> float:
        """A pixel's width over its height as shown (``sar``; 1 for square pixels)."""
        return float(Fraction(self.sar)) if self.sar else 1.0

    @property
    def fps(self) -> float:
        return float(Fraction(self.rate)) if self.rate else 0.0

    @property
    def yuv_matrix(self) -> "YuvMatrix":
        """The Y'CbCr -> RGB matrix and range its frames are read and written back with."""
        return yuv_matrix(self.color, self.height)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoPlan":
        return cls(**d)


def _restart(path: Path, frame: int, before: Fraction, after: Fraction) -> str:
    """The error for a video whose timeline starts again (``cat a.mpg b.mpg``, a spliced
    broadcast capture): frames are placed by their timestamps, and these repeat."""
    return (f"{path}: timestamps restart at frame {frame} ({float(before):.2f} s, then "
            f"{float(after):.2f} s): a spliced or concatenated stream; process its parts one by one")


def is_video_path(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise InputNotFound(f"{path}: no such file")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise UnsupportedInput(f"{path}: not a readable video (invalid data, or truncated)") from None
    except av.error.FFmpegError as e:
        raise UnsupportedInput(f"{path}: cannot open as video ({e.strerror or e})") from None


def plan(path: str | Path) -> VideoPlan:
    """Demux the video stream once (no decoding but the first frame): pts, keyframes, checks."""
    path = Path(path)
    with _open(path) as c:
        if not c.streams.video:
            kinds = ", ".join(sorted({s.type for s in c.streams})) or "no streams"
            raise UnsupportedInput(f"{path}: no video stream (has {kinds})")
        v = c.streams.video[0]
        cc = v.codec_context
        if not cc.width or not cc.height:
            raise CorruptInput(f"{path}: video stream has no frame size")
        declared = v.frames
        pts: list[int] = []
        keys: list[int] = []
        last_dur = 0
        packets = 0
        last_dts = None
        try:
            for pkt in c.demux(v):
                if pkt.size == 0:
                    continue
                packets += 1
                if pkt.dts is not None:  # decode times rise; one that falls half a second or more back
                    if last_dts is not None and (last_dts - pkt.dts) * v.time_base >= 0.5:
                        raise UnsupportedInput(_restart(path, packets - 1, last_dts * v.time_base,
                                                        pkt.dts * v.time_base))
                    last_dts = pkt.dts
                if pkt.is_discard:  # before the edit list's start: decoded, never shown
                    continue
                p = pkt.pts if pkt.pts is not None else pkt.dts
                if p is None:
                    p = (pts[-1] + max(last_dur, 1)) if pts else 0
                pts.append(int(p))
                if pkt.is_keyframe:
                    keys.append(int(p))
                last_dur = pkt.duration or last_dur
        except av.error.FFmpegError as e:
            raise CorruptInput(f"{path}: corrupt video data after {len(pts)} frames ({e})") from None
        if not pts:
            raise CorruptInput(f"{path}: video stream has no frames")
        if declared and packets < declared:
            raise CorruptInput(
                f"{path}: truncated: the header declares {declared} frames, {packets} are present"
            )
        pts.sort()
        tb = v.time_base
        rate = v.average_rate or v.guessed_rate or Fraction(25)
        counted = len(set(pts)) < len(pts)
        if counted:  # a pts given twice: positions by pts are ambiguous, seeks too
            step = 1 / (rate * tb)
            pts, keys = [pts[0] + round(i * step) for i in range(len(pts))], []
            log.info("%s: the demuxer repeats frame times; frames are counted, times regular", path)
        index = {p: i for i, p in enumerate(pts)}
        keyframes = sorted(index[k] for k in set(keys) if k in index) or [0]
        if keyframes[0] != 0:
            keyframes.insert(0, 0)
        if not last_dur and len(pts) > 1:
            last_dur = pts[-1] - pts[-2]
        duration = float((pts[-1] + last_dur - pts[0]) * tb)
        others = len(c.streams) - 1 - len(c.streams.audio)
        w, h, codec, audio = cc.width, cc.height, cc.name, len(c.streams.audio)
        sar = v.sample_aspect_ratio or cc.sample_aspect_ratio
        sar = f"{sar.numerator}/{sar.denominator}" if sar and sar > 0 and sar != 1 else ""
    with _open(path) as c:  # anew: some demuxers (FLV without an index) cannot seek back
        rotation, color, interlaced = _first_frame_info(c, c.streams.video[0], path)
    return VideoPlan(
        path=str(path), width=w, height=h, out_width=w + w % 2, out_height=h + h % 2,
        time_base=f"{tb.numerator}/{tb.denominator}", rate=f"{rate.numerator}/{rate.denominator}",
        pts=pts, keyframes=keyframes, duration_s=duration, rotation=rotation,
        codec=codec, audio_streams=audio, other_streams=others, color=color, interlaced=interlaced,
        sar=sar, counted=counted,
    )


COLOR_TAGS = ("color_primaries", "color_trc", "colorspace", "color_range")


def _first_frame_info(c, v, path: Path) -> tuple[int, dict, bool]:
    """Display rotation (degrees), colour description and interlacing of the first decodable
    frame."""
    try:
        for frame in c.decode(v):
            color = {k: int(getattr(frame, k)) for k in COLOR_TAGS}
            color["color_range"] = source_range(frame)  # to_i420 keeps the values in it
            return int(round(frame.rotation or 0)) % 360, color, bool(frame.interlaced_frame)
    except av.error.FFmpegError as e:
        raise CorruptInput(f"{path}: the first video frame cannot be decoded ({e})") from None
    raise CorruptInput(f"{path}: no video frame could be decoded")


def split(vplan: VideoPlan, seconds: float) -> list[tuple[int, int]]:
    """Frame ranges ``[(start, stop), ...]`` covering the video in order: cuts every ``seconds``
    of presentation time, moved to a keyframe when one lies within a quarter segment of the
    target (``process_range`` seeks to the keyframe before a start anyway, so a cut between
    keyframes only costs some extra decoding); a short tail joins the last segment."""
    tb = Fraction(vplan.time_base)
    t = [float((p - vplan.pts[0]) * tb) for p in vplan.pts]
    keys = sorted(set(vplan.keyframes))
    n = vplan.frames
    cuts = [0]
    while True:
        pos = cuts[-1]
        if t[-1] - t[pos] < seconds * 1.5:  # what is left fits one segment
            break
        want = bisect.bisect_left(t, t[pos] + seconds)
        slack = seconds / 4
        near = [k for k in keys if pos < k < n and abs(t[k] - t[want]) <= slack]
        cut = min(near, key=lambda k: abs(t[k] - t[want])) if near else want
        if cut <= pos or cut >= n:
            break
        cuts.append(cut)
    return list(zip(cuts, cuts[1:] + [n]))
