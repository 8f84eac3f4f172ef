"""Distributed jobs end to end: real Redis, real worker processes started with ``cli.py worker``.

Redis: ``$FACEMEND_TEST_REDIS`` (default redis://127.0.0.1:6379/13), emptied before and after
each test. No Redis is a failure, never a skip (CI starts one). Workers run ``--task identity``
jobs (fast, no trained weights needed) and are killed (process group) after each test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from conftest import ROOT, UTKFACE, VIDEOS, cut, probe, psnr, sheet_pairs

REDIS_URL = os.environ.get("FACEMEND_TEST_REDIS", "redis://127.0.0.1:6379/13")
FAST = ("--task", "identity", "--preset", "ultrafast")
# Fault tests must catch a segment half done, and the pipeline now does a 1-s identity segment
# faster than a poll: x264 veryslow makes each frame take a while (as a real task would), and
# detect-every 1 reports progress and checks the cancel flag every 8 frames instead of 24.
SLOW = ("--task", "identity", "--preset", "veryslow", "--detect-every", "1")


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FACEMEND_")}
    e.update(FACEMEND_BROKER_URL=REDIS_URL, FACEMEND_PRELOAD_TASKS="identity", FACEMEND_TORCH_THREADS="1",
             FACEMEND_PROGRESS_INTERVAL="0.3", PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cli(*args, timeout: float = 120, cwd: Path = ROOT, **extra) -> subprocess.CompletedProcess:
    """``cli.py`` as a client of the workers, with the workers' environment (as a deployment
    gives both the same one)."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env(**extra))


def cli_json(*args, timeout: float = 120, cwd: Path = ROOT, **extra) -> dict:
    p = cli(*args, "--json", timeout=timeout, cwd=cwd, **extra)
    assert p.stdout.strip(), f"cli {args} exited {p.returncode}: {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


class Workers:
    """Worker processes (``cli.py worker``), each in its own process group, logs in tmp_path."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, *names: str, timeout: float = 90, args: tuple = (), **extra) -> None:
        for name in names:
            log = open(self.logs / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(ROOT / "cli.py"), "worker", "-n", f"{name}@%h", "-c", "1", *args], cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, env=env(**extra), start_new_session=True)
        deadline = time.monotonic() + timeout
        for name in names:
            while "models loaded" not in self.log(name):
                assert self.procs[name].poll() is None, f"worker {name} exited:\n{self.log(name)[-3000:]}"
                assert time.monotonic() < deadline, f"worker {name} not ready:\n{self.log(name)[-3000:]}"
                time.sleep(0.1)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def db():
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({e}); set FACEMEND_TEST_REDIS or start Redis")
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def workers(db, tmp_path):
    (tmp_path / "logs").mkdir()
    w = Workers(tmp_path / "logs")
    yield w
    w.stop_all()


def status(job_id: str) -> dict:
    return cli_json("status", job_id)


def wait_until(pred, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def record(db, job_id: str) -> dict:
    """The job record straight from Redis (cheaper than a CLI call, for polling)."""
    h = {k.decode(): v.decode() for k, v in db.hgetall(f"facemend:job:{job_id}").items()}
    parts = {k.decode(): v.decode() for k, v in db.hgetall(f"facemend:job:{job_id}:parts").items()}
    h["parts"] = [{k.split(".", 1)[1]: v for k, v in parts.items() if k.split(".")[0] == str(i)}
                  for i in range(int(h.get("parts") or 0))]
    return h


def same_media(a: dict, b: dict) -> None:
    assert b["frames"] == a["frames"]
    assert b["pts"] == pytest.approx(a["pts"], abs=1e-6)
    assert b["audio"] == a["audio"] and len(b["audio"][0]) > 0  # audio packets byte-identical


def test_two_workers_share_a_video_and_match_the_embedded_output(workers, tmp_path):
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 9.0)
    workers.start("w1", "w2")
    out = tmp_path / "closeup.queued.mp4"
    sheet = tmp_path / "sheet.png"
    sub = cli_json("submit", src, *FAST, "-o", out, "--segment-seconds", 3, "--preview", sheet)
    job_id = sub["id"]
    assert sub["state"] in ("QUEUED", "RUNNING")  # a free worker may have taken it already
    p = cli("wait", job_id, "--timeout", 300, timeout=320)
    assert p.returncode == 0, p.stdout + p.stderr
    job = status(job_id)
    assert job["state"] == "DONE" and job["done"] == job["total"] == 216
    assert len(job["parts"]) == 3
    assert [(s["start"], s["stop"]) for s in job["parts"]] == [(0, 72), (72, 144), (144, 216)]  # keyframes
    assert all(s["state"] == "DONE" for s in job["parts"])
    assert {s["worker"].split("@")[0] for s in job["parts"]} == {"w1", "w2"}  # both took segments
    assert not list(tmp_path.glob(".facemend-*"))  # the parts are gone
    pairs = sheet_pairs(sheet)  # --preview works queued too: written by the first segment
    assert len(pairs) == 1 and pairs[0][0].std() > 20  # the one close-up face
    assert psnr(*pairs[0]) > 40  # identity task: after is before

    ref = tmp_path / "closeup.embedded.mp4"
    emb = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", src, *FAST, "-o", ref, "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={k: v for k, v in env().items() if k != "FACEMEND_BROKER_URL"})
    assert emb.returncode == 0, emb.stderr
    same_media(probe(ref), probe(out))
    same_media(probe(src), probe(out))


def test_segments_between_milliseconds_keep_every_frame_time(workers, tmp_path):
    """Half-second segments of a variable-frame-rate, rotated clip on a 1/90000 clock start
    between milliseconds: the queued output's frames are at the source's times exactly, as the
    embedded output's are (an MP4 part's millisecond edit list used to move 12 of 36 frames)."""
    from test_worker_units import frame_times, vfr_clip

    src = vfr_clip(tmp_path / "vfr.mp4")
    workers.start("w1")
    out = tmp_path / "vfr.queued.mp4"
    job = cli_json("submit", src, *FAST, "-o", out, "--segment-seconds", 0.5, "--wait", timeout=300)
    assert job["state"] == "DONE", job
    assert len(job["parts"]) >= 3
    ref = tmp_path / "vfr.embedded.mp4"
    emb = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", src, *FAST, "-o", ref, "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={k: v for k, v in env().items() if k != "FACEMEND_BROKER_URL"})
    assert emb.returncode == 0, emb.stderr
    want = frame_times(src)
    assert len(want) == 36
    assert frame_times(ref) == want  # exact fractions of a second, frame by frame
    assert frame_times(out) == want
    a, b = probe(src), probe(out)
    same_media(a, b)
    assert a["rotation"] == b["rotation"] == 90


def test_queued_deinterlace_all_matches_the_embedded_output(workers, tmp_path):
    """--deinterlace travels with a queued job: a combed clip whose interlace flags were lost,
    cut into segments, comes back deinterlaced frame for frame as the embedded run writes it."""
    import av
    import numpy as np
    from test_bad_inputs import _combed_clip, _output_combing

    src = tmp_path / "lost.mp4"
    combed = _combed_clip(src, "libx264", flagged=False)
    workers.start("w1")
    out = tmp_path / "lost.queued.mp4"
    job = cli_json("submit", src, *FAST, "--deinterlace", "all", "-o", out, "--segment-seconds", 0.25,
                   "--wait", timeout=300)
    assert job["state"] == "DONE", job
    assert len(job["parts"]) >= 2
    ref = tmp_path / "lost.embedded.mp4"
    emb = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", src, *FAST, "--deinterlace", "all",
                          "-o", ref, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={k: v for k, v in env().items() if k != "FACEMEND_BROKER_URL"})
    assert emb.returncode == 0, emb.stderr
    n, left = _output_combing(out)
    assert n == 18 and left < combed / 4

    def gray(path):
        with av.open(str(path)) as c:
            return [f.to_ndarray(format="gray").astype(np.int16) for f in c.decode(video=0)]

    assert all(np.abs(a - b).max() <= 2 for a, b in zip(gray(ref), gray(out)))  # two encodes


def test_sigkill_of_a_worker_mid_segment_the_job_still_completes(workers, db, tmp_path):
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)  # 72 frames
    short = {"FACEMEND_VISIBILITY_TIMEOUT": 12, "FACEMEND_HEARTBEAT_INTERVAL": 1, "FACEMEND_HEARTBEAT_TIMEOUT": 4}
    workers.start("w1", "w2", **short)
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, *SLOW, "-o", out, "--segment-seconds", 1, **short)["id"]

    def w1_mid_segment():
        for i, s in enumerate(record(db, job_id)["parts"]):
            if s.get("state") == "RUNNING" and s.get("worker", "").startswith("w1@") and int(s.get("done", 0)) > 0:
                return i + 1
    victim = wait_until(w1_mid_segment, 120, "w1 to be inside a segment") - 1
    workers.kill("w1")
    p = cli("wait", job_id, "--timeout", 240, timeout=260)
    assert p.returncode == 0, p.stdout + p.stderr
    job = status(job_id)
    seg = job["parts"][victim]
    assert seg["state"] == "DONE" and seg["worker"].startswith("w2@")
    assert seg["attempts"] >= 2  # counted in the job record
    assert job["done"] == job["total"] == 72
    same_media(probe(src), probe(out))  # frame-exact: every frame once, source timing, audio
    assert not list(tmp_path.glob(".facemend-*"))


def test_cancel_mid_job_leaves_nothing(workers, db, tmp_path):
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 9.0)
    workers.start("w1")
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, *SLOW, "-o", out, "--segment-seconds", 3)["id"]
    wait_until(lambda: int(record(db, job_id).get("done", 0)) > 0, 120, "the first frames")
    p = cli("cancel", job_id)
    assert p.returncode == 0, p.stderr
    assert cli("wait", job_id).returncode == 5
    # the running segment stops within a batch; the queued ones never start
    wait_until(lambda: record(db, job_id)["parts"][0].get("state") == "CANCELLED", 30, "segment 0 to stop")
    job = status(job_id)
    assert job["state"] == "CANCELLED"
    assert [s["attempts"] for s in job["parts"][1:]] == [0, 0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closeup.mp4", "logs"]


def test_folder_twice_with_skip_existing_does_nothing_the_second_time(workers, tmp_path):
    src = tmp_path / "faces"
    (src / "sub").mkdir(parents=True)
    names = sorted(p.name for p in UTKFACE.iterdir())[:4]
    for i, name in enumerate(names):
        shutil.copy(UTKFACE / name, (src / "sub" if i % 2 else src) / name)
    (src / "notes.txt").write_text("not an image")
    workers.start("w1")
    first = cli_json("submit", src, "--task", "identity", "--skip-existing", "--wait", FACEMEND_CHUNK_FILES=2)
    assert first["state"] == "DONE", first
    assert len(first["parts"]) == 2  # two chunks of two files
    assert (first["summary"]["processed"], first["summary"]["skipped"], first["summary"]["failed"]) == (4, 0, 0)
    out = Path(first["output"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(
        str(p.relative_to(src)) for p in src.rglob("*.jpg"))
    p = cli("submit", src, "--task", "identity", "--skip-existing", "--wait")
    assert p.returncode == 0, p.stderr
    assert "processed 0, skipped 4, failed 0" in p.stdout and "nothing to do" in p.stdout
    # a single video whose output is newer than it is skipped too, as in the embedded run
    clip = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "clip.mp4", 3.0)
    (tmp_path / "clip.identity.mp4").write_bytes(b"done before")
    job = cli_json("submit", clip, "--task", "identity", "--skip-existing", "--wait")
    assert job["state"] == "DONE" and job["summary"]["skipped"] == 1 and job["done"] == 0
    assert (tmp_path / "clip.identity.mp4").read_bytes() == b"done before"


def test_bad_inputs_fail_and_the_workers_keep_serving(workers, tmp_path):
    bad = tmp_path / "broken.mp4"
    data = (VIDEOS / "closeup_pexels.mp4").read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # truncated: the moov box is cut off
    good = tmp_path / "face.jpg"
    shutil.copy(UTKFACE / sorted(p.name for p in UTKFACE.iterdir())[0], good)
    workers.start("w1")
    p = cli("submit", bad, *FAST, "--wait", "--json")
    job = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 3, p.stderr
    assert job["state"] == "FAILED" and str(bad) in job["error"] and "\n" not in job["error"]
    # a part that fails on every attempt stops after FACEMEND_MAX_ATTEMPTS (3), counted in the record
    clip = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)
    p = cli("submit", clip, "--task", "identity", "--preset", "no-such-preset", "--wait", "--json")
    job = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 1 and job["state"] == "FAILED", p.stderr
    assert job["parts"][0]["attempts"] == 3 and "attempt 3" in job["error"]
    assert not (tmp_path / "closeup.identity.mp4").exists()
    ok = cli_json("submit", good, "--task", "identity", "--wait")
    assert ok["state"] == "DONE" and Path(ok["output"]).is_file()
    # a job from a newer facemend (an option this worker does not know; an upgraded CLI beside
    # an old worker): FAILED with the option named, never run without it
    from dataclasses import asdict

    from pipeline.job import JobOptions
    from worker.app import app, configure
    from worker.jobs import connect
    from worker.settings import Settings

    settings = Settings.from_env(env())
    configure(settings)
    out = tmp_path / "face.newer.jpg"
    options = {**asdict(JobOptions(task="identity", output=str(out))), "future_knob": 1}
    connect(settings).create("newer1", kind="image", task="identity", input=str(good), output=str(out),
                             options=options, segment_seconds=30, chunk_files=8)
    app.send_task("facemend.plan", ("newer1",), task_id="newer1-plan")
    job = wait_until(lambda: (s := status("newer1"))["state"] in ("FAILED", "DONE") and s, 60,
                     "the newer job to end")
    assert job["state"] == "FAILED" and "\n" not in job["error"], job
    assert "future_knob" in job["error"] and "upgrade the worker" in job["error"], job["error"]
    assert not out.exists()
    assert "w1" in " ".join(workers.procs)  # the same worker, still running
    assert workers.procs["w1"].poll() is None


def test_commands_need_a_broker_and_report_unknown_jobs(db, tmp_path):
    p = cli("status", "nope", FACEMEND_BROKER_URL="")
    assert p.returncode == 2 and "FACEMEND_BROKER_URL" in p.stderr
    assert cli("status", "nope").returncode == 8
    assert cli("list", "--json").stdout.strip() == "[]"
    p = cli("list", "--broker", "redis://127.0.0.1:1/0")
    assert p.returncode == 7
    p = cli("list", FACEMEND_SEGMENT_SECONDS="soon")
    assert p.returncode == 2 and "FACEMEND_SEGMENT_SECONDS" in p.stderr


def test_a_queued_submit_loads_no_network_code(db, tmp_path):
    """A client that queues thousands of files runs no network: with the workers' environment
    (FACEMEND_TORCH_THREADS included) ``submit`` queues the job without importing torch."""
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 1.0)
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "cli.py"), "submit", str(src), "--task",
                        "denoise", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env())
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["state"] == "QUEUED"
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert "celery" in imported and "torch" not in imported and "openvino" not in imported


@pytest.fixture
def tls_redis(tmp_path):
    """A second Redis with a password, TLS only (self-signed certificate), on a free port."""
    import socket

    missing = [b for b in ("redis-server", "openssl") if shutil.which(b) is None]
    if missing:  # the shared Redis is a hard requirement; a second, local one is not
        pytest.skip(f"{', '.join(missing)} not installed: cannot start a TLS Redis")
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", certs / "key.pem",
                    "-out", certs / "cert.pem"], check=True, capture_output=True, timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", certs / "cert.pem", "--tls-key-file", certs / "key.pem",
                             "--tls-ca-cert-file", certs / "cert.pem", "--tls-auth-clients", "no",
                             "--requirepass", "s3cret pass", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.5)
    yield f"rediss://:s3cret%20pass@127.0.0.1:{port}/0", certs / "cert.pem"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_password_and_tls_urls(workers, tls_redis, tmp_path):
    url, ca = tls_redis
    good = tmp_path / "face.jpg"
    shutil.copy(UTKFACE / sorted(p.name for p in UTKFACE.iterdir())[0], good)
    tls = {"FACEMEND_BROKER_URL": url, "FACEMEND_SSL_CA_CERTS": ca}
    workers.start("tls1", **tls)
    job = cli_json("submit", good, "--task", "identity", "--wait", timeout=120, **tls)
    assert job["state"] == "DONE" and Path(job["output"]).is_file()
    assert cli("list", **{**tls, "FACEMEND_BROKER_URL": url.replace("s3cret%20pass", "wrong")}).returncode == 7


def test_facemath_tasks_run_queued(workers, tmp_path):
    """age on a photo and a morph between two photos, through Redis and a real worker."""
    from conftest import SCENES

    a, b = tmp_path / "a.jpg", tmp_path / "b.png"
    shutil.copy(SCENES / "pyfeat_single_face.jpg", a)
    shutil.copy(SCENES / "facerec_lin-manuel-miranda.png", b)
    workers.start("w1")
    job = cli_json("submit", a, "--task", "age", "--amount", "25", "--wait")
    assert job["state"] == "DONE" and job["summary"]["processed"] == 1, job
    assert Path(job["output"]).name == "a.age.jpg" and Path(job["output"]).stat().st_size > 0
    job = cli_json("submit", a, "--task", "morph", "--to", b.name, "--frames", "8", "--wait", cwd=tmp_path)
    assert job["state"] == "DONE", job
    out = Path(job["output"])
    assert out == tmp_path / "a.morph.mp4" and probe(out)["frames"] == 8
    opts = job["options"] if isinstance(job["options"], dict) else json.loads(job["options"])
    assert opts["to"] == str(b)  # --to made absolute for workers on other machines


def test_queued_strength_matches_the_embedded_output_and_each_job_keeps_its_own(workers, tmp_path):
    """--strength travels with a queued job, and one worker running a job at 0.5 then one at 1
    gives each its own (its cached engine is not the other's)."""
    import cv2
    import numpy as np
    from conftest import SCENES

    src = tmp_path / "face.png"
    cv2.imwrite(str(src), cv2.imread(str(SCENES / "pyfeat_single_face.jpg")))
    workers.start("w1")
    got = {}
    for s in ("0.5", "1"):
        job = cli_json("submit", src, "--task", "denoise", "--strength", s, "-o", tmp_path / f"q{s}.png", "--wait")
        assert job["state"] == "DONE", job
        emb = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", src, "--task", "denoise",
                              "--strength", s, "-o", tmp_path / f"e{s}.png"], capture_output=True, text=True,
                             cwd=ROOT, timeout=300, env={k: v for k, v in env().items() if k != "FACEMEND_BROKER_URL"})
        assert emb.returncode == 0, emb.stderr
        q, e = (cv2.imread(str(tmp_path / f"{k}{s}.png")).astype(np.int16) for k in ("q", "e"))
        assert np.abs(q - e).max() <= 1, s
        got[s] = q
    given = cv2.imread(str(src)).astype(np.int16)
    changed = np.abs(got["1"] - given) >= 4
    assert changed.sum() > 500
    ratio = np.median((got["0.5"] - given)[changed] / (got["1"] - given)[changed])
    assert 0.45 <= ratio <= 0.55, ratio
