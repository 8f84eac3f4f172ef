"""The client side of distributed jobs: submit, follow, cancel. Used by the CLI.

``submit`` validates the paths here first (same checks and exit codes as the embedded run),
writes the job record, and sends the ``plan`` task. ``cancel`` raises the job's cancel flag
(running parts stop within one batch), marks it CANCELLED and revokes its queued tasks (never
``terminate``: a killed child could leave a half-written temp file and a lost message).
"""
from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from pipeline.job import JobOptions
from pipeline.paths import check_paths, resolve_output

from .errors import BrokerUnavailable, WaitTimeout
from .records import CANCELLED, DONE, TERMINAL, Job, JobStore
from .segments import parts_dir
from .settings import Settings, redact
from .storage import check_options, check_roots

log = logging.getLogger(__name__)


def connect(settings: Settings) -> JobStore:
    """A JobStore for ``settings``, pinged (BrokerUnavailable when Redis does not answer)."""
    store = JobStore(settings)
    store.ping()
    return store


def submit(src: Path, opts: JobOptions, settings: Settings, *, queue: str | None = None,
           records: bool = False) -> Job:
    """Queue a job for ``src``; returns its record (state QUEUED). ``queue``: where its segments
    or chunks go (default FACEMEND_GPU_QUEUE), e.g. a nightly archive queue of its own.
    ``records``: a folder job keeps its manifest and report (``--manifest``; always with
    ``--skip-existing``). A folder is not walked here (only up to its first media file): the
    plan task does it."""
    from .app import app, configure

    src = Path(src).absolute()
    # morph's second image and the preview sheet: workers on other machines need absolute paths
    absolute = {k: str(Path(getattr(opts, k)).absolute()) for k in ("to", "preview") if getattr(opts, k)}
    opts = JobOptions(**{**asdict(opts), **absolute})
    dst = resolve_output(src, opts).absolute()
    check_roots(src, dst, settings)
    check_options(opts, dst, settings)
    kind = check_paths(src, dst, opts)
    store = connect(settings)
    configure(settings)
    job_id = uuid.uuid4().hex[:16]
    opts = JobOptions(**{**asdict(opts), "output": str(dst)})
    store.create(job_id, kind=kind, task=opts.task, input=str(src), output=str(dst), options=opts.record(),
                 segment_seconds=settings.segment_seconds, chunk_files=settings.chunk_files,
                 queue=queue or "", records=records)
    store.update(job_id, **{"plan.queue": settings.cpu_queue})  # where the watchdog looks for it
    try:
        app.send_task("facemend.plan", (job_id,), task_id=f"{job_id}-plan")
    except Exception as e:  # kombu's OperationalError and friends
        store.fail(job_id, f"cannot queue the job ({e})", BrokerUnavailable.exit_code)
        raise BrokerUnavailable(f"{redact(settings.broker_url)}: cannot queue the job ({e})") from None
    return store.get(job_id)


def follow(store: JobStore, job_id: str, *, on_update: Callable[[Job], None] | None = None,
           interval: float = 0.5, timeout: float | None = None) -> Job:
    """Poll the record until the job is terminal; ``on_update(job)`` after each read. Every
    FACEMEND_HEARTBEAT_INTERVAL it also runs the watchdog's check of this job (lost parts are
    sent again, a stalled job FAILS), so a job followed by ``wait`` recovers even while no
    worker's watchdog runs."""
    deadline = None if timeout is None else time.monotonic() + timeout
    dog, next_check = None, time.monotonic() + store.settings.heartbeat_interval
    while True:
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + store.settings.heartbeat_interval
            try:
                dog = dog or _watchdog(store)
                for line in dog.check(job_id):
                    log.info("watchdog: %s", line)
            except Exception as e:  # the check is a help, never a reason to stop following
                log.debug("watchdog check of %s failed: %s", job_id, e)
        job = store.get(job_id)
        if on_update:
            on_update(job)
        if job.terminal:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimeout(f"{job_id}: still {job.state} after {timeout:g} s "
                              f"({job.done}/{job.total} {job.unit})")
        time.sleep(interval)


def watch(store: JobStore, job_id: str) -> list[str]:
    """Run the watchdog's check of one job now (what ``wait`` does every heartbeat interval):
    lost parts are sent again, a stalled job FAILS. Returns what it did, one line each."""
    return _watchdog(store).check(job_id)


def _watchdog(store: JobStore):
    from .app import app, configure
    from .watchdog import for_app

    configure(store.settings)
    return for_app(app, store)


def cancel(store: JobStore, settings: Settings, job_id: str) -> Job:
    """Cancel a job: flag, CANCELLED, revoke queued tasks, remove finished parts."""
    from .app import app, configure

    job = store.get(job_id)
    if job.terminal:
        return job
    store.request_cancel(job_id)
    job = store.get(job_id)
    if job.state == CANCELLED:
        configure(settings)
        ids = [f"{job_id}-plan", f"{job_id}-join", f"{job_id}-summarise"]
        ids += [p["task_id"] for p in job.parts if p["task_id"]]
        app.control.revoke(ids)  # never terminate: running parts see the flag and stop themselves
        if job.kind == "video":
            shutil.rmtree(parts_dir(Path(job.output), job_id), ignore_errors=True)
        else:  # the files written so far (a running chunk removes the one it is writing)
            from .parts import remove_outputs

            remove_outputs(store, job)
    return job


def exit_code(job: Job) -> int:
    """The CLI's exit status for a finished job."""
    if job.state == DONE:
        return job.exit_code or 0
    if job.state == CANCELLED:
        return 5
    return job.exit_code or 1


def describe(job: Job) -> str:
    """One line for a person: id, state, progress, output or error."""
    pct = f" {100 * min(job.done, job.total) / job.total:.0f}%" if job.total else ""
    line = f"{job.id}  {job.state:<9} {job.kind:<6} {min(job.done, job.total)}/{job.total} {job.unit}{pct}"
    s = job.summary
    if job.state == DONE and (job.kind in ("folder", "image") or "skipped" in s):
        line += f"  processed {s.get('processed', 0)}, skipped {s.get('skipped', 0)}, failed {s.get('failed', 0)}"
        if not s.get("processed") and not s.get("failed") and s.get("skipped"):
            line += " (nothing to do: every file was done before)"
    if job.state == DONE:
        line += f"  -> {job.output}"
    elif job.error:
        line += f"  {job.error}"
    if job.report:
        line += f"  report {job.report}"
    return line


__all__ = ["TERMINAL", "cancel", "connect", "describe", "exit_code", "follow", "submit", "watch"]
