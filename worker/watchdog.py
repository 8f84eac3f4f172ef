"""The watchdog: finds the parts of unfinished jobs that nobody will ever run, and sends them again.

A message can vanish with its part still recorded as queued or running: its worker was killed
(Redis gives the message back only after the visibility timeout, hours), or Redis restarted
while parts ran (Celery cannot hand the running parts' messages back while it is down, and
acknowledges them once it is back). Running parts write a heartbeat into the job record every
FACEMEND_HEARTBEAT_INTERVAL seconds (Redis's clock); every worker runs ``check`` over the
unfinished jobs that often (a thread of its main process, no extra process), and so does
``wait``. For each job, at most once an interval (a lock in Redis):

- a part RUNNING whose heartbeat is older than FACEMEND_HEARTBEAT_TIMEOUT lost its worker: it is
  sent again (its next start counts an attempt; past FACEMEND_MAX_ATTEMPTS the job FAILS);
- a part QUEUED (or waiting for its retry) for that long whose message no queue holds was lost:
  it is sent again, at most FACEMEND_MAX_ATTEMPTS times;
- the plan, and the join (or a folder's summary) once every part has finished, likewise;
- a job with no progress for FACEMEND_STALL_SECONDS while none of its messages waits in a queue
  FAILS, the error naming what stalled.

A copy of a part that finished meanwhile, or that a live runner holds, does nothing (``parts``).
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

import redis

from .records import QUEUED, RUNNING, Job, JobStore
from .settings import Settings

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages in a list of the queue's name, and those
# sent with a priority in lists named ``queue + SEP + step``
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def broker_client(settings: Settings) -> redis.Redis:
    kwargs = {}
    if settings.broker_url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = settings.ssl_cert_reqs
        if settings.ssl_ca_certs:
            kwargs["ssl_ca_certs"] = settings.ssl_ca_certs
    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30, **kwargs)


class Queues:
    """The task ids waiting in the broker's queues, read once per check and only when needed."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._ids: dict[str, set[str]] = {}
        self._delivered: dict[str, float] | None = None

    def holds(self, queue: str, task_id: str) -> bool:
        if queue not in self._ids:
            self._ids[queue] = self._read(queue)
        return task_id in self._ids[queue]

    def delivered(self, task_id: str) -> float:
        """When the message was handed to a worker that has not acknowledged it yet (kombu's
        ``unacked`` hash and its time index), 0 if it was not. A worker that is alive starts
        it at once (prefetch 1); one that died leaves it there until the visibility timeout."""
        if self._delivered is None:
            self._delivered = {}
            times = dict(self.r.zrange("unacked_index", 0, -1, withscores=True))
            for tag, raw in self.r.hgetall("unacked").items():
                try:
                    self._delivered[json.loads(raw)[0]["headers"]["id"]] = float(times.get(tag, 0))
                except (ValueError, KeyError, TypeError, IndexError):
                    continue
        return self._delivered.get(task_id, 0.0)

    def _read(self, queue: str) -> set[str]:
        ids: set[str] = set()
        for name in [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]:
            start, page = 0, 500
            while True:
                chunk = self.r.lrange(name, start, start + page - 1)
                for raw in chunk:
                    try:
                        ids.add(json.loads(raw)["headers"]["id"])
                    except (ValueError, KeyError, TypeError):
                        continue
                if len(chunk) < page:
                    break
                start += page
        return ids


@dataclass
class Pending:
    """Something of a job that has not finished: a part, or the plan / last stage."""

    name: str  # "segment 3", "the plan", "the join"
    task: str  # Celery task name
    args: tuple
    task_id: str
    queue: str
    state: str  # QUEUED, RUNNING, FAILED (a retry is due)
    beat: float  # last heartbeat (Redis time), 0 if none
    since: float  # when it was last sent or started
    attempts: int = 0
    resent: int = 0
    worker: str = ""
    index: int | str = ""
    notes: list = field(default_factory=list)


def _f(v) -> float:
    try:
        return float(v) if v not in (None, "") else 0.0
    except ValueError:
        return 0.0


def pending(job: Job, raw_parts: dict, finished: set[int], job_hash: dict, settings: Settings) -> list[Pending]:
    """What of ``job`` is still to run, with its heartbeat and when it was sent."""
    gpu = job.queue or settings.gpu_queue
    cpu = settings.cpu_queue
    n = len(job.parts)
    if job.state == QUEUED or n == 0:
        return [Pending("the plan", "facemend.plan", (job.id,), f"{job.id}-plan",
                        job_hash.get("plan.queue") or cpu, job.state,
                        _f(job_hash.get("plan.beat")), max(job.created, _f(job_hash.get("plan.sent_at"))),
                        resent=int(job_hash.get("plan.resent") or 0), index="plan")]
    if len(finished) >= n:
        last = "join" if job.kind == "video" else "summarise"
        return [Pending("the join" if last == "join" else "the summary", f"facemend.{last}", (job.id,),
                        f"{job.id}-{last}", job_hash.get("last.queue") or cpu,
                        RUNNING if job_hash.get("last.token") else QUEUED,
                        _f(job_hash.get("last.beat")),
                        max(_f(job.updated), _f(job_hash.get("last.sent_at"))),
                        resent=int(job_hash.get("last.resent") or 0), index="last")]
    kind = "segment" if job.kind == "video" else "chunk"
    out = []
    for p in job.parts:
        i = p["index"]
        if i in finished:
            continue
        g = lambda k: raw_parts.get(f"{i}.{k}")  # noqa: E731
        out.append(Pending(f"{kind} {i}", f"facemend.{kind}", (job.id, i), p["task_id"] or f"{job.id}-{kind[0]}{i}",
                           g("queue") or gpu, p["state"], _f(g("beat")), max(_f(g("sent_at")), _f(g("started")), _f(g("beat"))),
                           attempts=p["attempts"], resent=p["resent"], worker=p["worker"] or "", index=i))
    return out


class Watchdog:
    """``check(job_id)`` and ``sweep()`` for one process; ``send(name, args, task_id, queue)``
    publishes a task (the Celery app's ``send_task``)."""

    def __init__(self, store: JobStore, settings: Settings, send) -> None:
        self.store, self.settings, self.send = store, settings, send
        same = settings.broker_url == settings.store_url
        self.broker = store.r if same else broker_client(settings)

    def lock(self, job_id: str) -> bool:
        """One check of a job per interval, whoever runs it (workers, ``wait``)."""
        ms = max(1, int(self.settings.heartbeat_interval * 1000 * 0.9))
        return bool(self.store.r.set(self.store.key(job_id, "watch"), 1, nx=True, px=ms))

    def sweep(self) -> list[str]:
        """Check every unfinished job; returns what was done (for logs and tests)."""
        done = []
        queues = Queues(self.broker)
        for job_id in sorted(self.store.r.smembers(self.store.active_key)):
            try:
                done += self.check(job_id, queues=queues)
            except Exception:  # one broken record must not stop the others' checks
                log.warning("watchdog: job %s: check failed", job_id, exc_info=True)
        return done

    def check(self, job_id: str, *, queues: Queues | None = None, force: bool = False) -> list[str]:
        from .errors import JobNotFound

        if not force and not self.lock(job_id):
            return []
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            self.store.r.srem(self.store.active_key, job_id)
            return []
        if job.terminal:
            self.store.r.srem(self.store.active_key, job_id)
            return []
        queues = queues or Queues(self.broker)
        s = self.settings
        now = self.store.now()
        job_hash = self.store.r.hgetall(self.store.key(job_id))
        raw = self.store.part_fields(job_id)
        finished = self.store.finished(job_id)
        todo = pending(job, raw, finished, job_hash, s)
        actions, waiting, described = [], False, []
        for p in todo:
            alive = p.beat and now - p.beat < s.heartbeat_timeout
            if p.state == RUNNING and p.index != "plan":
                if alive:
                    described.append(f"{p.name} running on {p.worker or 'a worker'} "
                                     f"(heartbeat {now - p.beat:.0f} s ago)")
                    continue
                if now - p.since < s.heartbeat_timeout:
                    described.append(f"{p.name} starting")
                    continue
                why = (f"its worker {p.worker or '?'} sent no heartbeat for {now - p.beat:.0f} s "
                       "(killed, crashed or cut off from Redis)" if p.beat else "its runner never reported")
            else:
                if alive:
                    described.append(f"{p.name} running (heartbeat {now - p.beat:.0f} s ago)")
                    continue
                if now - max(p.since, p.beat) < s.heartbeat_timeout:
                    described.append(f"{p.name} queued on {p.queue}")
                    waiting = True
                    continue
                if queues.holds(p.queue, p.task_id):
                    described.append(f"{p.name} queued on {p.queue}")
                    waiting = True
                    continue
                if now - queues.delivered(p.task_id) < s.heartbeat_timeout:
                    described.append(f"{p.name} handed to a worker")
                    waiting = True
                    continue
                why = f"its message is in no queue ({p.queue}) and no worker runs it"
            actions.append(self._resend(job, p, why))
        if any(a.startswith("FAILED") for a in actions):
            return actions
        stall = s.stall_seconds
        last = max(_f(job.updated), job.created)
        if stall and not waiting and not actions and now - last > stall:
            what = "; ".join(described) or "nothing runs"
            error = f"stalled: no progress for {now - last:.0f} s (FACEMEND_STALL_SECONDS={stall:g}): {what}"
            self._fail(job, error)
            actions.append(f"FAILED {job_id}: {error}")
        return actions

    def _resend(self, job: Job, p: Pending, why: str) -> str:
        s = self.settings
        kind = p.name
        if p.index not in ("plan", "last"):
            if p.state == RUNNING and p.attempts >= s.max_attempts:
                error = f"{kind} did not finish in {s.max_attempts} attempts; last: {why}"
                self._fail(job, error)
                return f"FAILED {job.id}: {error}"
            if p.resent >= s.max_attempts:
                error = f"{kind} was sent {p.resent + 1} times and never finished; last: {why}"
                self._fail(job, error)
                return f"FAILED {job.id}: {error}"
            if not self.store.resend_part(job.id, p.index, f"sent again: {why}"):
                return f"{job.id}: {kind} came back to life"
        else:
            if p.resent >= s.max_attempts:
                error = f"{kind} was sent {p.resent + 1} times and never finished; last: {why}"
                self._fail(job, error)
                return f"FAILED {job.id}: {error}"
            key = self.store.key(job.id)
            with self.store.r.pipeline() as pipe:
                pipe.hset(key, mapping={f"{p.index}.token": "", f"{p.index}.sent_at": self.store.now()})
                pipe.hincrby(key, f"{p.index}.resent", 1)
                pipe.execute()
        log.warning("watchdog: job %s: %s sent again: %s", job.id, kind, why)
        self.send(p.task, p.args, p.task_id, p.queue)
        return f"{job.id}: {kind} sent again: {why}"

    def _fail(self, job: Job, error: str) -> None:
        import shutil
        from pathlib import Path

        from .segments import parts_dir

        log.error("watchdog: job %s FAILED: %s", job.id, error)
        if self.store.fail(job.id, error, 1) and job.kind == "video" and job.output:
            shutil.rmtree(parts_dir(Path(job.output), job.id), ignore_errors=True)


def celery_sender(app):
    def send(name: str, args: tuple, task_id: str, queue: str) -> None:
        app.send_task(name, args, task_id=task_id, queue=queue)

    return send


def for_app(app, store: JobStore | None = None) -> Watchdog:
    settings: Settings = app.facemend_settings
    return Watchdog(store or JobStore(settings), settings, celery_sender(app))


class Thread(threading.Thread):
    """The watchdog of a worker: its main process sweeps every FACEMEND_HEARTBEAT_INTERVAL and
    checks that the worker still takes the messages of ``queues`` (``worker.listening``; not
    when FACEMEND_DEAF_SECONDS is 0 or no queues are given)."""

    def __init__(self, app, queues: list[str] = (), hostname: str = "") -> None:
        super().__init__(name="facemend-watchdog", daemon=True)
        self.app = app
        self.queues, self.hostname = list(queues), hostname
        self.stopping = threading.Event()

    def run(self) -> None:
        from .listening import Listening

        dog = listening = None
        s: Settings = self.app.facemend_settings
        while not self.stopping.wait(s.heartbeat_interval):
            try:
                dog = dog or for_app(self.app)
                for line in dog.sweep():
                    log.info("watchdog: %s", line)
                if s.deaf_seconds and self.queues:
                    listening = listening or Listening(dog.broker, self.queues, s.deaf_seconds)
                    if listening.deaf() and not self.stopping.is_set():
                        listening.restart(self.hostname)
            except redis.RedisError as e:  # Redis restarting: the next sweep tries again
                log.info("watchdog: Redis unreachable (%s)", e)
            except Exception:
                log.warning("watchdog: sweep failed", exc_info=True)

    def stop(self) -> None:
        self.stopping.set()
