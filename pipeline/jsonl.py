"""Append-only JSON-lines files that survive a crash at any moment: one record (a JSON object)
per line, each appended with a single ``write``. A line torn by a crash is ended before the next
append (``open_append``) and skipped on reading (``read_lines``). The manifest and a chunk's
results are such files.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def read_lines(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The whole records in ``path`` from byte ``offset`` on (a record: an object with a string
    ``input`` and a number ``t``, its time), and the offset after the last complete line (a line
    still being written, or torn by a crash, is left for later: the next writer ends it before
    appending, and it is then ignored as not JSON)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError as e:
        log.warning("%s: cannot be read (%s); its records are ignored", path, e.strerror or e)
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.info("%s: a line that is not a whole record (a crash while it was written?) is ignored",
                     path)
            continue
        if (isinstance(rec, dict) and isinstance(rec.get("input"), str)
                and isinstance(rec.get("t", 0.0), (int, float))):
            records.append(rec)
    return records, offset + end


def open_append(path: Path) -> int:
    """A descriptor appending to ``path`` (created if need be, its folder's entry then made
    durable). A torn last line (a crash mid-write) is ended first, so that it cannot swallow
    the next record."""
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
    except BaseException:
        os.close(fd)
        raise
    if new:
        fsync_dir(path.parent)
    return fd


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
