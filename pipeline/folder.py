"""A folder job in this process: each media file under the input into its mirrored place under
the output, one bad file failing only itself; with records kept, the folder's manifest and
morning report (``pipeline.manifest``, ``pipeline.report``).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from . import manifest
from .errors import Cancelled, FacemendError, OutputUnwritable
from .job import Engine, Hooks, JobOptions, JobResult, process_file
from .paths import is_fresh, mirrored_output, scan_folder
from .restore import PreviewSink

log = logging.getLogger(__name__)


LEFT_AFTER = 3600.0  # seconds: a temporary file or folder nothing has changed for this long is a dead writer's
# what a writer leaves when it is killed mid-file: ``media.partial_name``'s ``.NAME.partial.PID[.EXT]``
# and a video's temporary folder, ``parallel.work_prefix`` + tempfile's 8 characters
LEFTOVER = re.compile(r"\.(.+\.partial\.\d+(\.\w+)?|facemend-\d+-[a-z0-9_]{8})")


def sweep_leftovers(root: Path, older: float = LEFT_AFTER) -> int:
    """Remove under ``root`` what writers killed mid-file left (the out-of-memory killer, a
    power cut, a worker's SIGKILL): partial files and videos' temporary folders that nothing has
    changed for ``older`` seconds (a live writer changes its own all the time). The records
    folder (``.facemend``) and a queued job's parts (``.facemend-JOB``) are not touched.
    Returns how many were removed."""
    now, removed = time.time(), 0
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != manifest.DIR_NAME]
        for name in [d for d in dirs if LEFTOVER.fullmatch(d)]:
            path = Path(top) / name
            try:
                newest = max([path.stat().st_mtime] + [q.stat().st_mtime for q in path.rglob("*")])
            except OSError:
                continue
            dirs.remove(name)
            if now - newest > older:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        for name in files:
            path = Path(top) / name
            try:
                if LEFTOVER.fullmatch(name) and now - path.stat().st_mtime > older:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
    if removed:
        log.info("%s: removed %d temporary file(s) left by an earlier run that was killed", root, removed)
    return removed


def keeps_records(dst: Path, opts: JobOptions, records: bool | None = None) -> bool:
    """Whether a folder job into ``dst`` keeps ``dst/.facemend`` (manifest and report): when
    asked (``records``, the CLI's ``--manifest``), with ``--skip-existing`` (the nightly rerun
    the manifest is for), and always once ``dst`` has a manifest (a run that did not record
    could leave a record that no longer matches the output)."""
    return bool(records or opts.skip_existing or manifest.manifest_files(manifest.manifest_dir(dst)))


def run_folder_reported(src: Path, dst: Path, opts: JobOptions, engine: Engine, hooks: Hooks,
                        result: JobResult, *, records: bool | None = None, processes: int = 1) -> None:
    """``run_folder``; where the folder keeps records (``keeps_records``) with its manifest,
    then the morning report (``pipeline.report``) however the job ended: done, some files
    failed, stopped by an error, interrupted, or cancelled (a cancelled job that made its
    output folder leaves nothing, report included). A report that cannot be written is a
    warning; it never hides the job's own outcome."""
    if not keeps_records(dst, opts, records):
        run_folder(src, dst, opts, engine, hooks, result, processes=processes)
        return
    from .report import SAMPLES, build_report, write_report

    existed = dst.is_dir()
    restorer = engine.restorer
    sink, own_sink = restorer.preview, False
    if sink is None and not getattr(restorer, "identity", False):  # identity skips the faces' work
        sink = restorer.preview = PreviewSink(limit=SAMPLES)
        own_sink = True
    started = time.time()
    status, error = "interrupted", None
    try:
        with manifest.Manifest(src, dst, opts, lock=True) as book:
            sweep_leftovers(dst)  # the folder is this run's now (the lock)
            run_folder(src, dst, opts, engine, hooks, result, book=book, processes=processes)
        status = "partly failed" if result.failures else "done"
    except (Cancelled, manifest.FolderBusy) as e:
        status = "cancelled" if isinstance(e, Cancelled) else "busy"
        raise
    except FacemendError as e:
        status, error = "stopped", str(e)
        raise
    except Exception as e:
        status, error = "stopped", unexpected(src, e)
        raise
    finally:
        if own_sink:
            restorer.preview = None
        if dst.is_dir() and status != "busy" and (existed or status != "cancelled"):
            report = build_report(result, opts, status=status, started=started, ended=time.time(),
                                  error=error)
            try:
                result.report = str(write_report(dst, report, sink.pairs if sink else []))
            except OSError as e:
                log.warning("%s: the report cannot be written (%s)", manifest.manifest_dir(dst),
                            e.strerror or e)


def run_folder(src: Path, dst: Path, opts: JobOptions, engine: Engine, hooks: Hooks,
               result: JobResult, *, book: manifest.Manifest | None = None, processes: int = 1) -> None:
    """Each media file under ``src`` into its mirrored place under ``dst``. With a manifest
    (``book``), each file's outcome is recorded as soon as it is known and ``skip_existing``
    asks the manifest which files are already done; without one, a file is skipped when its
    output is newer than it. processes: files restored side by side in that many child
    processes (``pipeline.parallel``) where more than one file is to be done."""
    files, skipped = scan_folder(src)
    for item in skipped:
        log.info("%s: skipped (%s)", item["file"], item["reason"])
    result.skipped += skipped
    hooks.total(len(files), "files")
    existed = book is not None and book.existed
    todo: list[tuple[Path, Path, os.stat_result | None]] = []
    for p in files:
        if hooks.cancelled():
            cancel(src, dst, result, book, existed)
        out = mirrored_output(p, src, dst)
        if opts.skip_existing:
            if book is not None:
                skip, why = book.decide(p, out)
            else:
                skip, why = out.exists() and is_fresh(p, out), manifest.FRESH_REASON
            if skip:
                if book is not None and why == manifest.FRESH_REASON:  # no record yet: adopted
                    book.record(p, out, manifest.DONE, adopted=True)
                result.files["skipped"] += 1
                result.skipped.append({"file": str(p), "reason": why})
                log.debug("%s: skipped (%s)", p, why)
                hooks.advance(1)
                continue
            log.debug("%s: processing (%s)", p, why)
        try:
            st = os.stat(p)
        except OSError:
            st = None
        if processes > 1:  # decided now, restored below side by side
            todo.append((p, out, st))
            continue
        process_one(p, out, st, opts, engine, hooks, result, book)
    if len(todo) == 1:
        process_one(*todo[0], opts, engine, hooks, result, book)
    elif todo:
        from .parallel import run_files

        try:
            run_files(todo, opts, engine, hooks, result, book, min(processes, len(todo)))
        except Cancelled:
            cancel(src, dst, result, book, existed)


def process_one(p: Path, out: Path, st: os.stat_result | None, opts: JobOptions, engine: Engine,
                hooks: Hooks, result: JobResult, book: manifest.Manifest | None) -> None:
    """One file of a folder job in this process, its outcome recorded; an error that would fail
    every file after it (an unwritable output, a cancel) stops the job."""
    t0 = time.perf_counter()
    try:
        hooks.check_file(p, out)  # a link in the folder may point elsewhere
        process_file(p, out, opts, engine, result)
    except (OutputUnwritable, Cancelled):  # every file after it would fail the same way
        raise
    except Exception as e:  # one bad file: recorded, and the job goes on with the next
        record(result, book, p, out, st, time.perf_counter() - t0, file_error(p, e))
    else:
        record(result, book, p, out, st, time.perf_counter() - t0)
    hooks.advance(1)


def file_error(p: Path, e: Exception) -> str:
    """The one line a file's own error is recorded as (an unforeseen one's traceback is logged
    at debug level)."""
    if isinstance(e, FacemendError):
        return str(e)
    log.debug("%s", p, exc_info=e)
    return unexpected(p, e)


def record(result: JobResult, book: manifest.Manifest | None, p: Path, out: Path,
           st: os.stat_result | None, seconds: float, error: str | None = None) -> None:
    """One file's outcome into the folder's result and its manifest: done (its item is the
    result's last) or failed with ``error``."""
    if error is not None:
        result.files["failed"] += 1
        result.failures.append({"file": str(p), "error": error})
        log.info("%s", error)
        if book is not None:
            book.record(p, out, manifest.FAILED, error=error, stat=st, seconds=seconds)
        return
    result.files["processed"] += 1
    if book is not None:
        book.record(p, out, manifest.DONE, faces=result.items[-1]["faces"], stat=st, seconds=seconds)


def cancel(src: Path, dst: Path, result: JobResult, book: manifest.Manifest | None, existed: bool) -> None:
    """A cancelled folder job: the files it wrote are removed, their records marked so (a
    manifest this run made is removed with them); raises ``Cancelled``."""
    written = [Path(item["output"]) for item in result.items]
    if book is not None:
        for item in result.items:
            book.record(Path(item["file"]), Path(item["output"]), manifest.REMOVED,
                        error="the job was cancelled")
        book.close()
        if not existed:  # no records before this run: take them back with the files
            shutil.rmtree(manifest.manifest_dir(dst), ignore_errors=True)
    remove_written(written, dst)
    raise Cancelled(f"{src}: cancelled after {result.files['processed']} files "
                    "(the files it wrote are removed)")


def remove_written(outputs: list[Path], top: Path | None) -> None:
    """Remove the files a cancelled job wrote, then the folders under (and including) a folder
    job's output folder ``top`` that this leaves empty; a folder still holding other files stays
    (``top`` None: no folder is removed)."""
    dirs = {top} if top is not None else set()
    for out in outputs:
        try:
            out.unlink(missing_ok=True)
        except OSError as e:
            log.warning("%s: cannot remove (%s)", out, e.strerror or e)
        d = out.parent
        while top is not None and d != top and d.is_relative_to(top):
            dirs.add(d)
            d = d.parent
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:  # not empty, or already gone
            pass


def unexpected(p: Path, e: BaseException) -> str:
    """One line for an error no check foresaw, naming the file it happened on."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{p}: cannot be processed ({type(e).__name__}{': ' + text if text else ''})"
