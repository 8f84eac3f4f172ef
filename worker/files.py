"""One file of a chunk, as the chunk task runs it: decided (``--skip-existing`` asks the output
folder's manifest, or the output's age where no records are kept), restored as the embedded
run restores it, and its outcome recorded in the manifest once the output is in place.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from pipeline import manifest
from pipeline.errors import FacemendError, OutputUnwritable
from pipeline.folder import unexpected
from pipeline.job import JobOptions, JobResult, process_file
from pipeline.paths import is_fresh

from .app import app
from .engines import engine_for
from .storage import check_roots

log = logging.getLogger(__name__)


def one_file(src: Path, out: Path, opts: JobOptions, book: dict | None = None) -> dict:
    """Decide, process and record one file; its outcome (status processed / skipped / failed).
    ``book``: the manifest's arguments (``manifest.should_skip`` / ``manifest.record``)."""
    if opts.skip_existing:
        if book is not None:
            why = manifest.should_skip(book["src_root"], book["dst_root"], src, out, opts, shard=book["shard"])
        else:
            why = manifest.FRESH_REASON if is_fresh(src, out) else None
        if why:
            return {"status": "skipped", "output": str(out), "reason": why}
    result = JobResult(str(src), str(out), "file", opts.task)
    try:
        st = os.stat(src)
    except OSError:
        st = None
    t0 = time.perf_counter()
    try:
        check_roots(src, out, app.facemend_settings)  # a link in the folder may point elsewhere
        process_file(src, out, opts, engine_for(opts, app.facemend_settings), result)
    except (OutputUnwritable, SoftTimeLimitExceeded):  # the chunk's concern, not this file's
        raise
    except Exception as e:  # as the embedded run: an error no check foresaw fails this file only
        if isinstance(e, FacemendError):
            log.warning("%s", e)
            error, code = str(e), e.exit_code
        else:
            log.warning("%s", src, exc_info=True)
            error, code = unexpected(src, e), 1
        if book is not None:
            manifest.record(book["src_root"], book["dst_root"], src, out, opts, manifest.FAILED, error=error,
                            stat=st, seconds=time.perf_counter() - t0, shard=book["shard"])
        return {"status": "failed", "output": str(out), "error": error, "exit_code": code}
    if book is not None:  # the output is in place (written under a temporary name, renamed)
        manifest.record(book["src_root"], book["dst_root"], src, out, opts, manifest.DONE, faces=result.faces,
                        stat=st, seconds=time.perf_counter() - t0, shard=book["shard"])
    return {"status": "processed", "output": str(out), "faces": result.faces, "notes": result.notes}
