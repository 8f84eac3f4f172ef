"""The worker's pure parts: settings from the environment, Celery configuration, segment cuts."""
from __future__ import annotations

import ssl

import numpy as np
import pytest

from conftest import VIDEOS, cut
from pipeline.media import plan, split
from worker.app import celery_config
from worker.errors import SettingsError
from worker.segments import part_path
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
    ("FACEMEND_HEARTBEAT_INTERVAL", "0"),
    ("FACEMEND_HEARTBEAT_TIMEOUT", "15"),  # under twice the 10 s interval
    ("FACEMEND_STALL_SECONDS", "-1"),
    ("FACEMEND_DEAF_SECONDS", "15"),  # under twice the 10 s interval (0 turns it off)
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

    def deltas(self, images, faces, frames=None, aspect=1.0):
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


def vfr_clip(path, frames: int = 36, rotation: int = 90, audio: bool = True):
    """A short variable-frame-rate clip on a 1/90000 clock (frame times that are no whole
    millisecond, as a phone's are), with a display rotation and, with ``audio``, the first
    second of a real clip's MP3 audio. Segments of 0.5 s start between milliseconds."""
    from fractions import Fraction

    import av

    tb = Fraction(1, 90000)
    steps = [3003, 2700, 3600, 3003, 2002, 4004]  # 1/30 s, 1/33.3 s, 1/25 s, ...
    pts = [sum(steps[i % len(steps)] for i in range(k)) for k in range(frames)]
    end = float((pts[-1] + steps[0]) * tb)
    yy, xx = np.mgrid[0:120, 0:160]
    with av.open(str(path), "w") as o:
        s = o.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        s.time_base = s.codec_context.time_base = tb
        s.options = {"preset": "ultrafast", "g": "12", "bf": "2"}
        if rotation:
            s.set_display_rotation(rotation)
        if audio:
            src = av.open(str(VIDEOS / "selfie_mp3audio.mp4"))
            a_in = src.streams.audio[0]
            a_out = o.add_stream_from_template(a_in)
            for p in src.demux(a_in):
                if p.dts is None or p.size == 0 or float(p.pts * a_in.time_base) >= end:
                    continue
                p.stream = a_out
                o.mux(p)
            src.close()
        for k, p in enumerate(pts):
            img = np.stack([(xx + 5 * k) % 256, (yy + 3 * k) % 256, (xx ^ yy) % 256], -1).astype(np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = p, tb
            for pkt in s.encode(f):
                o.mux(pkt)
        for pkt in s.encode(None):
            o.mux(pkt)
    return path


def frame_times(path) -> list:
    """Every frame's presentation time as an exact fraction of a second, in order."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return sorted(p.pts * v.time_base for p in c.demux(v) if p.size and p.pts is not None)


def test_join_keeps_every_frame_at_the_source_pts(tmp_path):
    """Parts that start between milliseconds (an MP4 part later than 0 starts with an edit list
    in milliseconds, which moves its frames by up to 1 ms) join into an output whose every frame
    has the source's pts, exactly; the check refuses a file one tick off."""
    from fractions import Fraction

    import av

    from pipeline.errors import OutputError
    from pipeline.job import Engine, JobOptions
    from pipeline.media import check_timing, join
    from pipeline.video import process_range

    src = vfr_clip(tmp_path / "vfr.mp4", audio=False)
    vplan = plan(src)
    tb = Fraction(vplan.time_base)
    ranges = split(vplan, 0.5)
    assert len(ranges) >= 3
    assert any((vplan.pts[a] * tb * 1000).denominator != 1 for a, _ in ranges[1:])  # between ms
    opts = JobOptions(task="identity", device="cpu", preset="ultrafast")
    engine = Engine(opts)
    parts = []
    for i, (a, b) in enumerate(ranges):
        parts.append(tmp_path / f"seg{i}.mp4")
        process_range(vplan, parts[-1], detector=engine.detector, restorer=engine.restorer,
                      settings=opts.encoder(joinable=True), start=a, stop=b)
    out = tmp_path / "out.mp4"
    join(parts, vplan, out)
    want = frame_times(src)
    assert len(want) == 36 and frame_times(out) == want  # exact fractions, every frame
    check_timing(out, vplan)

    # one frame moved by one tick of the 1/90000 clock (11 us): refused, naming the frame
    moved = tmp_path / "moved.mp4"
    with av.open(str(out)) as c, av.open(str(moved), "w") as o:
        v = c.streams.video[0]
        assert v.time_base == tb  # the output keeps the source's clock
        s = o.add_stream_from_template(v)
        s.time_base = tb
        for p in c.demux(v):
            if p.size == 0:
                continue
            p.stream = s
            if p.pts == vplan.pts[-1]:
                p.pts = p.dts = p.pts + 1
            o.mux(p)
    assert len(frame_times(moved)) == 36 and frame_times(moved) != want
    with pytest.raises(OutputError, match="1 of 36 frames are not at the source's time: frame 35"):
        check_timing(moved, vplan)


def test_the_first_complete_part_wins_and_is_never_replaced(tmp_path, monkeypatch):
    """Two runs of one segment each write their own file; the first to finish is linked to the
    part's path, the second finds it there and is dropped (also where the file system has no
    hard links); neither run's own file is left behind."""
    import errno
    import os

    from worker.segments import publish_part

    final = tmp_path / "seg00000.mp4"
    first, second = tmp_path / ".seg00000.aaa.mp4", tmp_path / ".seg00000.bbb.mp4"
    first.write_bytes(b"first run")
    second.write_bytes(b"second run")
    assert publish_part(first, final) is True
    assert publish_part(second, final) is False
    assert final.read_bytes() == b"first run" and not first.exists() and not second.exists()

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    final2 = tmp_path / "seg00001.mp4"
    first.write_bytes(b"first run")
    second.write_bytes(b"second run")
    assert publish_part(first, final2) is True
    assert publish_part(second, final2) is False
    assert final2.read_bytes() == b"first run" and not first.exists() and not second.exists()


def test_join_into_matroska_moves_every_frame_by_the_audio_lead_only(tmp_path):
    """Matroska cannot store times before 0: a source whose MP3 audio starts 11 ms before its
    video is written 11 ms later as a whole (the muxer's doing, streams kept in sync); the check
    accepts that uniform move and nothing else, so every frame interval is still the source's."""
    from fractions import Fraction

    from pipeline.media import EncoderSettings, VideoEncoder, iter_frames, join

    src = VIDEOS / "selfie_mp3audio.mp4"
    vplan = plan(src)
    parts = []
    for i, (a, b) in enumerate(split(vplan, 0.5)):
        parts.append(tmp_path / f"seg{i}.mp4")
        with VideoEncoder(parts[-1], vplan, EncoderSettings(preset="ultrafast", bframes=0)) as enc:
            for k, yuv in iter_frames(vplan, a, b):
                enc.write(k, yuv)
    assert len(parts) >= 4
    for name in ("out.mp4", "out.mkv"):
        join(parts, vplan, tmp_path / name)
    want = [p * Fraction(vplan.time_base) for p in vplan.pts]
    assert frame_times(tmp_path / "out.mp4") == want
    got = frame_times(tmp_path / "out.mkv")  # Matroska's clock: milliseconds
    shift = got[0] - want[0]
    assert Fraction(5, 1000) < shift < Fraction(30, 1000)  # the MP3's lead (11 ms)
    assert all(abs(g - w - shift) <= Fraction(1, 2000) for g, w in zip(got, want))


def test_status_of_a_long_folder_job_counts_its_chunks_and_lists_what_is_not_done(monkeypatch, capsys):
    """A queued folder job of 500 chunks: plain ``status`` prints counts by state and the chunks
    not done (at most 20 lines of them), not 500 lines; ``--json`` keeps every chunk."""
    import argparse
    import json

    from worker import commands
    from worker.records import Job

    parts = [{"index": i, "state": "DONE" if i < 470 else ("FAILED" if i < 475 else "QUEUED"), "start": i * 16,
              "stop": i * 16 + 16, "done": 16 if i < 470 else 0, "worker": "w1@h" if i < 475 else "",
              "attempts": 1 if i < 475 else 0, "error": "bad file" if 470 <= i < 475 else None}
             for i in range(500)]
    job = Job(id="j1", kind="folder", task="denoise", input="/in", output="/out", state="DONE",
              unit="files", done=7520, total=8000, parts=parts)

    class Store:
        def get(self, job_id):
            return job

    monkeypatch.setattr(commands, "job_store", lambda args: (None, Store()))
    args = argparse.Namespace(id="j1", json=False)
    assert commands.cmd_status(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "500 chunks: 470 DONE, 5 FAILED, 25 QUEUED" in lines[1]
    listed = [line for line in lines if line.strip().startswith("chunk ")]
    assert len(listed) == commands.PARTS_LISTED and all("DONE" not in line for line in listed)
    assert listed[0].split()[1] == "470:" and "bad file" in listed[0]
    assert lines[-1].strip() == "... and 10 more not done (status --json lists every chunk)"
    assert commands.cmd_status(argparse.Namespace(id="j1", json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)["parts"]) == 500


def test_a_worker_loads_weights_updated_under_it(monkeypatch, tmp_path):
    """Weights replaced while a worker runs (a deploy): its next task loads the new file, so a
    folder manifest's weights sha256 is that of the weights that restored the file; unchanged
    weights keep the loaded engine."""
    import os

    from models import registry
    from pipeline.job import JobOptions
    from worker import engines

    weights = tmp_path / "denoise.safetensors"
    weights.write_bytes((registry.WEIGHTS_DIR / "denoise.safetensors").read_bytes())
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    loaded = []

    class Loaded:
        def __init__(self, opts):
            loaded.append(weights.read_bytes()[-64:])

    monkeypatch.setattr(engines, "Engine", Loaded)
    monkeypatch.setattr(engines, "_engines", {})
    settings = Settings.from_env({})
    first = engines.engine_for(JobOptions(task="denoise"), settings)
    assert engines.engine_for(JobOptions(task="denoise"), settings) is first and len(loaded) == 1
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # new weights, same size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    second = engines.engine_for(JobOptions(task="denoise"), settings)
    assert second is not first and len(loaded) == 2 and loaded[1] == bytes(64)
    assert engines.engine_for(JobOptions(task="denoise"), settings) is second


def test_a_worker_is_deaf_only_idle_with_messages_waiting_the_whole_time():
    """``worker.listening.Deafness``: deaf after ``seconds`` of samples that were all idle, with
    no task started and a message waiting; any busy sample, started task, empty queue or
    unreadable queue starts the count again."""
    from worker.listening import Deafness

    d = Deafness(30)
    msgs, empty = {"gpu": 2, "cpu": 0}, {"gpu": 0, "cpu": 0}
    assert not d.observe(0, False, 5, msgs) and not d.observe(20, False, 5, msgs)
    assert d.observe(30, False, 5, msgs)
    assert "gpu (2)" in d.describe(30) and "cpu" not in d.describe(30)
    for breaker in ((True, 5, msgs), (False, 6, msgs), (False, 6, empty), (False, 6, None)):
        d = Deafness(30)
        d.observe(0, False, 5, msgs)
        assert not d.observe(20, *breaker)
        started = breaker[1]
        assert not d.observe(45, False, started, msgs)  # counting from 45 again
        assert not d.observe(70, False, started, msgs) and d.observe(75, False, started, msgs)


def test_a_worker_runs_one_pool_process_per_4_cores_sharing_them_out(monkeypatch):
    """One job does not keep many cores busy and leaves a GPU mostly idle, so a worker runs one pool
    process per 4 cores (1 to 4) unless -c says otherwise, and gives each child its share of the
    cores (FACEMEND_TORCH_THREADS, which a user's setting overrides)."""
    import os

    import cli
    import worker.app as wa
    from pipeline import parallel
    from worker import commands

    assert [commands.pool_size(None, cpus=n) for n in (1, 2, 4, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    assert commands.pool_size(2, cpus=64) == 2 and commands.pool_size(6, cpus=2) == 6
    parser = cli.make_argument_parser()
    assert parser.parse_args(["worker", "--device", "cuda:0"]).concurrency is None
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["worker", "-c", "0"])
    assert e.value.code == 2

    seen = []
    monkeypatch.setattr(wa.app, "worker_main", lambda argv: seen.append((argv, os.environ.get("FACEMEND_TORCH_THREADS"))))
    monkeypatch.setattr(wa, "configure", lambda settings: None)
    monkeypatch.setattr(parallel, "cores", lambda: 16)
    monkeypatch.setattr(commands, "gpu_memory", lambda device: None)  # whatever GPU this machine has
    for var in ("FACEMEND_TORCH_THREADS", "FACEMEND_BROKER_URL", "FACEMEND_DEVICE"):
        monkeypatch.setenv(var, "")  # recorded, so that what cmd_worker sets is undone afterwards
        monkeypatch.delenv(var)
    for argv, threads in ((["--device", "cpu"], None), (["-c", "2"], None), (["-c", "1"], None), ([], "3")):
        if threads:
            monkeypatch.setenv("FACEMEND_TORCH_THREADS", threads)
        else:
            monkeypatch.delenv("FACEMEND_TORCH_THREADS", raising=False)
        commands.cmd_worker(parser.parse_args(["worker", "--broker", "redis://127.0.0.1:6379/15", *argv]))
    got = [(a[a.index("-c") + 1], t) for a, t in seen]
    assert got == [("4", "4"), ("2", "8"), ("1", None), ("4", "3")], got


def test_a_gpu_workers_pool_is_as_many_processes_as_its_gpu_memory_holds(monkeypatch):
    """Read from nvidia-smi (the parent must not start CUDA before the fork): 1.5 GB a process
    within nine tenths of the card; cuda:N is the N-th GPU CUDA_VISIBLE_DEVICES lets it see."""
    import shutil
    import subprocess

    from worker import commands

    asked = []

    def smi(argv, **_):
        asked.append(argv[-1])
        return subprocess.CompletedProcess(argv, 0, stdout=f"{memory['mib']}\n", stderr="")

    memory = {"mib": 4096}
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(subprocess, "run", smi)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert commands.pool_size(None, cpus=16, device="cuda:0") == 2  # a 4 GB card
    assert commands.pool_size(None, cpus=16, device=None) == 2  # the job's device: a GPU is there
    assert commands.pool_size(None, cpus=16, device="cpu") == 4 and asked == ["0", "0"]
    assert commands.pool_size(3, cpus=16, device="cuda:0") == 3  # -c as given
    memory["mib"] = 81920
    assert commands.pool_size(None, cpus=16, device="cuda:1") == 4 and asked[-1] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert commands.gpu_memory("cuda:1") == 81920 * 2**20 and asked[-1] == "5"
    assert commands.gpu_memory("cuda:2") is None  # not a GPU it can see
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no NVIDIA driver: cores decide
    assert commands.pool_size(None, cpus=16, device="cuda:0") == 4
