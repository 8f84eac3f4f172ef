"""Faults in the queued mode, with real processes: a Redis of its own (append-only file on),
killed and restarted by the tests; real workers (``cli.py worker``) killed with SIGKILL; messages
deleted from or added to the broker's queues. Short heartbeat timings are set only here
(FACEMEND_HEARTBEAT_INTERVAL 1 s, FACEMEND_HEARTBEAT_TIMEOUT 4 s, a worker that takes no waiting
message for FACEMEND_DEAF_SECONDS 10 s restarts itself); the visibility timeout keeps
its default (6 h) unless a test says otherwise, so a recovery is the watchdog's work, not Redis
handing a message back.

A missing ``redis-server`` binary is a failure, never a skip.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from conftest import VIDEOS, cut, probe
from test_worker import SLOW, Workers, cli, cli_json, same_media, wait_until

FAST_BEATS = {"FACEMEND_HEARTBEAT_INTERVAL": 1, "FACEMEND_HEARTBEAT_TIMEOUT": 4, "FACEMEND_DEAF_SECONDS": 10}


class OwnRedis:
    """A redis-server on a free port, its append-only file in ``folder``, fsync on every write."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: the chaos tests start a Redis of their own")
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.folder / "redis.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        wait_until(lambda: self._pings(client), 20, "the test Redis to answer", every=0.1)

    def _pings(self, client) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """A graceful shutdown (SHUTDOWN: the AOF is flushed, clients are dropped)."""
        try:
            self.client().shutdown(nosave=True)
        except redis.RedisError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    r = OwnRedis(tmp_path_factory.mktemp("redis"))
    yield r
    if r.proc.poll() is None:
        r.kill()


@pytest.fixture
def chaos(own_redis, tmp_path):
    """Workers and CLI calls pointed at the own Redis (emptied first), with short heartbeats."""
    client = own_redis.client()
    client.flushall()
    (tmp_path / "logs").mkdir()
    w = Workers(tmp_path / "logs")
    settings = {"FACEMEND_BROKER_URL": own_redis.url, **FAST_BEATS}
    yield w, settings, client
    w.stop_all()


def rec(client, job_id: str) -> dict:
    """The job record and its parts straight from Redis (fields as stored)."""
    h = client.hgetall(f"facemend:job:{job_id}")
    raw = client.hgetall(f"facemend:job:{job_id}:parts")
    h["parts"] = [{k.split(".", 1)[1]: v for k, v in raw.items() if k.split(".")[0] == str(i)}
                  for i in range(int(h.get("parts") or 0))]
    return h


def running_with_frames(client, job_id: str, worker: str = "") -> int | None:
    """1 + the index of a part running on ``worker`` (any) that has reported frames."""
    try:
        parts = rec(client, job_id)["parts"]
    except redis.RedisError:
        return None
    for i, p in enumerate(parts):
        if p.get("state") == "RUNNING" and p.get("worker", "").startswith(worker) and int(p.get("done", 0)) > 0:
            return i + 1
    return None


def finish(job_id: str, settings: dict, timeout: float = 150, workers: Workers | None = None) -> dict:
    p = cli("wait", job_id, "--timeout", timeout, timeout=timeout + 20, **settings)
    job = cli_json("status", job_id, **settings)
    if p.returncode != 0:  # what a reader needs to see why: each part, and the workers' logs
        parts = [{k: q.get(k) for k in ("index", "state", "attempts", "resent", "worker", "done", "error")}
                 for q in job.get("parts", [])]
        logs = {n: "".join(workers.log(n).splitlines(True)[-40:]) for n in workers.procs} if workers else {}
        pytest.fail(f"cli wait exited {p.returncode}: {p.stderr[-800:]}\njob: {job.get('state')} "
                    f"{job.get('error')!r}\nparts: {parts}\n" + "".join(f"--- {n}.log\n{t}" for n, t in logs.items()))
    return job


def no_part_failed(job: dict) -> None:
    assert job["state"] == "DONE" and not job["error"], job
    assert all(p["state"] == "DONE" for p in job["parts"]), [p["state"] for p in job["parts"]]


def test_redis_restart_mid_job_the_job_still_completes(chaos, own_redis, tmp_path):
    """Redis (append-only file on) dies while segments run and comes back, killed (SIGKILL) for
    one job and shut down (SHUTDOWN) for the next: Celery cannot hand the running segments'
    messages back while it is down and acknowledges them afterwards; the watchdog finds those
    segments without a heartbeat and sends them again. Each job ends DONE, frame-exact."""
    workers, settings, client = chaos
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)  # 72 frames
    workers.start("w1", "w2", **settings)
    for how in ("sigkill", "shutdown"):
        out = tmp_path / f"out-{how}.mp4"
        job_id = cli_json("submit", src, *SLOW, "-o", out, "--segment-seconds", 1, **settings)["id"]
        wait_until(lambda: running_with_frames(client, job_id), 120, "a segment half done")
        own_redis.kill() if how == "sigkill" else own_redis.stop()
        time.sleep(2)  # the workers see the connection go
        own_redis.start()
        t0 = time.monotonic()
        job = finish(job_id, settings, workers=workers)
        print(f"\nRedis {how}: job {job['state']}, {job['done']}/{job['total']} frames, "
              f"{time.monotonic() - t0:.1f} s after Redis came back; attempts "
              f"{[p['attempts'] for p in job['parts']]}, sent again {[p['resent'] for p in job['parts']]}")
        no_part_failed(job)
        assert job["done"] == job["total"] == 72
        assert max(p["resent"] for p in job["parts"]) >= 1  # the watchdog's doing
        same_media(probe(src), probe(out))
    assert not list(tmp_path.glob(".facemend-*"))


def test_worker_killed_mid_segment_watchdog_sends_it_again(chaos, tmp_path):
    """SIGKILL of the worker running a segment, with the visibility timeout at its default (6 h):
    the segment's heartbeat stops, the watchdog sends it again, the other worker runs it."""
    workers, settings, client = chaos
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)
    workers.start("w1", "w2", **settings)
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, *SLOW, "-o", out, "--segment-seconds", 1, **settings)["id"]
    victim = wait_until(lambda: running_with_frames(client, job_id, "w1@"), 120, "w1 inside a segment") - 1
    workers.kill("w1")
    job = finish(job_id, settings, workers=workers)
    no_part_failed(job)
    seg = job["parts"][victim]
    assert seg["worker"].startswith("w2@") and seg["attempts"] == 2 and seg["resent"] == 1, seg
    assert job["done"] == job["total"] == 72
    same_media(probe(src), probe(out))


def test_lost_messages_are_sent_again(chaos, tmp_path):
    """Messages vanish while the record says QUEUED (deleted here from the broker's lists): the
    watchdog finds no message and no runner, and sends them again; a plan's for one job, the
    segments' for another (both lost at once, so that one heartbeat timeout covers both). A
    message handed to a worker counts as taken for a heartbeat timeout; 8 s here, as a fresh
    worker on a busy 2-core machine can take over 4 s to start its first task (and would get a
    second copy, harmless but not what this test counts)."""
    workers, settings, client = chaos
    settings = {**settings, "FACEMEND_HEARTBEAT_TIMEOUT": 8}
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)
    out, out2 = tmp_path / "out.mp4", tmp_path / "out2.mp4"
    fast = ("--task", "identity", "--preset", "ultrafast", "--segment-seconds", 1)
    # the plan's message: no worker yet, it waits; lose it
    lost_plan = cli_json("submit", src, *fast, "-o", out, **settings)["id"]
    assert client.llen("cpu") == 1
    client.delete("cpu")
    # the segments' messages: the second job's segments go to a queue of their own that no
    # worker serves yet (w1 plans the job); they are deleted there before an archive worker starts
    workers.start("w1", args=("--queues", "gpu,cpu"), **settings)  # not the archive queue
    lost_segments = cli_json("submit", src, *fast, "-o", out2, "--queue", "archive", **settings)["id"]
    wait_until(lambda: client.llen("archive") == 3, 60, "three segment messages in the archive queue")
    assert [p["state"] for p in rec(client, lost_segments)["parts"]] == ["QUEUED"] * 3
    client.delete("archive")
    workers.start("w2", args=("--queues", "archive"), **settings)

    job = finish(lost_plan, settings, workers=workers)
    no_part_failed(job)
    assert int(client.hget(f"facemend:job:{lost_plan}", "plan.resent") or 0) == 1
    same_media(probe(src), probe(out))

    job = finish(lost_segments, settings, workers=workers)
    no_part_failed(job)
    assert [p["resent"] for p in job["parts"]] == [1, 1, 1]
    assert [p["attempts"] for p in job["parts"]] == [1, 1, 1]
    assert {p["worker"].split("@")[0] for p in job["parts"]} == {"w2"}
    same_media(probe(src), probe(out2))


def test_duplicates_of_a_finished_segment_change_nothing(chaos, tmp_path):
    """A copy of a segment delivered after it finished (while the job runs, and after it is
    DONE) and a copy of the join: no attempt counted, nothing FAILED, the output untouched."""
    workers, settings, client = chaos
    from worker.app import make_app
    from worker.settings import Settings

    # an app of its own: the module's app stays pointed where other tests expect it
    app = make_app(Settings.from_env({"FACEMEND_BROKER_URL": settings["FACEMEND_BROKER_URL"]}))
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)
    workers.start("w1", **settings)
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, *SLOW, "-o", out, "--segment-seconds", 1, **settings)["id"]
    wait_until(lambda: rec(client, job_id)["parts"] and rec(client, job_id)["parts"][0].get("state") == "DONE",
               120, "segment 0 to finish")
    assert rec(client, job_id)["state"] == "RUNNING"
    early = app.send_task("facemend.segment", (job_id, 0), task_id=f"{job_id}-s0", queue="gpu")
    job = finish(job_id, settings, workers=workers)
    no_part_failed(job)
    assert [p["attempts"] for p in job["parts"]] == [1, 1, 1]
    stat = out.stat()
    body = out.read_bytes()
    late = [app.send_task("facemend.segment", (job_id, i), task_id=f"{job_id}-s{i}", queue="gpu") for i in (0, 2)]
    join = app.send_task("facemend.join", (job_id,), task_id=f"{job_id}-join", queue="cpu")
    for r in [early, *late, join]:
        r.get(timeout=60)  # the worker ran each copy to its end
    job = cli_json("status", job_id, **settings)
    no_part_failed(job)
    assert [p["attempts"] for p in job["parts"]] == [1, 1, 1]
    assert job["done"] == job["total"] == 72
    assert out.read_bytes() == body and out.stat().st_mtime_ns == stat.st_mtime_ns
    assert not list(tmp_path.glob(".facemend-*"))  # no copy made the parts folder again
    log = workers.log("w1")
    assert "Traceback" not in log, log[-3000:]
    app.close()


def test_a_segment_outliving_the_visibility_timeout_runs_once(chaos, tmp_path):
    """Redis hands a running segment's message to the other worker every second (the visibility
    timeout): the copy finds the segment's heartbeat alive and steps aside, or finds it finished
    and does nothing. Every segment is attempted once, none is FAILED, the output frame-exact."""
    workers, settings, client = chaos
    short = {**settings, "FACEMEND_VISIBILITY_TIMEOUT": 1}
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)
    workers.start("w1", "w2", **short)
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, *SLOW, "-o", out, "--segment-seconds", 1.5, **short)["id"]
    job = finish(job_id, short, workers=workers)
    no_part_failed(job)
    assert [p["attempts"] for p in job["parts"]] == [1] * len(job["parts"])
    same_media(probe(src), probe(out))
    logs = workers.log("w1") + workers.log("w2")
    assert "this copy does nothing" in logs  # the copies came, and stepped aside


def test_a_job_without_progress_fails_naming_what_stalled(chaos, tmp_path):
    """A segment that runs (its heartbeat alive) but reports no progress for
    FACEMEND_STALL_SECONDS: the job FAILS, its error naming the segment and its worker."""
    workers, settings, client = chaos
    stall = {**settings, "FACEMEND_STALL_SECONDS": 3, "FACEMEND_PROGRESS_INTERVAL": 600}
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 9.0)  # 216 frames
    workers.start("w1", **stall)
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, *SLOW, "-o", out, **stall)["id"]  # one segment
    p = cli("wait", job_id, "--timeout", 120, timeout=140, **stall)
    job = json.loads(cli("status", job_id, "--json", **stall).stdout)
    assert p.returncode == 1 and job["state"] == "FAILED", (p.stderr, job)
    assert "stalled: no progress" in job["error"] and "segment 0 running on w1@" in job["error"], job["error"]
    assert f"facemend: error: {job['error']}" in p.stderr
    wait_until(lambda: not list(tmp_path.glob(".facemend-*")), 30, "the parts to be removed")
    assert not out.exists()


def test_records_take_a_part_once(own_redis):
    """The record's scripts behind the copies' no-ops: a part is taken by one live runner at a
    time, a finished part is never taken again, finishing twice counts once, and the watchdog's
    resend neither revives a finished part nor takes one whose runner beats."""
    from worker.records import JobStore
    from worker.settings import Settings

    own_redis.client().flushall()
    store = JobStore(Settings.from_env({"FACEMEND_BROKER_URL": own_redis.url, "FACEMEND_HEARTBEAT_INTERVAL": "1",
                                        "FACEMEND_HEARTBEAT_TIMEOUT": "2"}))
    store.create("j", kind="video", task="identity", input="/in.mp4", output="/out.mp4", options={},
                 segment_seconds=1, chunk_files=1)
    store.add_parts("j", [{"start": 0, "stop": 5, "task_id": "j-s0"}, {"start": 5, "stop": 9, "task_id": "j-s1"}],
                    total=9)
    assert store.start_part("j", 0, "w1", "t1") == 1
    assert store.start_part("j", 0, "w2", "t2") == -2  # t1 beats: the copy steps aside
    assert store.resend_part("j", 0, "lost") == 0  # nor may the watchdog take it
    assert store.beat("j", 0, "t1") and not store.beat("j", 0, "t2")
    time.sleep(2.2)  # t1 falls silent
    assert store.resend_part("j", 0, "sent again: lost") == 1
    assert not store.beat("j", 0, "t1")  # the old runner learns it was superseded
    assert store.start_part("j", 0, "w2", "t2") == 2
    assert store.finish_part("j", 0, worker="w2") == (True, 1)
    assert store.finish_part("j", 0, worker="w1") == (False, 1)  # a copy finishing again
    assert store.start_part("j", 0, "w3", "t3") == -1  # finished: never taken again
    assert store.resend_part("j", 0, "lost") == 0
    job = store.get("j")
    assert job.parts[0]["state"] == "DONE" and job.parts[0]["attempts"] == 2 and job.parts[0]["worker"] == "w2"
    assert store.r.sismember(store.active_key, "j")
    assert store.set_state("j", "DONE") and not store.r.sismember(store.active_key, "j")


def test_a_worker_that_stops_taking_messages_starts_again(chaos, own_redis, tmp_path):
    """A worker connected and alive that no longer takes messages (as Celery on Redis can be left
    after a broker reconnection; here its consumers are cancelled through Celery's remote
    control): idle while its queues hold a job's messages for FACEMEND_DEAF_SECONDS, it stops
    with exit code 75 and ``cli.py worker`` starts again in the same process, which runs the job."""
    from celery import Celery

    workers, settings, client = chaos
    settings = {**settings, "FACEMEND_DEAF_SECONDS": 3}
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 1.0)
    workers.start("w1", args=("--queues", "gpu,cpu"), **settings)
    control = Celery(broker=own_redis.url).control
    node = f"w1@{socket.gethostname()}"
    for queue in ("gpu", "cpu"):
        assert control.cancel_consumer(queue, destination=[node], reply=True, timeout=10), queue
    out = tmp_path / "out.mp4"
    job_id = cli_json("submit", src, "--task", "identity", "--preset", "ultrafast", "-o", out, **settings)["id"]
    time.sleep(1.5)
    assert client.llen("cpu") == 1  # the deaf worker leaves the plan's message where it is
    job = finish(job_id, settings, timeout=120, workers=workers)
    no_part_failed(job)
    same_media(probe(src), probe(out))
    log = workers.log("w1")
    assert "(its broker connection is deaf): restarting" in log, log[-3000:]
    assert log.count("models loaded") >= 2, log[-3000:]  # started again...
    assert workers.procs["w1"].poll() is None  # ... in the same process, still serving
