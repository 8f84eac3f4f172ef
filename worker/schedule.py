"""The nightly schedule: Celery beat submits each archive folder once a day.

``celery -A worker.schedule beat`` (the ``beat`` service of ``docker/compose.yaml``) sends the
``facemend.archive`` task at FACEMEND_ARCHIVE_AT (FACEMEND_ARCHIVE_TIMEZONE) for each folder of
FACEMEND_ARCHIVE_FOLDERS; a worker serving the cpu queue runs it, which submits the folder as a
job with ``--skip-existing`` (so the manifest makes the rerun do only what is new or changed)
whose chunks go to FACEMEND_ARCHIVE_QUEUE, apart from interactive jobs. Every job keeps its
manifest and writes its report in ``OUTPUT/.facemend/``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from celery.schedules import crontab

from .app import app
from .settings import Settings, archive_time

log = logging.getLogger(__name__)


def archive_folders(settings: Settings) -> list[tuple[str, str | None]]:
    """(input, output or None for the default ``INPUT.TASK``) of each FACEMEND_ARCHIVE_FOLDERS entry."""
    out = []
    for entry in settings.archive_folders:
        src, _, dst = entry.partition("=")
        out.append((src, dst or None))
    return out


def beat_schedule(settings: Settings) -> dict:
    """Celery beat's schedule for ``settings``: one entry per archive folder, daily at
    FACEMEND_ARCHIVE_AT, sending ``facemend.archive`` to the cpu queue."""
    hour, minute = archive_time(settings.archive_at)
    return {
        f"archive {src}": {
            "task": "facemend.archive",
            "schedule": crontab(hour=hour, minute=minute),
            "args": (src, dst, settings.archive_task, settings.archive_queue),
            "options": {"queue": settings.cpu_queue, "expires": 6 * 3600},
        }
        for src, dst in archive_folders(settings)
    }


def configure_beat(settings: Settings) -> None:
    app.conf.beat_schedule = beat_schedule(settings)
    app.conf.timezone = settings.archive_timezone
    app.conf.enable_utc = True


@app.task(name="facemend.archive")
def archive(src: str, dst: str | None = None, task: str | None = None, queue: str | None = None) -> dict:
    """Submit one archive folder: ``--skip-existing``, records kept, chunks to ``queue``. The
    beat's settings name the task and queue (default: this worker's)."""
    from pipeline.errors import FacemendError
    from pipeline.job import JobOptions

    from .jobs import submit

    settings: Settings = app.facemend_settings
    task, queue = task or settings.archive_task, queue or settings.archive_queue
    opts = JobOptions(task=task, output=dst, skip_existing=True)
    try:
        job = submit(Path(src), opts, settings, queue=queue, records=True)
    except FacemendError as e:  # a folder missing tonight: said in the log, the others go on
        log.error("archive %s: not submitted: %s", src, e)
        return {"input": src, "error": str(e)}
    log.info("archive %s: job %s (%s, queue %s)", src, job.id, task, queue)
    return {"input": src, "job": job.id}


configure_beat(app.facemend_settings)
