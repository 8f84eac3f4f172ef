"""Encode frames into a part file (video only, source pts), written under a temporary name."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import (is_output_oserror, output_error)
from .probe import VideoPlan


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


def partial_name(path: Path, pid: int | None = None) -> Path:
    """Temporary sibling used while ``path`` is being written (renamed when complete) by this
    process (or process ``pid``). Its stem is shortened where the name would pass the file
    system's 255 bytes (the output's own name may be up to that long)."""
    tail = f".partial.{pid or os.getpid()}{path.suffix}"
    stem = path.stem
    while len(f".{stem}{tail}".encode()) > 255 and stem:
        stem = stem[:-1]
    return path.with_name(f".{stem}{tail}")


def count_frames(path: Path) -> int:
    """The frames of a part file (``VideoEncoder``'s output): its video packets that hold data;
    -1 when it cannot be read as a video."""
    try:
        with av.open(str(path)) as c:
            return sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    except (av.error.FFmpegError, IndexError):
        return -1


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
            if vplan.sar:  # players show the frame at the source's shape (a 16:9 DVD stays 16:9)
                s.codec_context.sample_aspect_ratio = Fraction(vplan.sar)
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
