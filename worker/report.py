"""The end of a folder or image job: its summary, added up from the chunks' records and result
files, and a folder job's morning report (``pipeline.report``) with the before/after crops its
first chunks keep. The job record keeps counts and the first failures only; the report has all.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import manifest
from pipeline.folder import keeps_records, sweep_leftovers
from pipeline.job import JobOptions, JobResult
from pipeline.restore import PreviewSink

from . import chunks
from .app import app
from .engines import engine_for
from .parts import store
from .records import Job

log = logging.getLogger(__name__)


def job_summary(job: Job, folder: Path) -> tuple[dict, list[dict], list[str]]:
    """The job's summary (counts, skip reasons, the first failures and notes, the workers'
    figures) and every failure and note its chunks recorded."""
    fields = store().part_fields(job.id)
    counts = {k: sum(int(fields.get(f"{i}.{k}") or 0) for i in range(len(job.parts)))
              for k in ("processed", "skipped", "failed", "faces")}
    planned = json.loads(store().r.hget(store().key(job.id), "planned_skips") or "{}")  # by the plan
    counts["skipped"] += sum(planned.values())
    failures, notes, reasons = [], [], dict(planned)
    for src, r in chunks.all_results(folder, len(job.parts)):
        if r["status"] == "failed":
            failures.append({"file": src, "error": r["error"], "exit_code": r.get("exit_code", 1)})
        elif r["status"] == "skipped":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        else:
            notes += r.get("notes") or []
    first = chunks.FIRST_FAILURES
    summary = {**counts, "failures": [{"file": f["file"], "error": f["error"]} for f in failures[:first]],
               "skip_reasons": reasons, "notes": notes[:first], "workers": worker_figures(job, fields)}
    if len(failures) > first:
        summary["failures_left_out"] = len(failures) - first
    return summary, failures, notes


def worker_figures(job: Job, fields: dict) -> dict:
    """{worker: {"chunks", "files", "seconds", "files_per_second"}} from the chunks' records."""
    out: dict[str, dict] = {}
    for i in range(len(job.parts)):
        w = out.setdefault(fields.get(f"{i}.worker") or "?", {"chunks": 0, "files": 0, "seconds": 0.0})
        w["chunks"] += 1
        w["files"] += int(fields.get(f"{i}.files") or 0)
        w["seconds"] = round(w["seconds"] + float(fields.get(f"{i}.seconds") or 0), 2)
    for w in out.values():
        w["files_per_second"] = round(w["files"] / w["seconds"], 2) if w["seconds"] else None
    return out


def cancelled_report(job: Job, folder: Path, removed: list[tuple[str, Path]]) -> str | None:
    """A cancelled folder job that keeps records: ``removed`` (the (input, output) pairs it
    wrote, about to be removed) recorded as ``removed`` in its manifest (a shard of the
    cancelling process), and its report with status ``cancelled``, from what its chunks had
    finished. Returns the report's path (also set on the job record), or None. Never raises:
    the cancel goes on."""
    try:
        opts = JobOptions.from_dict(job.options)
        if not keeps_records(Path(job.output), opts, job.records):
            return None
        if removed:
            with manifest.Manifest(job.input, job.output, opts, shard=f"cancel-{manifest.worker_name()}") as book:
                for src, out in removed:
                    book.record(Path(src), out, manifest.REMOVED, error="the job was cancelled")
        summary, failures, notes = job_summary(job, folder)
        notes = [f"cancelled: the {len(removed)} files it wrote were removed", *notes]
        report = write_job_report(job, folder, summary, failures, notes, status="cancelled")
        if report:
            store().update(job.id, report=report)
        return report
    except Exception as e:  # noqa: BLE001 - the report is a courtesy; the cancel must finish
        log.warning("%s: the cancelled job's report cannot be written (%s)", job.output, e)
        return None


def write_job_report(job: Job, folder: Path, summary: dict, failures: list, notes: list,
                     status: str | None = None) -> str | None:
    """The morning report (``pipeline.report``) of a folder job that keeps records, from its
    summary; every failure is in it. ``status``: default ``done`` or ``partly failed``. A
    report that cannot be written is a warning."""
    from pipeline.report import SAMPLES, build_report, write_report

    opts = JobOptions.from_dict(job.options)
    if not keeps_records(Path(job.output), opts, job.records):
        return None
    sweep_leftovers(Path(job.output))  # what workers killed mid-file in this or an earlier run left
    h = store().r.hmget(store().key(job.id), "ignored", "ignored_count")
    result = JobResult(job.input, job.output, "folder", job.task, faces=summary["faces"],
                       files={k: summary[k] for k in ("processed", "skipped", "failed")},
                       failures=[{"file": f["file"], "error": f["error"]} for f in failures], notes=notes,
                       skipped=json.loads(h[0] or "[]"))
    status = status or ("partly failed" if failures else "done")
    report = build_report(result, opts, status=status, started=job.started or job.created, ended=time.time(),
                          workers=summary["workers"])
    report["ignored"] = int(h[1] or 0)
    try:
        return str(write_report(Path(job.output), report, chunks.load_samples(folder, SAMPLES)))
    except OSError as e:
        log.warning("%s: the report cannot be written (%s)", manifest.manifest_dir(job.output), e.strerror or e)
        return None


@contextmanager
def report_samples(opts: JobOptions, index: int, folder: Path, book: dict | None):
    """A job that keeps a report: the first chunks keep a few before/after crops for its page
    (chunk 0 up to the report's number, the next ones one each)."""
    from pipeline.report import SAMPLES

    restorer = engine_for(opts, app.facemend_settings).restorer if book and index < SAMPLES else None
    if restorer is None or restorer.identity:
        yield
        return
    keep = SAMPLES if index == 0 else 1
    own = restorer.preview is None  # else --preview's sink (chunk 0): its pairs serve both
    sink = PreviewSink(limit=keep) if own else restorer.preview
    restorer.preview = sink
    try:
        yield
        try:
            chunks.save_samples(folder, index, sink.pairs[:keep])
        except OSError as e:
            log.warning("%s: report samples not kept (%s)", folder, e.strerror or e)
    finally:
        if own:
            restorer.preview = None
