"""Where each segment's part file lives, and how a finished part is checked and put in place
(the first complete one wins). Where a video is cut: ``pipeline.media.split``, shared with the
embedded run's segments (``pipeline.parallel``).
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from pipeline.media import count_frames

log = logging.getLogger(__name__)


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
