"""Nightly archives, queued: the manifest decides what real workers redo, a worker killed mid-run
loses and duplicates nothing, job records in Redis stay small, the report is written and
``status --json`` points to it, and the beat schedule follows the settings.

Real Redis and real worker processes, as in test_worker (its fixtures and helpers), on small
folders of UTKFace photos (hard links) with the identity task.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.archive import build_archive, job_memory, weights_python
from conftest import ROOT
from test_worker import cli, cli_json, db, record, wait_until, workers  # noqa: F401 (fixtures)

FAST_BEAT = {"FACEMEND_HEARTBEAT_INTERVAL": "0.5", "FACEMEND_HEARTBEAT_TIMEOUT": "2"}


def records(dst: Path) -> list[dict]:
    lines = []
    for path in sorted((dst / ".facemend").glob("manifest*.jsonl")):
        lines += [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return lines


def counts(job: dict) -> tuple[int, int, int]:
    s = job["summary"]
    return s["processed"], s["skipped"], s["failed"]


def outputs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg")
                  if not p.name.startswith(".") and ".facemend" not in p.parts)


@pytest.fixture
def patched_weights(tmp_path, monkeypatch):
    """Workers started while this is active record the sha256 of this file as their weights."""
    weights = tmp_path / "net.safetensors"
    weights.write_bytes(b"first weights")
    monkeypatch.setattr(sys, "executable", str(weights_python(tmp_path / "python-w", weights)))
    return weights


def test_queued_manifest_decides_what_is_redone_and_the_report_is_written(workers, db, tmp_path, patched_weights):
    src = build_archive(tmp_path / "album", 6, depth=2)
    dst = tmp_path / "album.identity"
    workers.start("w1", "w2")
    run = ("submit", src, "--task", "identity", "--skip-existing", "--wait")
    first = cli_json(*run, FACEMEND_CHUNK_FILES=2)
    assert first["state"] == "DONE" and counts(first) == (6, 0, 0), first
    assert outputs(dst) == outputs(src)
    shards = {p.name for p in (dst / ".facemend").glob("manifest*.jsonl")}
    assert shards and all(s.startswith("manifest.w") for s in shards)  # one per worker, never shared
    recs = records(dst)
    assert len(recs) == 6 and {r["outcome"] for r in recs} == {"done"}
    assert {r["weights"]["net.safetensors"] for r in recs} == {
        __import__("hashlib").sha256(b"first weights").hexdigest()}
    report = json.loads(Path(first["report"]).read_text())
    assert first["summary"]["report"] == first["report"] == str(dst / ".facemend" / "report.json")
    assert report["files"] == {"processed": 6, "skipped": 0, "failed": 0} and report["status"] == "done"
    assert sum(w["files"] for w in report["workers"].values()) == 6
    assert (dst / ".facemend" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not (dst / ".facemend" / "jobs").exists()  # the job's work files are gone
    assert cli_json("status", first["id"])["report"] == first["report"]
    assert job_memory(db, first["id"])["bytes"] < 3 * 2048 + 8192  # three chunks, no file list

    def again(**env) -> dict:
        job = cli_json(*run, **env)
        assert job["state"] == "DONE", job
        return job

    assert counts(again()) == (0, 6, 0)  # same input, options and weights: nothing to do
    touched = sorted(src.rglob("*.jpg"))[1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    job = again()
    assert counts(job) == (1, 5, 0) and job["summary"]["skip_reasons"] == {
        "done before from the same input, options and weights (manifest)": 5}
    gone = sorted(dst.rglob("*.jpg"))[-1]
    gone.unlink()
    assert counts(again()) == (1, 5, 0) and gone.exists()  # a deleted output is made again
    assert counts(cli_json(*run, "--min-face", "30")) == (6, 0, 0)  # another option: all again
    patched_weights.write_bytes(b"retrained weights!")
    assert counts(again()) == (6, 0, 0)  # new weights: all again (the workers hash the file anew)
    assert len(records(dst)) == 6 + 1 + 1 + 6 + 6


def test_worker_killed_mid_run_then_the_job_and_a_rerun_do_exactly_what_is_missing(workers, tmp_path, db):
    src = build_archive(tmp_path / "album", 160, depth=2)
    dst = tmp_path / "album.identity"
    # progress written every 50 ms, so that a chunk's middle is seen however fast the machine is
    workers.start("w1", "w2", FACEMEND_PROGRESS_INTERVAL="0.05", **FAST_BEAT)
    job_id = cli("submit", src, "--task", "identity", "--skip-existing", FACEMEND_CHUNK_FILES=20,
                 **FAST_BEAT).stdout.strip()

    def w1_mid_chunk():
        parts = record(db, job_id)["parts"]
        return next((i for i, p in enumerate(parts) if p.get("state") == "RUNNING"
                     and p.get("worker", "").startswith("w1@") and 2 <= int(p.get("done") or 0) <= 17), None)

    wait_until(lambda: w1_mid_chunk() is not None and int(record(db, job_id)["done"]) >= 20, 60,
               "w1 in the middle of a chunk", every=0.02)
    killed = w1_mid_chunk()
    workers.kill("w1")  # SIGKILL mid-chunk: its chunk is sent again to w2 by the watchdog
    job = cli_json("wait", job_id, "--timeout", 120, **FAST_BEAT)
    assert job["state"] == "DONE" and job["summary"]["failed"] == 0, job
    assert sum(counts(job)) == 160
    assert job["parts"][killed]["attempts"] == 2 and job["parts"][killed]["worker"].startswith("w2@")
    assert outputs(dst) == outputs(src)  # no file lost
    done = Counter(r["input"] for r in records(dst) if r["outcome"] == "done")
    assert set(done) == {str(p.relative_to(src)) for p in src.rglob("*.jpg")}
    assert set(done.values()) == {1}  # none done twice
    left = dst / ".photo.partial.424242.jpg"  # a file a worker killed mid-write left, a day ago
    left.write_bytes(b"half written")
    os.utime(left, (left.stat().st_atime, left.stat().st_mtime - 86400))
    rerun = cli_json("submit", src, "--task", "identity", "--skip-existing", "--wait", **FAST_BEAT)
    assert counts(rerun) == (0, 160, 0), rerun
    assert not left.exists()  # the queued job's end removed it


def test_a_cancelled_queued_folder_job_writes_its_report_and_records_what_it_removed(workers, db, tmp_path):
    """As an embedded run does: the morning report says ``cancelled``, every output the job
    wrote is gone and recorded ``removed`` in the manifest, and a rerun redoes those files."""
    import shutil

    from conftest import VIDEOS, cut
    from test_worker import SLOW, status

    src = tmp_path / "clips"
    src.mkdir()
    cut(VIDEOS / "closeup_pexels.mp4", src / "a.mp4", 2.0)
    for name in "bcdef":
        shutil.copy(src / "a.mp4", src / f"{name}.mp4")
    dst = tmp_path / "clips.identity"
    workers.start("w1")
    job_id = cli_json("submit", src, *SLOW, "--skip-existing", FACEMEND_CHUNK_FILES=1)["id"]
    wait_until(lambda: int(record(db, job_id).get("done", 0)) > 0, 120, "the first file")
    p = cli("cancel", job_id)
    assert p.returncode == 0, p.stderr
    assert cli("wait", job_id).returncode == 5
    wait_until(lambda: all(part.get("state") != "RUNNING" for part in record(db, job_id)["parts"]), 60,
               "the running chunk to stop")
    report = json.loads((dst / ".facemend" / "report.json").read_text())
    assert report["status"] == "cancelled" and report["files"]["processed"] >= 1, report
    assert any(n.startswith("cancelled: the ") for n in report["notes"])
    assert status(job_id)["report"] == str(dst / ".facemend" / "report.json")
    assert not list(dst.rglob("*.mp4"))  # every output it wrote is gone
    latest = {}
    for r in sorted(records(dst), key=lambda r: r["t"]):
        latest[r["input"]] = r
    assert latest and all(r["outcome"] == "removed" for r in latest.values()), latest
    assert len(latest) >= report["files"]["processed"]
    # (ultrafast: the preset is not what is tested, and the cancelled job's veryslow differs anyway)
    rerun = cli_json("submit", src, "--task", "identity", "--preset", "ultrafast", "--skip-existing", "--wait",
                     FACEMEND_CHUNK_FILES=3)
    assert counts(rerun) == (6, 0, 0), rerun


def test_a_big_folder_job_record_holds_counts_not_file_lists(workers, tmp_path, db):
    """3,000 files planned by a worker that serves the cpu queue only (the walk is the plan
    task's; no chunk runs): the record has no per-file entry, and its chunks are capped by
    FACEMEND_MAX_PARTS, so it stays small whatever the folder's size."""
    src = build_archive(tmp_path / "album", 3000, depth=3)
    workers.start("plan", args=("--queues", "cpu"), FACEMEND_MAX_PARTS=40)  # the planner's setting
    job = cli_json("submit", src, "--task", "identity", "--skip-existing")
    assert job["total"] == 0  # the folder is walked by the plan task, not by submit
    job_id = job["id"]
    wait_until(lambda: record(db, job_id)["parts"], 60, "the plan")
    h = record(db, job_id)
    assert int(h["total"]) == 3000 and len(h["parts"]) == 40  # 75 files a chunk, not 16
    names = [k.decode() for k in db.keys(f"facemend:job:{job_id}*")]
    assert sorted(names) == [f"facemend:job:{job_id}", f"facemend:job:{job_id}:parts"]
    assert not any("utk" in v or ".jpg" in v for v in db.hvals(f"facemend:job:{job_id}") for v in [v.decode()])
    plan = (tmp_path / "album.identity" / ".facemend" / "jobs" / job_id)
    assert len(list(plan.glob("chunk-*.json"))) == 40
    used = job_memory(db, job_id)["bytes"]
    assert used < 40 * 1024, used
    # a chunk that has run adds its worker, counts and times (under 1 KB); 100,000 files make
    # at most FACEMEND_MAX_PARTS (default 500) chunks
    assert (used / 40 + 1024) * 500 < 2 * 1024 * 1024
    cli("cancel", job_id)


def test_the_schedule_builds_one_daily_entry_per_folder_from_the_settings(monkeypatch, tmp_path):
    import yaml

    from worker import schedule
    from worker.errors import SettingsError
    from worker.settings import Settings

    s = Settings.from_env({"FACEMEND_ARCHIVE_FOLDERS": "/data/a:/data/b=/data/b.out", "FACEMEND_ARCHIVE_AT": "03:15",
                           "FACEMEND_ARCHIVE_TASK": "identity", "FACEMEND_CPU_QUEUE": "light"})
    entries = schedule.beat_schedule(s)
    assert sorted(entries) == ["archive /data/a", "archive /data/b"]
    b = entries["archive /data/b"]
    assert b["task"] == "facemend.archive" and b["args"] == ("/data/b", "/data/b.out", "identity", "archive")
    assert b["options"]["queue"] == "light" and entries["archive /data/a"]["args"][:2] == ("/data/a", None)
    assert b["schedule"].hour == {3} and b["schedule"].minute == {15}
    assert schedule.beat_schedule(Settings()) == {}
    for bad in ({"FACEMEND_ARCHIVE_AT": "25:00"}, {"FACEMEND_ARCHIVE_FOLDERS": "relative/x"}):
        with pytest.raises(SettingsError, match="FACEMEND_ARCHIVE"):
            Settings.from_env(bad)
    sent = []
    monkeypatch.setattr(schedule.app, "facemend_settings", s)
    monkeypatch.setattr("worker.jobs.submit", lambda src, opts, settings, **kw: sent.append((src, opts, kw))
                        or type("J", (), {"id": "j1"}))
    assert schedule.archive(*b["args"]) == {"input": "/data/b", "job": "j1"}
    (src, opts, kw), = sent
    assert (str(src), opts.task, opts.output, opts.skip_existing) == ("/data/b", "identity", "/data/b.out", True)
    assert kw == {"queue": "archive", "records": True}
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    beat = compose["beat"]
    assert "worker.schedule" in beat["command"] and "beat" in beat["command"]
    assert {"FACEMEND_ARCHIVE_FOLDERS", "FACEMEND_ARCHIVE_AT"} <= set(beat["environment"])
    assert "archive" in " ".join(compose["gpu-worker"]["command"])
