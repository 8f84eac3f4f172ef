"""Join encoded parts and every audio and subtitle stream of the source into the output."""
from __future__ import annotations

import heapq
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av

from ..errors import (CorruptInput, FacemendError, OutputError, is_output_oserror, output_error)
from .encode import _discard, partial_name
from .probe import VideoPlan, _open

log = logging.getLogger(__name__)


# PCM audio is re-encoded to AAC in these containers (MP4 can hold PCM, but many players refuse
# it); .mkv and the rest keep it as it is
PCM_TO_AAC_EXTENSIONS = {".mp4", ".m4v", ".mov"}


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
