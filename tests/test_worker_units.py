"""The worker's pure parts: settings from the environment, Celery configuration, segment cuts."""
from __future__ import annotations

import ssl

import numpy as np
import pytest

from conftest import VIDEOS, cut
from pipeline.media import plan
from worker.app import celery_config
from worker.errors import SettingsError
from worker.segments import part_path, split
from worker.settings import Settings


def test_no_broker_is_the_embedded_default():
    s = Settings.from_env({})
    assert not s.queued and s.segment_seconds == 30 and s.max_attempts == 3


@pytest.mark.parametrize("var, value", [
    ("FACEMEND_BROKER_URL", "amqp://guest@localhost//"),
    ("FACEMEND_SEGMENT_SECONDS", "soon"),
    ("FACEMEND_SEGMENT_SECONDS", "0"),
    ("FACEMEND_MAX_ATTEMPTS", "0"),
    ("FACEMEND_STORAGE_ROOTS", "relative/path"),
    ("FACEMEND_SSL_CERT_REQS", "maybe"),
])
def test_bad_settings_name_the_variable(var, value):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def test_password_never_printed_in_errors():
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"FACEMEND_RESULT_BACKEND": "mongodb://u:hunter2@db/x"})
    assert "hunter2" not in str(e.value)


def test_celery_config_is_the_researched_one():
    s = Settings.from_env({"FACEMEND_BROKER_URL": "redis://:pw@h:6379/1", "FACEMEND_VISIBILITY_TIMEOUT": "20"})
    c = celery_config(s)
    assert c["task_acks_late"] and c["task_reject_on_worker_lost"]
    assert c["worker_prefetch_multiplier"] == 1
    assert c["worker_cancel_long_running_tasks_on_connection_loss"]
    assert c["accept_content"] == ["json"] and c["task_serializer"] == "json"
    assert c["broker_transport_options"]["visibility_timeout"] == 20
    assert c["result_backend_transport_options"]["visibility_timeout"] == 20
    assert c["broker_transport_options"]["unacked_restore_interval"] <= 5  # a short timeout is honoured
    assert c["task_time_limit"] > c["task_soft_time_limit"]
    assert c["result_backend"] == "redis://:pw@h:6379/1"
    assert "broker_use_ssl" not in c


def test_rediss_urls_get_tls_options():
    s = Settings.from_env({"FACEMEND_BROKER_URL": "rediss://:pw@h:6380/0", "FACEMEND_SSL_CA_CERTS": "/ca.pem"})
    c = celery_config(s)
    assert c["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    assert c["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_segments_snap_to_keyframes_and_cover_every_frame():
    vplan = plan(VIDEOS / "closeup_pexels.mp4")  # keyframes every 72 frames (3.003 s)
    ranges = split(vplan, 3.0)
    assert ranges[0][0] == 0 and ranges[-1][1] == vplan.frames
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start in vplan.keyframes for start, _ in ranges)
    assert len(split(vplan, 30.0)) == 1  # 19.7 s: one segment, no short tail


def test_segments_without_keyframes_cut_by_time():
    vplan = plan(VIDEOS / "walking_1080p.mp4")  # 105 frames at 25 fps, one keyframe
    assert split(vplan, 1.0) == [(0, 25), (25, 50), (50, 75), (75, 105)]
    assert split(vplan, 30.0) == [(0, 105)]


def test_part_paths_are_deterministic(tmp_path):
    a = part_path(tmp_path / "out.mp4", "abc", 3)
    assert a == part_path(tmp_path / "out.mp4", "abc", 3) and a.parent.name == ".facemend-abc"


class RecordingRestorer:
    """Wraps a FaceRestorer; keeps the landmarks of every face it is asked to restore, in order."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def deltas(self, images, faces, frames=None):
        self.seen += [np.array([f.landmarks for f in fs]) for fs in faces]
        return self.inner.deltas(images, faces, frames)


def test_faces_do_not_jump_at_a_segment_cut(tmp_path):
    """Two segments see the same (tracked, smoothed) landmarks as one pass: the context frames
    each segment decodes beyond its ends give the tracker the same neighbours at the cut."""
    from pipeline.job import Engine, JobOptions
    from pipeline.video import process_range

    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "c.mp4", 3.0)
    vplan = plan(src)
    opts = JobOptions(task="identity", device="cpu", preset="ultrafast")
    engine = Engine(opts)

    def run(ranges):
        rec = RecordingRestorer(engine.restorer)
        for a, b in ranges:
            process_range(vplan, tmp_path / f"p{a}-{b}.mp4", detector=engine.detector, restorer=rec,
                          settings=opts.encoder(joinable=True), start=a, stop=b)
        return rec.seen

    one, two = run([(0, 48)]), run([(0, 24), (24, 48)])
    assert len(one) == len(two) == 48  # a face in every frame, each frame once
    for i, (a, b) in enumerate(zip(one, two)):
        assert a.shape == b.shape, f"frame {i}: {len(a)} faces in one pass, {len(b)} in segments"
        assert np.abs(a - b).max() < 0.5, f"frame {i}: landmarks moved by {np.abs(a - b).max():.2f} px"


def test_an_error_after_a_cancel_stops_the_part_without_a_retry(monkeypatch, tmp_path):
    """Cancelling removes a video job's parts folder while a segment may still be writing into
    it: the segment's error (FileNotFoundError) is the cancel's doing, so the part is marked
    CANCELLED and not retried; the same error in a job nobody cancelled is retried. (The real
    race runs in tests/test_worker.py::test_cancel_mid_job_leaves_nothing.)"""
    from worker import parts
    from worker.records import CANCELLED, FAILED, RUNNING, Job
    from worker.segments import parts_dir

    class Store:  # the two calls part_failed makes, in memory
        def __init__(self, state, cancel):
            self.s, self.parts = (state, cancel), {}

        def state(self, job_id):
            return self.s

        def set_part(self, job_id, index, **fields):
            self.parts[index] = fields

    class Retry(Exception):
        pass

    class Task:
        def retry(self, exc, countdown, max_retries):
            return Retry(exc)

    out = tmp_path / "out.mp4"
    job = Job(id="j1", kind="video", task="identity", input="in.mp4", output=str(out), state=RUNNING)
    error = FileNotFoundError(2, "No such file or directory")
    fake = Store(CANCELLED, True)
    monkeypatch.setattr(parts, "store", lambda: fake)
    parts_dir(out, job.id).mkdir(parents=True)  # written after the cancel's clean-up
    assert parts.part_failed(Task(), job, 0, 1, error) == {"cancelled": True}
    assert fake.parts[0]["state"] == CANCELLED and not parts_dir(out, job.id).exists()
    fake = Store(RUNNING, False)
    monkeypatch.setattr(parts, "store", lambda: fake)
    with pytest.raises(Retry):
        parts.part_failed(Task(), job, 0, 1, error)
    assert fake.parts[0]["state"] == FAILED
