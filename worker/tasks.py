"""The Celery tasks of a job: plan -> segment x N -> join (videos), plan -> chunk x N -> summarise
(images and folders).

Every task reads its job record first and does nothing once the job is terminal. Parts are
idempotent: a segment whose part file is already complete only reports it, so a redelivered
message (its worker died, or the visibility timeout passed) never corrupts the output. Attempts,
progress and the cancel check are in ``parts``. The last part to finish (counted as distinct
indices in a Redis set) sends the join.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import av
from celery.exceptions import SoftTimeLimitExceeded

from pipeline import media
from pipeline.errors import Cancelled, FacemendError, OutputError, OutputUnwritable
from pipeline.job import (JobOptions, JobResult, is_fresh, check_paths, mirrored_output, process_file, scan_folder,
                          unexpected)
from pipeline.preview import write_preview
from pipeline.restore import PreviewSink
from pipeline.video import process_range

from .app import app
from .engines import engine_for
from .parts import (Heartbeat, PartTask, Progress, begin_part, cleanup, fail, guarded, new_token, part_cancelled,
                    part_failed, stop_requested, stopped_by_cancel, store, superseded)
from .records import CANCELLED, DONE, FAILED, RUNNING, Job
from .segments import part_path, parts_dir, split
from .storage import check_options, check_output, check_roots

log = logging.getLogger(__name__)


# ---- plan ---------------------------------------------------------------------------------

@app.task(name="facemend.plan")
@guarded
def plan_job(job_id: str) -> dict:
    """Validate the input, plan the parts and send them."""
    job = store().get(job_id)
    if job.terminal:
        return {"skipped": job.state}
    token = new_token()
    if not store().take_stage(job_id, "plan", token):
        return {"skipped": "another worker plans this job"}
    store().set_state(job_id, RUNNING)
    with Heartbeat(job_id, "plan", token):
        return _plan(job_id, job)


def _plan(job_id: str, job: Job) -> dict:
    settings = app.facemend_settings
    src, dst = Path(job.input), Path(job.output)
    try:
        opts = JobOptions.from_dict(job.options)
        check_roots(src, dst, settings)
        check_options(opts, dst, settings)
        if job.parts:  # a redelivered plan (its worker died, or the visibility timeout passed)
            return _send_parts(job, [p["index"] for p in job.parts if not p["sent"]])
        kind = check_paths(src, dst, opts)
        if kind == "video" and opts.skip_existing and is_fresh(src, dst):  # as the embedded run
            store().set_state(job_id, DONE, summary={
                "processed": 0, "skipped": 1, "failed": 0,
                "skipped_files": [{"file": str(src), "reason": "output is newer than input"}]})
            return {"skipped": str(src)}
        if kind == "video":
            opts.encoder(joinable=True)
            vplan = media.plan(src)
            ranges = split(vplan, job.segment_seconds)
            store().save_plan(job_id, vplan.to_dict())
            parts = [{"start": a, "stop": b, "task_id": f"{job_id}-s{i}"} for i, (a, b) in enumerate(ranges)]
            store().add_parts(job_id, parts, total=vplan.frames)
            parts_dir(dst, job_id).mkdir(parents=True, exist_ok=True)
        else:
            if kind == "image":
                pairs, ignored = [(src, dst)], []
            else:
                files, ignored = scan_folder(src)
                pairs = [(p, mirrored_output(p, src, dst)) for p in files]
            n = job.chunk_files
            parts = [{"start": i, "stop": min(i + n, len(pairs)), "task_id": f"{job_id}-c{i // n}"}
                     for i in range(0, len(pairs), n)]
            store().update(job_id, files=[[str(a), str(b)] for a, b in pairs], ignored=ignored)
            store().add_parts(job_id, parts, total=len(pairs))
    except FacemendError as e:
        fail(job, str(e), e.exit_code)
        return {"failed": str(e)}
    return _send_parts(store().get(job_id), range(len(parts)))


def _send_parts(job: Job, indices) -> dict:
    sent = []
    for i in indices:
        task = segment if job.kind == "video" else chunk
        route = {"queue": job.queue} if job.queue else {}
        task.apply_async((job.id, i), task_id=job.parts[i]["task_id"], **route)
        store().mark_sent(job.id, i, job.queue or app.facemend_settings.gpu_queue)
        sent.append(i)
    log.info("job %s: %d %s sent", job.id, len(sent), "segments" if job.kind == "video" else "chunks")
    return {"parts": len(job.parts), "sent": sent}



def _part_finished(job: Job, index: int, worker: str, seconds: float) -> bool:
    """Record the part DONE; the part that completes the set sends the join (or summary). A
    copy of a part that had finished changes nothing and sends nothing (False)."""
    first, finished = store().finish_part(job.id, index, worker=worker, seconds=round(seconds, 2))
    state, _ = store().state(job.id)
    if state in (CANCELLED, FAILED, DONE):
        cleanup(job)
    elif first and finished == len(job.parts):
        last = join_job if job.kind == "video" else summarise
        store().update(job.id, **{"last.sent_at": store().now(), "last.queue": app.facemend_settings.cpu_queue})
        last.apply_async((job.id,), task_id=f"{job.id}-{last.name.split('.')[-1]}")
    return first


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


# ---- video --------------------------------------------------------------------------------

def part_complete(path: Path, frames: int) -> bool:
    """A part at its final path was renamed there complete; check its frame count anyway."""
    if not path.exists():
        return False
    try:
        with av.open(str(path)) as c:
            n = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    except (av.error.FFmpegError, IndexError):
        n = -1
    if n != frames:
        log.warning("%s: has %d frames, expected %d; redoing it", path, n, frames)
        path.unlink(missing_ok=True)
        return False
    return True


@contextmanager
def preview_sheet(opts: JobOptions, index: int):
    """``--preview`` in queued mode: while the job's first part runs, the worker's engine offers
    its before/after crop pairs to a sink; the callable this yields, called once the part has
    finished, writes the sheet. Other parts, and jobs without ``--preview``, get a no-op."""
    if not opts.preview or index != 0:
        yield lambda: None
        return
    check_output(Path(opts.preview), app.facemend_settings)
    restorer = engine_for(opts, app.facemend_settings).restorer
    sink = restorer.preview = PreviewSink()
    try:
        yield lambda: write_preview(Path(opts.preview), sink.pairs)
    finally:
        restorer.preview = None


@app.task(name="facemend.segment", bind=True, base=PartTask)
def segment(self, job_id: str, index: int) -> dict:
    """Restore one frame range of the video into its part file (a no-op if already there)."""
    token = new_token()
    job, attempt = begin_part(self, job_id, index, token)
    if job is None:
        return {"skipped": True}
    with Heartbeat(job_id, index, token) as beat:
        return _segment(self, job, index, attempt, token, beat)


def _segment(task, job: Job, index: int, attempt: int, token: str, beat: Heartbeat) -> dict:
    """One run of a segment. It writes its own file (``.segNNNNN.TOKEN.mp4``, itself written
    under a temporary name and renamed complete) and links it to the part's path only if no
    complete part is there yet, so a copy running at the same time (a redelivery) can neither
    corrupt nor replace the part; a copy that finds the part finished, or the job over, marks
    nothing."""
    job_id = job.id
    t0 = time.perf_counter()
    part = job.parts[index]
    start, stop = part["start"], part["stop"]
    path = part_path(Path(job.output), job_id, index)
    work = path.with_name(f".{path.stem}.{token[:12]}{path.suffix}")
    progress = Progress(job_id, index, app.facemend_settings.progress_interval)
    try:
        check_roots(Path(job.input), path, app.facemend_settings)
        if part_complete(path, stop - start):
            progress(stop - start)
            stats = {"frames": stop - start, "reused": True}
        else:
            opts = JobOptions.from_dict(job.options)
            vplan = media.VideoPlan.from_dict(store().load_plan(job_id))
            engine = engine_for(opts, app.facemend_settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            extra = {"detect_every": opts.detect_every} if getattr(opts, "detect_every", 1) != 1 else {}
            engine.restorer.reset()  # FaceMath's smoothed codes belong to one range of one video
            with preview_sheet(opts, index) as write_sheet:
                r = process_range(vplan, work, detector=engine.detector, restorer=engine.restorer,
                                  settings=opts.encoder(joinable=True), start=start, stop=stop,
                                  progress=progress, should_cancel=stop_requested(job_id, beat), **extra)
                write_sheet()
            stats = {"frames": r.frames, "faces": r.faces, "seconds": round(r.seconds, 2)}
            if not publish_part(work, path):
                log.info("job %s segment %d: another run's part was there first; this one is dropped", job_id, index)
                stats["duplicate"] = True
        progress.flush()
    except Cancelled:
        progress.flush()
        if beat.superseded.is_set():  # another runner holds the part now: leave it its state
            return {"superseded": True}
        return part_cancelled(job, index)
    except FacemendError as e:  # bad data: another attempt cannot help
        if stopped_by_cancel(job, index, e):  # or the cancel removed the part's folder
            return {"cancelled": True}
        if superseded(job, index, token, e):  # the job is over, or another run finished the part
            return {"superseded": True}
        store().set_part(job_id, index, state=FAILED, error=str(e))
        fail(job, str(e), e.exit_code)
        return {"failed": str(e)}
    except Exception as e:
        return part_failed(task, job, index, attempt, e, token)
    finally:
        work.unlink(missing_ok=True)
    if not _part_finished(job, index, task.request.hostname or "?", time.perf_counter() - t0):
        stats["duplicate"] = True
    return stats


@app.task(name="facemend.join")
@guarded
def join_job(job_id: str) -> dict:
    """Remux the parts and every source audio stream into the output; check it; DONE."""
    job = store().get(job_id)
    if job.terminal:
        cleanup(job)
        return {"skipped": job.state}
    token = new_token()
    if not store().take_stage(job_id, "last", token):
        return {"skipped": "another worker joins this job"}
    with Heartbeat(job_id, "last", token):
        return _join(job_id, job)


def _join(job_id: str, job: Job) -> dict:
    dst = Path(job.output)
    vplan = media.VideoPlan.from_dict(store().load_plan(job_id))
    paths = [part_path(dst, job_id, p["index"]) for p in job.parts]
    try:
        check_roots(Path(vplan.path), dst, app.facemend_settings)
        for p in paths:
            check_output(p, app.facemend_settings)
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise OutputError(f"{dst}: parts missing at join: {', '.join(missing)}")
        summary = media.join(paths, vplan, dst)  # checks every frame's pts before the rename
    except FacemendError as e:
        fail(job, str(e), e.exit_code)
        return {"failed": str(e)}
    workers = sorted({p["worker"] for p in job.parts if p["worker"]})
    summary.update(segments=len(paths), workers=workers)
    if not store().set_state(job_id, DONE, summary=summary, done=vplan.frames):
        dst.unlink(missing_ok=True)  # cancelled while joining: leave nothing at the output
    cleanup(job)
    log.info("job %s DONE: %s (%d frames, %d segments)", job_id, dst, summary["frames"], len(paths))
    return summary


# ---- images and folders -------------------------------------------------------------------

@app.task(name="facemend.chunk", bind=True, base=PartTask)
def chunk(self, job_id: str, index: int) -> dict:
    """Restore a chunk of a folder job's files (or a single image), one outcome per file."""
    token = new_token()
    job, attempt = begin_part(self, job_id, index, token)
    if job is None:
        return {"skipped": True}
    with Heartbeat(job_id, index, token) as beat:
        return _chunk(self, job, index, attempt, token, beat)


def _chunk(task, job: Job, index: int, attempt: int, token: str, beat: Heartbeat) -> dict:
    job_id = job.id
    t0 = time.perf_counter()
    part = job.parts[index]
    pairs = json.loads(store().r.hget(store().key(job_id), "files"))[part["start"]:part["stop"]]
    opts = JobOptions.from_dict(job.options)
    seen = store().file_results(job_id)
    progress = Progress(job_id, index, app.facemend_settings.progress_interval)
    cancelled = stop_requested(job_id, beat)
    try:
        with preview_sheet(opts, index) as write_sheet:
            for src, out in pairs:
                if cancelled():
                    return _chunk_stopped(job, index, token, beat)
                if src not in seen:
                    store().file_result(job_id, src, _one_file(Path(src), Path(out), opts))
                    if cancelled():  # cancelled while it was written: it goes with the others
                        return _chunk_stopped(job, index, token, beat)
                progress(1)
            write_sheet()
        progress.flush()
    except OutputUnwritable as e:  # a full or read-only disk: every other file would fail too
        progress.flush()
        if superseded(job, index, token, e):
            return {"superseded": True}
        fail(job, str(e), e.exit_code)
        return {"failed": str(e)}
    except Exception as e:
        progress.flush()
        return part_failed(task, job, index, attempt, e, token)
    if not _part_finished(job, index, task.request.hostname or "?", time.perf_counter() - t0):
        return {"files": len(pairs), "duplicate": True}
    return {"files": len(pairs)}


def _chunk_stopped(job: Job, index: int, token: str, beat: Heartbeat) -> dict:
    if beat.superseded.is_set():  # another runner holds the chunk now: leave it its state
        return {"superseded": True}
    return part_cancelled(job, index)


def _one_file(src: Path, out: Path, opts: JobOptions) -> dict:
    if opts.skip_existing and is_fresh(src, out):
        return {"status": "skipped", "output": str(out), "reason": "output is newer than input"}
    result = JobResult(str(src), str(out), "file", opts.task)
    try:
        check_roots(src, out, app.facemend_settings)  # a link in the folder may point elsewhere
        process_file(src, out, opts, engine_for(opts, app.facemend_settings), result)
    except (OutputUnwritable, SoftTimeLimitExceeded):  # the chunk's concern, not this file's
        raise
    except FacemendError as e:
        log.warning("%s", e)
        return {"status": "failed", "output": str(out), "error": str(e), "exit_code": e.exit_code}
    except Exception as e:  # as the embedded run: an error no check foresaw fails this file only
        log.warning("%s", src, exc_info=True)
        return {"status": "failed", "output": str(out), "error": unexpected(src, e), "exit_code": 1}
    return {"status": "processed", "output": str(out), "faces": result.faces, "notes": result.notes}


@app.task(name="facemend.summarise")
@guarded
def summarise(job_id: str) -> dict:
    """Count processed / skipped / failed files; DONE (or FAILED for a single image)."""
    job = store().get(job_id)
    if job.terminal:
        return {"skipped": job.state}
    results = store().file_results(job_id)
    by = {s: {f: r for f, r in results.items() if r["status"] == s} for s in ("processed", "skipped", "failed")}
    summary = {
        "processed": len(by["processed"]), "skipped": len(by["skipped"]), "failed": len(by["failed"]),
        "faces": sum(r.get("faces", 0) for r in by["processed"].values()),
        "failures": [{"file": f, "error": r["error"]} for f, r in by["failed"].items()],
        "skipped_files": [{"file": f, "reason": r["reason"]} for f, r in by["skipped"].items()],
        "notes": [n for r in by["processed"].values() for n in r.get("notes", [])],
    }
    if job.kind == "image" and by["failed"]:
        (f, r), = by["failed"].items()
        fail(job, r["error"], r.get("exit_code", 3))
    else:
        store().set_state(job_id, DONE, summary=summary, done=len(results),
                          exit_code=6 if by["failed"] else 0)
    return summary

