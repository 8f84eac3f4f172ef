"""Where a video is cut into segments, where each segment's part file lives, and how a finished
part is checked and put in place (the first complete one wins).

Cuts fall every ``seconds`` of presentation time, moved to a keyframe when one lies within a
quarter segment of the target (``process_range`` seeks to the keyframe before a start anyway,
so a cut between keyframes only costs some extra decoding). A short tail joins the last segment.
"""
from __future__ import annotations

import bisect
import errno
import logging
import os
from fractions import Fraction
from pathlib import Path

from pipeline.media import VideoPlan, count_frames

log = logging.getLogger(__name__)


def split(vplan: VideoPlan, seconds: float) -> list[tuple[int, int]]:
    """Frame ranges ``[(start, stop), ...]`` covering the video in order."""
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


def parts_dir(output: Path, job_id: str) -> Path:
    """The folder of a job's segment parts: beside the output, on the same shared storage."""
    return output.parent / f".facemend-{job_id}"


def part_path(output: Path, job_id: str, index: int) -> Path:
    """Deterministic path of segment ``index``: present only once complete (renamed into place)."""
    return parts_dir(output, job_id) / f"seg{index:05d}.mp4"


def part_complete(path: Path, frames: int) -> bool:
    """A part at its final path was renamed there complete; check its frame count anyway."""
    if not path.exists():
        return False
    n = count_frames(path)
    if n != frames:
        log.warning("%s: has %d frames, expected %d; redoing it", path, n, frames)
        path.unlink(missing_ok=True)
        return False
    return True


def publish_part(work: Path, path: Path) -> bool:
    """Put the complete part ``work`` (this run's own file) at ``path``, unless a part is there
    already: the first complete one wins and is never rewritten. True when ``work`` won.
    ``work`` is gone afterwards either way."""
    try:
        try:
            os.link(work, path)  # atomic, and fails where a file is
            return True
        except FileExistsError:
            return False
        except OSError as e:  # a file system without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS,
                               errno.EMLINK, errno.EACCES):
                raise
            if path.exists():
                return False
            os.replace(work, path)
            return True
    finally:
        work.unlink(missing_ok=True)
