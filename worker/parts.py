"""What every segment and chunk task shares: the job store, throttled progress, the cancel
check, attempt counting, failing a job and removing its parts.

Each start of a part counts an attempt in the job record (``begin_part``); past
``max_attempts`` the job is FAILED, whatever ended the earlier attempts (an exception, a hard
time limit, a killed worker whose message Redis handed out again).
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from celery import Task
from celery.exceptions import TimeLimitExceeded

from pipeline.errors import FacemendError

from . import chunks
from .app import app
from .records import CANCELLED, DONE, FAILED, Job, JobStore
from .segments import parts_dir

log = logging.getLogger(__name__)

_store: JobStore | None = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore(app.facemend_settings)
    return _store


class Progress:
    """progress(n) callback that writes to Redis at most every ``interval`` seconds."""

    def __init__(self, job_id: str, index: int, interval: float) -> None:
        self.job_id, self.index, self.interval = job_id, index, interval
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            store().progress(self.job_id, self.index, self.pending)
            self.pending = 0
        self.last = time.monotonic()


class Heartbeat:
    """While a part (or the plan, or the join: ``index`` "plan" / "last") runs, a thread writes
    its heartbeat into the job record every FACEMEND_HEARTBEAT_INTERVAL seconds. When the record
    says another runner holds it now (the watchdog gave it up for lost and sent it again),
    ``superseded`` is set: the run stops and changes nothing."""

    def __init__(self, job_id: str, index: int | str, token: str) -> None:
        self.job_id, self.index, self.token = job_id, index, token
        self.superseded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}-{index}", daemon=True)

    def _run(self) -> None:
        interval = app.facemend_settings.heartbeat_interval
        while not self._stop.wait(interval):
            try:
                if not store().beat(self.job_id, self.index, self.token):
                    log.warning("job %s part %s: taken over by another runner; stopping", self.job_id, self.index)
                    self.superseded.set()
                    return
            except Exception as e:  # Redis restarting: beat again next time
                log.info("job %s part %s: heartbeat not written (%s)", self.job_id, self.index, e)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def new_token() -> str:
    return uuid.uuid4().hex


def stop_requested(job_id: str, beat: Heartbeat | None = None):
    """should_cancel() for a part: the job was cancelled or failed elsewhere, or (``beat``)
    another runner took the part over."""

    def check() -> bool:
        if beat is not None and beat.superseded.is_set():
            return True
        try:
            state, cancel = store().state(job_id)
        except Exception:  # Redis hiccup: keep working; the next batch asks again
            log.warning("%s: cannot read the cancel flag", job_id, exc_info=True)
            return False
        return cancel or state in (CANCELLED, FAILED)

    return check


def fail(job: Job, error: str, exit_code: int = 1) -> None:
    log.error("job %s FAILED: %s", job.id, error)
    store().fail(job.id, error, exit_code)
    cleanup(job)


def cleanup(job: Job) -> None:
    """Remove a video job's parts (the job is over, whichever way); a cancelled folder or image
    job's outputs; a folder or image job's work files once it is over."""
    if job.kind == "video" and job.output:
        shutil.rmtree(parts_dir(Path(job.output), job.id), ignore_errors=True)
    elif job.output:
        try:
            state, _ = store().state(job.id)
        except Exception:  # Redis hiccup: the cancel's own clean-up, or the next part's, removes them
            return
        if state == CANCELLED:
            remove_outputs(store(), job)
        elif state in (DONE, FAILED):
            chunks.remove(chunks.job_dir(job.kind, job.output, job.id))


def remove_outputs(records: JobStore, job: Job) -> None:
    """A cancelled folder or image job: remove the files it wrote (recorded as processed; a
    skipped file's output was not written by it), the folders this leaves empty, and the
    job's work files. A folder job that keeps records first writes its report (status
    ``cancelled``, ``worker.report.cancelled_report``) and records each removed output in its
    manifest as ``removed``, as an embedded run does."""
    from pipeline.folder import remove_written

    folder = chunks.job_dir(job.kind, job.output, job.id)
    done = [(src, Path(r["output"])) for src, r in chunks.all_results(folder, len(job.parts))
            if r.get("status") == "processed" and r.get("output")]
    if job.kind == "folder":
        from .report import cancelled_report

        cancelled_report(job, folder, done)
    chunks.remove(folder)
    if done:
        remove_written([out for _, out in done], Path(job.output) if job.kind == "folder" else None)


class PartTask(Task):
    """A segment or chunk. A hard time limit kills the child without running our handlers; this
    hook (run by the worker's main process) records it and sends the part again, or fails the
    job once its attempts are spent."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        if not isinstance(exc, TimeLimitExceeded):
            return
        job_id, index = args
        job = store().get(job_id)
        if job.terminal or index in store().finished(job_id):  # a copy of a finished part
            return
        error = f"hard time limit exceeded ({exc})"
        store().set_part(job_id, index, state=FAILED, error=error)
        if job.parts[index]["attempts"] < app.facemend_settings.max_attempts:
            self.apply_async(args, task_id=task_id)
        else:
            fail(job, f"part {index}: {error} on every attempt")


def guarded(fn):
    """Run a plan/join/summarise body; any unexpected error FAILS the job instead of leaving it
    RUNNING forever (the traceback goes to the worker log)."""

    def run(job_id: str) -> dict:
        try:
            return fn(job_id)
        except FacemendError:
            raise
        except Exception as e:
            log.exception("job %s: %s failed", job_id, fn.__name__)
            try:
                fail(store().get(job_id), f"{fn.__name__}: {type(e).__name__}: {e}")
            except Exception:  # Redis itself is gone: nothing more to record
                pass
            return {"failed": str(e)}

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def begin_part(task, job_id: str, index: int, token: str = "-") -> tuple[Job | None, int]:
    """Read the job, take the part (``token``: this run), count an attempt; (None, 0) when there
    is nothing to do: the job is over, the part already finished (a redelivered or resent
    copy), or another runner of it still sends heartbeats. Such a copy changes nothing."""
    job = store().get(job_id, part=index)
    if job.terminal:
        cleanup(job)
        return None, 0
    attempt = store().start_part(job_id, index, task.request.hostname or "?", token)
    if attempt < 0:
        log.info("job %s part %d: %s; this copy does nothing", job_id, index,
                 "already finished" if attempt == -1 else "another worker runs it")
        return None, 0
    limit = app.facemend_settings.max_attempts
    if attempt > limit:
        last = job.parts[index].get("error") or "the worker was lost (killed, crashed or out of memory)"
        store().set_part(job_id, index, state=FAILED)
        fail(job, f"{'segment' if job.kind == 'video' else 'chunk'} {index} did not finish in "
                  f"{limit} attempts; last: {last}")
        return None, 0
    return job, attempt


def part_cancelled(job: Job, index: int) -> dict:
    """Mark a part CANCELLED and remove the job's parts (a video job's; the job is over)."""
    store().set_part(job.id, index, state=CANCELLED)
    cleanup(job)
    return {"cancelled": True}


def stopped_by_cancel(job: Job, index: int, e: Exception) -> bool:
    """True, with the part marked CANCELLED and the job's parts removed, when the job was
    cancelled while the part ran: an error then is the cancel's doing (its clean-up removes the
    parts folder a running segment writes into), not a reason to fail or try again."""
    try:
        state, cancel = store().state(job.id)
    except Exception:  # Redis hiccup: treat the error as the part's own
        return False
    if not (cancel or state == CANCELLED):
        return False
    log.info("job %s part %d stopped by the cancel (%s: %s)", job.id, index, type(e).__name__, e)
    part_cancelled(job, index)
    return True


def superseded(job: Job, index: int, token: str | None, e: BaseException | None = None) -> bool:
    """True when this run of part ``index`` no longer matters: the job is over (DONE, FAILED,
    CANCELLED: its clean-up may have removed the folder the run writes into), the part finished
    (another copy won), or another runner holds it. The run then marks nothing: a copy never
    fails a finished part. Removes the job's parts when the job is over."""
    if token is None:
        return False
    try:
        state, _ = store().state(job.id)
        fields = store().r.hmget(store().key(job.id, "parts"), f"{index}.token")
        finished = index in store().finished(job.id)
    except Exception:  # Redis hiccup: treat the error as the part's own
        return False
    over = state in (DONE, FAILED, CANCELLED)
    if not (over or finished or fields[0] != token):
        return False
    log.info("job %s part %d: this run is superseded (%s)%s", job.id, index,
             "job " + state if over else "part finished" if finished else "another runner holds it",
             f"; its {type(e).__name__}: {e}" if e is not None else "")
    if over:
        cleanup(job)
    return True


def part_failed(task, job: Job, index: int, attempt: int, e: Exception, token: str | None = None) -> dict:
    """An unexpected error: try again (a new message) until the attempts run out; nothing when
    the job was cancelled meanwhile (``stopped_by_cancel``) or this run was superseded."""
    if stopped_by_cancel(job, index, e):
        return {"cancelled": True}
    if superseded(job, index, token, e):
        return {"superseded": True}
    error = f"{type(e).__name__}: {e}".splitlines()[0]
    store().set_part(job.id, index, state=FAILED, error=error)
    if attempt < app.facemend_settings.max_attempts:
        log.warning("job %s part %d attempt %d failed (%s); retrying", job.id, index, attempt, error)
        raise task.retry(exc=e, countdown=1, max_retries=None)
    fail(job, f"part {index} failed on attempt {attempt}: {error}")
    return {"failed": error}
