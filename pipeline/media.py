"""Video I/O with PyAV: plan (one demux pass), decode a frame range, encode parts, join.

A video job is always: ``plan`` -> one or more parts (each ``VideoEncoder`` writes the frames of
one range, video only, with the source pts) -> ``join`` (remuxes the parts and every audio and
subtitle stream of the source into the output). The embedded default is the one-part case of the
distributed one, so both produce the same frame count, timing and audio packets.

Frames travel as I420 arrays (``(H * 3 // 2, W)`` uint8, the layout of PyAV's yuv420p
``to_ndarray``): frames without faces go back to the encoder untouched, and faces are written
back as a YUV delta, so pixels outside faces are exactly what a plain transcode would encode.
"""
from __future__ import annotations

import functools
import heapq
import logging
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from .errors import (CorruptInput, FacemendError, InputNotFound, OutputError, UnsupportedInput, is_output_oserror,
                     output_error)

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                    ".mts", ".m2ts", ".wmv", ".flv", ".3gp"}


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

    @property
    def frames(self) -> int:
        return len(self.pts)

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
        try:
            for pkt in c.demux(v):
                if pkt.size == 0:
                    continue
                packets += 1
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
        index = {p: i for i, p in enumerate(pts)}
        keyframes = sorted(index[k] for k in set(keys) if k in index) or [0]
        if keyframes[0] != 0:
            keyframes.insert(0, 0)
        tb = v.time_base
        rate = v.average_rate or v.guessed_rate or Fraction(25)
        if not last_dur and len(pts) > 1:
            last_dur = pts[-1] - pts[-2]
        duration = float((pts[-1] + last_dur - pts[0]) * tb)
        rotation, color = _first_frame_info(c, v, path)
        others = len(c.streams) - 1 - len(c.streams.audio)
        w, h = cc.width, cc.height
        return VideoPlan(
            path=str(path), width=w, height=h, out_width=w + w % 2, out_height=h + h % 2,
            time_base=f"{tb.numerator}/{tb.denominator}", rate=f"{rate.numerator}/{rate.denominator}",
            pts=pts, keyframes=keyframes, duration_s=duration, rotation=rotation,
            codec=cc.name, audio_streams=len(c.streams.audio), other_streams=others, color=color,
        )


COLOR_TAGS = ("color_primaries", "color_trc", "colorspace", "color_range")


def _first_frame_info(c, v, path: Path) -> tuple[int, dict]:
    """Display rotation (degrees) and colour description of the first decodable frame."""
    c.seek(0, stream=v)
    try:
        for frame in c.decode(v):
            color = {k: int(getattr(frame, k)) for k in COLOR_TAGS}
            color["color_range"] = source_range(frame)  # to_i420 keeps the values in it
            return int(round(frame.rotation or 0)) % 360, color
    except av.error.FFmpegError as e:
        raise CorruptInput(f"{path}: the first video frame cannot be decoded ({e})") from None
    raise CorruptInput(f"{path}: no video frame could be decoded")


def iter_frames(vplan: VideoPlan, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode frames ``start <= index < stop`` as (index, I420 array) in presentation order.

    Seeks to the keyframe at or before ``start`` and drops the frames before it. Raises
    CorruptInput when the data cannot be decoded or frames are missing.
    """
    stop = vplan.frames if stop is None else min(stop, vplan.frames)
    if start >= stop:
        return
    path = Path(vplan.path)
    index = {p: i for i, p in enumerate(vplan.pts)}
    expected = start
    with _open(path) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        if start > 0:
            c.seek(vplan.pts[start], stream=v, backward=True, any_frame=False)
        # AVI stores no presentation times: its packets are numbered in decode order, and with
        # B-frames the decoder hands those numbers out of order. Frames come out in presentation
        # order all the same, so they are counted from the first one (a keyframe, whose number
        # is its place, GOPs being closed).
        counted = "avi" in c.format.name.split(",")
        counter = None
        try:
            for frame in c.decode(v):
                i = index.get(frame.pts) if counter is None else counter
                if counted and i is not None:
                    counter = i + 1
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
    if expected != stop:
        raise CorruptInput(f"{path}: truncated: decoded {expected - start} of {stop - start} frames")


def source_range(frame: av.VideoFrame) -> int:
    """The frame's colour range code: 2 (JPEG, full) when it says so or its pixel format is a
    full-range yuvj one, else its own tag (1 limited, 0 unspecified, which players read as
    limited)."""
    code = int(frame.color_range)
    return 2 if code == 2 or frame.format.name.startswith("yuvj") else code


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


def i420_planes(yuv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of an I420 array's Y (H, W), U and V (H/2, W/2) planes. The chroma planes are
    packed one after the other, not row by row of the array: where H is not a multiple of 4 a
    chroma plane ends in the middle of one of the array's rows."""
    H, W = yuv.shape[0] * 2 // 3, yuv.shape[1]
    flat = yuv.reshape(-1)  # a view: the planes below write through to ``yuv``
    n, q = H * W, H * W // 4
    return yuv[:H], flat[n : n + q].reshape(H // 2, W // 2), flat[n + q : n + 2 * q].reshape(H // 2, W // 2)


@dataclass(frozen=True)
class YuvMatrix:
    """How a clip's Y'CbCr maps to RGB: the matrix coefficients (Kr, Kb) and the range.

    A BT.709 clip decoded with BT.601's matrix (what OpenCV's I420 conversions use) gives the
    network and the detector faces off in hue and saturation; the delta written back with the
    same wrong matrix round-trips, so the clip stays consistent, but what the network saw was
    not what a player shows. ``VideoPlan.yuv_matrix`` picks the one the clip declares."""

    name: str
    kr: float
    kb: float
    full_range: bool = False

    @functools.cache  # per face and per frame: computed once per matrix, read-only
    def rgb_to_yuv(self) -> np.ndarray:
        """(3, 3) float32: RGB 0..255 -> Y, Cb, Cr offsets from (16 or 0, 128, 128)."""
        kr, kb = self.kr, self.kb
        kg = 1.0 - kr - kb
        ys, cs = (255.0, 255.0) if self.full_range else (219.0, 224.0)
        m = np.array([[kr, kg, kb],
                      [-kr / (2 * (1 - kb)), -kg / (2 * (1 - kb)), 0.5],
                      [0.5, -kg / (2 * (1 - kr)), -kb / (2 * (1 - kr))]], np.float64)
        m *= np.array([[ys], [cs], [cs]]) / 255.0
        return _read_only(m.astype(np.float32))

    @functools.cache
    def yuv_to_rgb(self) -> np.ndarray:
        """(3, 4) float32 for ``cv2.transform``: Y, Cb, Cr 0..255 -> RGB 0..255."""
        inv = np.linalg.inv(self.rgb_to_yuv().astype(np.float64))
        offset = np.array([0.0 if self.full_range else 16.0, 128.0, 128.0])
        return _read_only(np.hstack([inv, -(inv @ offset)[:, None]]).astype(np.float32))


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


BT601 = YuvMatrix("bt601", 0.299, 0.114)
BT709 = YuvMatrix("bt709", 0.2126, 0.0722)
BT2020 = YuvMatrix("bt2020", 0.2627, 0.0593)
SMPTE240M = YuvMatrix("smpte240m", 0.212, 0.087)
FCC = YuvMatrix("fcc", 0.30, 0.11)
# AVColorSpace codes -> matrix (2 unspecified and 0 RGB/unknown: guessed from the frame height)
_COLORSPACES = {1: BT709, 4: FCC, 5: BT601, 6: BT601, 7: SMPTE240M, 9: BT2020, 10: BT2020}


def yuv_matrix(color: dict, height: int) -> YuvMatrix:
    """The matrix and range of a clip with colour description ``color`` (``VideoPlan.color``).
    An unspecified matrix is BT.709 from 720 rows up and BT.601 below, as players assume;
    ``color_range`` 2 (JPEG) is full range (yuvj and other converted sources keep theirs:
    ``to_i420``)."""
    m = _COLORSPACES.get(int(color.get("colorspace", 2)), BT709 if height >= 720 else BT601)
    full = int(color.get("color_range", 0)) == 2
    return m if not full else YuvMatrix(m.name + "-full", m.kr, m.kb, True)


def i420_to_rgb(yuv: np.ndarray, matrix: YuvMatrix = BT601) -> np.ndarray:
    """An I420 frame as RGB uint8 (H, W, 3), chroma repeated over each 2x2 block."""
    if matrix == BT601:  # OpenCV's own conversion (the same matrix, limited range)
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)
    y, u, v = i420_planes(yuv)
    uv = cv2.resize(cv2.merge([u, v]), y.shape[::-1], interpolation=cv2.INTER_NEAREST)
    return cv2.transform(cv2.merge([y, uv[..., 0], uv[..., 1]]), matrix.yuv_to_rgb())


def add_rgb_delta(yuv: np.ndarray, rect: tuple[int, int, int, int], delta: np.ndarray,
                  matrix: YuvMatrix = BT601) -> None:
    """Add an RGB delta (h, w, 3 float32) over ``rect`` (x0, y0, x1, y1) to an I420 frame in place,
    through the clip's ``matrix`` (the one its RGB was read with).

    Luma gets the delta at full resolution; chroma gets it averaged over 2x2 blocks. Pixels and
    chroma blocks where the delta is zero are left bit-exact.
    """
    H = yuv.shape[0] * 2 // 3
    W = yuv.shape[1]
    x0, y0, x1, y1 = rect
    # grow the rectangle to even coordinates so chroma blocks are whole
    ex0, ey0 = x0 - x0 % 2, y0 - y0 % 2
    ex1, ey1 = min(W, x1 + x1 % 2), min(H, y1 + y1 % 2)
    d = np.zeros((ey1 - ey0, ex1 - ex0, 3), np.float32)
    d[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0] = delta
    dyuv = d @ matrix.rgb_to_yuv().T  # (h, w, 3)
    Y, cu, cv_ = i420_planes(yuv)
    region = Y[ey0:ey1, ex0:ex1]
    dy = dyuv[..., 0]
    touched = dy != 0
    region[touched] = np.clip(np.rint(region[touched] + dy[touched]), 0, 255).astype(np.uint8)
    hh, ww = (ey1 - ey0) // 2, (ex1 - ex0) // 2
    if hh == 0 or ww == 0:
        return
    duv = dyuv[: hh * 2, : ww * 2, 1:].reshape(hh, 2, ww, 2, 2).mean((1, 3))
    cy0, cx0 = ey0 // 2, ex0 // 2
    for plane, dc in ((cu, duv[..., 0]), (cv_, duv[..., 1])):
        reg = plane[cy0 : cy0 + hh, cx0 : cx0 + ww]
        t = dc != 0
        reg[t] = np.clip(np.rint(reg[t] + dc[t]), 0, 255).astype(np.uint8)


@dataclass
class EncoderSettings:
    """Encoder choices; the same for every part of a job so that the parts join."""

    codec: str = "libx264"  # or h264_nvenc, libx265
    crf: int = 18
    preset: str = "medium"
    bframes: int | None = None  # None: the encoder's default
    extra: dict = field(default_factory=dict)

    def options(self) -> dict[str, str]:
        if self.codec.endswith("_nvenc"):
            opts = {"rc": "vbr", "cq": str(self.crf), "preset": _nvenc_preset(self.preset)}
        else:
            opts = {"crf": str(self.crf), "preset": self.preset}
        if self.bframes is not None:
            opts["bf"] = str(self.bframes)
        opts.update({k: str(v) for k, v in self.extra.items()})
        return opts


def _nvenc_preset(preset: str) -> str:
    table = {"ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p4",
             "medium": "p5", "slow": "p6", "slower": "p7", "veryslow": "p7"}
    return table.get(preset, preset)


def encoder_available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:
        return False


def partial_name(path: Path) -> Path:
    """Temporary sibling used while ``path`` is being written (renamed when complete). Its stem
    is shortened where the name would pass the file system's 255 bytes (the output's own name
    may be up to that long)."""
    tail = f".partial.{os.getpid()}{path.suffix}"
    stem = path.stem
    while len(f".{stem}{tail}".encode()) > 255 and stem:
        stem = stem[:-1]
    return path.with_name(f".{stem}{tail}")


class VideoEncoder:
    """Writes I420 frames with their source pts to a video-only file; renames when closed cleanly."""

    def __init__(self, path: Path, vplan: VideoPlan, settings: EncoderSettings) -> None:
        self.path = Path(path)
        self.tmp = partial_name(self.path)
        self.vplan = vplan
        tb = Fraction(vplan.time_base)
        self._out = av.open(str(self.tmp), "w", format="mp4")
        try:
            s = self._out.add_stream(settings.codec, rate=Fraction(vplan.rate))
            s.width, s.height, s.pix_fmt = vplan.out_width, vplan.out_height, "yuv420p"
            s.time_base = tb
            s.codec_context.time_base = tb
            s.options = settings.options()
            if vplan.rotation:
                s.set_display_rotation(vplan.rotation)
            for k, code in vplan.color.items():
                setattr(s.codec_context, k, code)
        except Exception:
            _discard(self._out, self.tmp)
            raise
        self._stream = s
        self._tb = tb
        self.frames = 0

    def write(self, index: int, yuv: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self.vplan.pts[index]
        frame.time_base = self._tb
        try:
            for pkt in self._stream.encode(frame):
                self._out.mux(pkt)
        except OSError as e:
            if is_output_oserror(e):  # disk full, no permission: one line naming the file
                raise output_error(self.path, e) from None
            raise
        self.frames += 1

    def close(self) -> None:
        try:
            for pkt in self._stream.encode(None):
                self._out.mux(pkt)
            self._out.close()
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.abort()
            if is_output_oserror(e):
                raise output_error(self.path, e) from None
            raise

    def abort(self) -> None:
        _discard(self._out, self.tmp)

    def __enter__(self) -> "VideoEncoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# PCM audio is re-encoded to AAC in these containers (MP4 can hold PCM, but many players refuse
# it); .mkv and the rest keep it as it is
PCM_TO_AAC_EXTENSIONS = {".mp4", ".m4v", ".mov"}


def _discard(out, tmp: Path) -> None:
    """Close a half-written output container and remove its file, whatever either step raises
    (closing writes the trailer, which fails again on a full disk or a refused stream)."""
    if out is not None:
        try:
            out.close()
        except Exception:
            pass
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _stream_packets(path: Path, index: int, out_stream) -> Iterator[tuple[float, int, av.Packet]]:
    """(decode time in seconds, stream index, packet) of one stream, re-targeted to ``out_stream``.

    Each stream gets its own demux pass over its own container so that several can be merged
    by time with ``heapq.merge``.
    """
    with av.open(str(path)) as c:
        s = c.streams[index]
        try:
            for pkt in c.demux(s):
                if pkt.size == 0 or pkt.dts is None:
                    continue
                pkt.stream = out_stream
                yield float(pkt.dts * s.time_base), index, pkt
        except av.error.FFmpegError as e:
            raise CorruptInput(f"{path}: corrupt {s.type} data in stream #{index} ({e})") from None


def _reencoded_audio(path: Path, index: int, out_stream) -> Iterator[tuple[float, int, av.Packet]]:
    """AAC packets of a source audio stream (one the output container cannot hold as it is, or
    PCM, which MP4 players refuse)."""

    def timed(pkt):
        t = pkt.dts if pkt.dts is not None else (pkt.pts or 0)
        tb = pkt.time_base or out_stream.time_base or Fraction(1, out_stream.rate or 48000)
        return float(t * tb), index, pkt

    with av.open(str(path)) as c:
        s = c.streams[index]
        try:
            for frame in c.decode(s):
                frame.pts = None  # let the encoder count samples
                for pkt in out_stream.encode(frame):
                    yield timed(pkt)
        except av.error.FFmpegError as e:
            if is_output_oserror(e):
                raise
            raise CorruptInput(f"{path}: cannot decode audio stream #{index} ({e})") from None
        for pkt in out_stream.encode(None):
            yield timed(pkt)


def join(parts: list[Path], vplan: VideoPlan, dst: Path) -> dict:
    """Remux the video parts and every audio/subtitle stream of the source into ``dst``.

    Every video frame keeps the source's pts: the parts' own timestamps are not trusted (an MP4
    part that does not start at 0 begins with an edit list counted in milliseconds, which moves
    its frames by up to a millisecond), each frame is given the plan's pts instead, the parts
    covering the plan's frames in order. Audio is copied packet for packet; a codec the output
    container cannot hold is re-encoded to AAC (logged). Subtitle and data streams are copied
    where the container allows, else dropped with a warning. The file is written under a
    temporary name and renamed once its frame count and every frame's pts match the plan
    (``check_timing``); whatever goes wrong, nothing is left at either name. Returns a summary
    of what was written.
    """
    dst = Path(dst)
    tmp = partial_name(dst)
    summary = {"frames": 0, "audio_packets": 0, "dropped_streams": [], "reencoded_streams": []}
    out, iters = None, []
    try:
        out = av.open(str(tmp), "w", options=_timescale_options(dst, vplan))
        vout = _join_streams(out, parts, vplan, dst, iters, summary)
        first = None  # the earliest decode time muxed (packets come in decode-time order)
        for t, _, pkt in heapq.merge(*iters, key=lambda x: (x[0], x[1])):
            if first is None:
                first = t
            if pkt.stream is vout:
                summary["frames"] += 1
            elif pkt.stream.type == "audio":
                summary["audio_packets"] += 1
            out.mux(pkt)
        out.close()
        out = None
        if summary["frames"] != vplan.frames:
            raise OutputError(f"{dst}: joined {summary['frames']} frames, the plan has {vplan.frames}")
        # MP4 and MOV hold times before 0 (an edit list); Matroska and others have the muxer move
        # the whole file later by as much (audio that starts before the video, B-frames)
        lead = 0.0 if dst.suffix.lower() in MOV_EXTENSIONS or first is None else max(0.0, -first)
        check_timing(tmp, vplan, name=dst, lead=lead)
        os.replace(tmp, dst)
    except BaseException as e:
        for it in iters:  # their source files are closed now, not at garbage collection
            it.close()
        _discard(out, tmp)
        if isinstance(e, FacemendError) or not isinstance(e, Exception):  # Ctrl-C, SIGTERM: as they are
            raise
        if is_output_oserror(e):
            raise output_error(dst, e) from None
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OutputError(f"{dst}: cannot write the video as {dst.suffix or 'a file without extension'}"
                          f" ({text})") from None
    return summary


MOV_EXTENSIONS = {".mp4", ".m4v", ".mov"}


def _timescale_options(dst: Path, vplan: VideoPlan) -> dict[str, str]:
    """Muxer options for ``dst``: an MP4/MOV's movie timescale (1000 by default, the unit of its
    edit list) is the source's, so that a first frame later than 0 keeps its exact time."""
    tb = Fraction(vplan.time_base)
    if dst.suffix.lower() in MOV_EXTENSIONS and tb.numerator == 1 and 1000 <= tb.denominator < 2**31:
        return {"movie_timescale": str(tb.denominator)}
    return {}


def _part_times(path: Path) -> tuple[list[int], Fraction, bool]:
    """The pts of a part's video packets in decode order, its time base, and whether any packet
    is decoded before it is shown (dts != pts: B-frames)."""
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            pts, reordered = [], False
            for pkt in c.demux(s):
                if pkt.size == 0:
                    continue
                if pkt.pts is None:
                    raise OutputError(f"{path}: a video packet without a timestamp")
                pts.append(int(pkt.pts))
                reordered = reordered or (pkt.dts is not None and pkt.dts != pkt.pts)
            return pts, s.time_base, reordered
    except (av.error.FFmpegError, IndexError) as e:
        raise OutputError(f"{path}: cannot read the part ({e})") from None


def _retimed_parts(parts: list[Path], vplan: VideoPlan, out_stream) -> list[Iterator]:
    """One packet source per part, each packet carrying the plan's pts for its frame.

    The parts hold the plan's frames in order (part k the next ``len(part k)`` frames); within
    a part the n-th smallest pts is the n-th frame. A part whose frames lie more than 2 ms (or
    one tick of its time base) from the plan's, or too many frames in all, is refused: it does
    not belong to this plan."""
    tb = Fraction(vplan.time_base)
    iters, first = [], 0
    for path in parts:
        pts, ptb, reordered = _part_times(path)
        if first + len(pts) > vplan.frames:
            raise OutputError(f"{path}: the parts hold more than the plan's {vplan.frames} frames")
        want = vplan.pts[first : first + len(pts)]
        new = dict(zip(sorted(pts), want))
        if len(new) != len(pts):
            raise OutputError(f"{path}: two video packets with the same pts")
        slack = max(Fraction(1, 500), ptb)
        for old, p in new.items():
            if abs(old * ptb - p * tb) > slack:
                raise OutputError(f"{path}: frame {first + want.index(p)} is at {float(old * ptb):.6f} s, "
                                  f"the source's at {float(p * tb):.6f} s")
        iters.append(_retimed_packets(path, new, ptb, tb, reordered, out_stream))
        first += len(pts)
    return iters


def _retimed_packets(path: Path, new: dict[int, int], ptb: Fraction, tb: Fraction, reordered: bool,
                     out_stream) -> Iterator[tuple[float, int, av.Packet]]:
    """The part's video packets re-targeted to ``out_stream`` in the plan's time base ``tb``:
    pts from ``new``; dts equal to it where the part has no B-frames, else the part's dts moved
    as its first frame moved (kept below the pts and rising)."""
    shift = min(new.values()) * tb - min(new) * ptb
    last_dts = None
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        try:
            for pkt in c.demux(s):
                if pkt.size == 0:
                    continue
                pts = new[int(pkt.pts)]
                if reordered and pkt.dts is not None:
                    dts = min(pts, round((pkt.dts * ptb + shift) / tb))
                else:
                    dts = pts
                if last_dts is not None and dts <= last_dts:
                    dts = last_dts + 1
                last_dts = dts
                duration = round(pkt.duration * ptb / tb) if pkt.duration else 0
                pkt.stream = out_stream
                pkt.time_base = tb
                pkt.pts, pkt.dts, pkt.duration = pts, dts, duration
                yield float(dts * tb), 0, pkt
        except av.error.FFmpegError as e:
            raise CorruptInput(f"{path}: corrupt video data ({e})") from None


def check_timing(path: Path, vplan: VideoPlan, *, name: Path | None = None, lead: float = 0.0) -> None:
    """Raise OutputError unless the video at ``path`` has the plan's frame count and every frame
    the plan's pts (to the nearest tick of the file's own time base: a container with a coarser
    clock, Matroska's milliseconds, rounds them). ``lead``: seconds by which the muxer moved the
    whole file later because a packet started before 0 (containers that cannot store negative
    times); then every frame must be moved by that same amount (to a tick), the streams staying
    in sync, and it is logged. ``name``: the file to name in the message."""
    name = name or path
    try:
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            got = sorted(int(p.pts) for p in c.demux(v) if p.size and p.pts is not None)
            otb = v.time_base
    except (av.error.FFmpegError, IndexError) as e:
        raise OutputError(f"{name}: cannot read the joined video back ({e})") from None
    if len(got) != vplan.frames:
        raise OutputError(f"{name}: has {len(got)} frames, the plan has {vplan.frames}")
    tb = Fraction(vplan.time_base)
    off = [i for i, (g, w) in enumerate(zip(got, vplan.pts)) if abs(g * otb - w * tb) * 2 > otb]
    if off and lead > 0:
        shift = got[0] * otb - vplan.pts[0] * tb
        moved = [i for i, (g, w) in enumerate(zip(got, vplan.pts)) if abs(g * otb - w * tb - shift) * 2 > otb]
        if not moved and abs(float(shift) - lead) <= float(otb) + 1e-6:
            log.info("%s: every stream starts %.3f ms later than in the source (the container cannot "
                     "store times before 0); frame intervals are the source's", name, 1000 * float(shift))
            return
    if off:
        i = off[0]
        raise OutputError(f"{name}: {len(off)} of {len(got)} frames are not at the source's time: "
                          f"frame {i} at {float(got[i] * otb):.6f} s, the source's at "
                          f"{float(vplan.pts[i] * tb):.6f} s")


def _join_streams(out, parts: list[Path], vplan: VideoPlan, dst: Path, iters: list, summary: dict):
    """Add the output's streams and their packet sources to ``iters``; returns the video stream."""
    src = Path(vplan.path)
    with _open(src) as source:
        streams = [(s.index, s.type, s.codec_context.name, s) for s in source.streams if s.type != "video"]
        supported = out.supported_codecs
        with av.open(str(parts[0])) as first:
            vout = out.add_stream_from_template(first.streams.video[0])
        vout.time_base = Fraction(vplan.time_base)  # the source's clock: its pts go in unrounded
        if vplan.rotation:
            vout.set_display_rotation(vplan.rotation)
        iters += _retimed_parts(parts, vplan, vout)
        for index, kind, name, s in streams:
            pcm_in_mp4 = name.startswith("pcm_") and dst.suffix.lower() in PCM_TO_AAC_EXTENSIONS
            if kind == "audio" and name in supported and not pcm_in_mp4:
                iters.append(_stream_packets(src, index, out.add_stream_from_template(s)))
            elif kind == "audio":
                o = out.add_stream("aac", rate=s.codec_context.sample_rate or 48000)
                o.layout = s.codec_context.layout
                iters.append(_reencoded_audio(src, index, o))
                summary["reencoded_streams"].append(f"audio #{index} ({name} -> aac)")
                why = "many players refuse PCM in" if pcm_in_mp4 else "cannot go in"
                log.warning("%s: audio stream #%d (%s): %s %s; re-encoded to AAC",
                            src, index, name, why, dst.suffix)
            else:
                try:
                    if name not in supported:
                        raise ValueError(name)
                    iters.append(_stream_packets(src, index, out.add_stream_from_template(s)))
                except Exception:
                    summary["dropped_streams"].append(f"{kind} #{index} ({name})")
                    log.warning("%s: %s stream #%d (%s) cannot be kept in %s; dropped",
                                src, kind, index, name, dst.suffix)
    return vout
