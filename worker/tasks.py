"""The Celery tasks of a job: plan -> segment x N -> join (videos), plan -> chunk x N -> summarise
(images and folders).

Every task reads its job record first and does nothing once the job is terminal. Parts are
idempotent: a segment whose part file is already complete only reports it, so a redelivered
message (its worker died, or the visibility timeout passed) never corrupts the output. Attempts,
progress and the cancel check are in ``parts``. The last part to finish (counted as distinct
indices in a Redis set) sends the join. A segment's part file is checked and put in place by
``segments``, a chunk's files are each run by ``files``, and ``report`` adds up the summary.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import manifest, media
from pipeline.errors import Cancelled, FacemendError, OutputError, OutputUnwritable
from pipeline.folder import keeps_records, remove_written
from pipeline.job import JobOptions, interlaced_note
from pipeline.paths import check_paths, is_fresh, mirrored_output, walk_folder
from pipeline.preview import write_preview
from pipeline.restore import PreviewSink
from pipeline.video import process_range

from . import chunks
from .app import app
from .engines import engine_for
from .files import one_file
from .parts import (Heartbeat, PartTask, Progress, begin_part, cleanup, fail, guarded, new_token, part_cancelled,
                    part_failed, stop_requested, stopped_by_cancel, store, superseded)
from .records import CANCELLED, DONE, FAILED, RUNNING, Job
from .report import job_summary, report_samples, write_job_report
from .segments import part_complete, part_path, parts_dir, publish_part
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
            vplan = media.plan(src).deinterlaced(opts.deinterlace)
            if vplan.interlaced:
                log.warning(interlaced_note(vplan))
            ranges = media.split(vplan, job.segment_seconds)
            store().save_plan(job_id, vplan.to_dict())
            parts = [{"start": a, "stop": b, "task_id": f"{job_id}-s{i}"} for i, (a, b) in enumerate(ranges)]
            store().add_parts(job_id, parts, total=vplan.frames)
            parts_dir(dst, job_id).mkdir(parents=True, exist_ok=True)
        else:
            parts = _plan_chunks(job, kind, src, dst, settings.max_parts)
    except FacemendError as e:
        fail(job, str(e), e.exit_code)
        return {"failed": str(e)}
    if not parts:  # every file was done before: the summary now, in this task
        return summarise(job_id)
    return _send_parts(store().get(job_id), range(len(parts)))


def _plan_chunks(job: Job, kind: str, src: Path, dst: Path, max_parts: int) -> list[dict]:
    """Walk the folder (here, not in ``submit``), write each chunk's file list beside the
    output (``worker.chunks``) and record the chunks: the job record keeps counts only. With
    ``--skip-existing`` the manifest is asked here first: the files it says are done go into
    no chunk (counted as skipped, with their reasons), so a rerun with little to do sends
    little. At most ``max_parts`` chunks: a bigger folder gets bigger ones."""
    from celery import current_task

    opts = JobOptions.from_dict(job.options)
    shard = getattr(current_task.request, "hostname", None) if current_task else None
    ask = kind == "folder" and opts.skip_existing  # records are kept with --skip-existing
    files, ignored, n_ignored, n_all, reasons = [], [], 0, 0, {}
    for p, item in (walk_folder(src) if kind == "folder" else [(src, None)]):
        if p is None:
            n_ignored += 1
            if len(ignored) < chunks.FIRST_FAILURES:
                ignored.append(item)
            continue
        n_all += 1
        out = dst if kind == "image" else mirrored_output(p, src, dst)
        why = manifest.should_skip(src, dst, p, out, opts, shard=shard) if ask else None
        if why:
            reasons[why] = reasons.get(why, 0) + 1
        else:
            files.append((p, out))
    n = max(job.chunk_files, -(-len(files) // max_parts))
    folder = chunks.job_dir(kind, dst, job.id)
    parts = []
    try:
        for k, i in enumerate(range(0, len(files), n)):
            chunks.write_chunk(folder, k, files[i:i + n])
            parts.append({"start": i, "stop": min(i + n, len(files)), "task_id": f"{job.id}-c{k}"})
    except OSError as e:
        from pipeline.errors import output_error

        raise output_error(folder, e) from None
    store().update(job.id, ignored=ignored, ignored_count=n_ignored, planned_skips=reasons,
                   done=n_all - len(files))
    store().add_parts(job.id, parts, total=n_all)
    return parts


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


def _part_finished(job: Job, index: int, worker: str, seconds: float, **counts) -> bool:
    """Record the part DONE (a chunk with its ``counts``); the part that completes the set
    sends the join (or summary). A copy of a part that had finished changes nothing and sends
    nothing (False)."""
    first, finished = store().finish_part(job.id, index, worker=worker, seconds=round(seconds, 2), **counts)
    state, _ = store().state(job.id)
    if state in (CANCELLED, FAILED, DONE):
        cleanup(job)
    elif first and finished == len(job.parts):
        last = join_job if job.kind == "video" else summarise
        store().update(job.id, **{"last.sent_at": store().now(), "last.queue": app.facemend_settings.cpu_queue})
        last.apply_async((job.id,), task_id=f"{job.id}-{last.name.split('.')[-1]}")
    return first


# ---- video --------------------------------------------------------------------------------

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


CANCEL_CHECK_SECONDS = 0.25  # a chunk asks for the cancel flag after each file it wrote, else this often


def _chunk(task, job: Job, index: int, attempt: int, token: str, beat: Heartbeat) -> dict:
    """One run of a chunk: its files (``worker.chunks``), each decided, processed and recorded
    in turn. A run after an earlier one died goes on from the first file that has no outcome
    yet. With records kept (``keeps_records``), ``--skip-existing`` asks the output folder's
    manifest, and each outcome is appended to this worker's shard of it once the output is in
    place."""
    job_id = job.id
    t0 = time.perf_counter()
    folder = chunks.job_dir(job.kind, job.output, job_id)
    opts = JobOptions.from_dict(job.options)
    progress = Progress(job_id, index, app.facemend_settings.progress_interval)
    cancelled = stop_requested(job_id, beat)
    worker = task.request.hostname or "?"
    try:
        pairs = chunks.read_chunk(folder, index)
        seen = chunks.results(folder, index, repair=True)
        book = None
        if job.kind == "folder" and keeps_records(Path(job.output), opts, job.records):
            book = {"src_root": job.input, "dst_root": job.output, "opts": opts, "shard": worker}
        next_check = 0.0
        with preview_sheet(opts, index) as write_sheet, report_samples(opts, index, folder, book):
            for src, out in pairs:
                if time.monotonic() >= next_check:  # skipped files take no time: ask now and then
                    if cancelled():
                        return _chunk_stopped(job, index, token, beat)
                    next_check = time.monotonic() + CANCEL_CHECK_SECONDS
                if src not in seen:
                    seen[src] = one_file(Path(src), Path(out), opts, book)
                    try:
                        chunks.add_result(folder, index, src, seen[src])
                    except OSError:
                        if not cancelled():
                            raise
                        if seen[src]["status"] == "processed":  # the cancel took the results away
                            remove_written([Path(out)], Path(job.output) if job.kind == "folder" else None)
                            if book is not None:
                                manifest.record(**book, src=src, out=out, outcome=manifest.REMOVED,
                                                error="the job was cancelled")
                        return _chunk_stopped(job, index, token, beat)
                    if seen[src]["status"] != "skipped":  # cancelled while it was written: it goes
                        if cancelled():  # with the others
                            return _chunk_stopped(job, index, token, beat)
                        next_check = time.monotonic() + CANCEL_CHECK_SECONDS
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
    counts = chunks.tally(seen)
    if not _part_finished(job, index, worker, time.perf_counter() - t0, files=len(pairs), **counts):
        return {"files": len(pairs), "duplicate": True}
    return {"files": len(pairs)}


def _chunk_stopped(job: Job, index: int, token: str, beat: Heartbeat) -> dict:
    if beat.superseded.is_set():  # another runner holds the chunk now: leave it its state
        return {"superseded": True}
    return part_cancelled(job, index)


@app.task(name="facemend.summarise")
@guarded
def summarise(job_id: str) -> dict:
    """Add up the chunks' counts; the report (a folder job that keeps records); DONE (or
    FAILED for a single image). The record keeps counts and the first failures only."""
    job = store().get(job_id)
    if job.terminal:
        return {"skipped": job.state}
    folder = chunks.job_dir(job.kind, job.output, job_id)
    summary, failures, notes = job_summary(job, folder)
    if job.kind == "folder":
        report = write_job_report(job, folder, summary, failures, notes)
        if report:
            summary["report"] = report
            store().update(job_id, report=report)
    if job.kind == "image" and failures:
        fail(job, failures[0]["error"], failures[0]["exit_code"])
    else:
        store().set_state(job_id, DONE, summary=summary, done=job.total, exit_code=6 if failures else 0)
    chunks.remove(folder)
    return summary
