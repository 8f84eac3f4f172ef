"""Job records in Redis: what a job is, where it stands, and each of its parts.

Celery's results expire (``result_expires``); these records are facemend's own and live for
``record_ttl``. Keys, with ``P`` the key prefix:

- ``P:job:ID``        hash: id, kind, task, input, output, options (JSON), state, unit, done,
                      total, parts, error, exit_code, summary (JSON), cancel, segment_seconds,
                      chunk_files, queue, records, report, ignored (JSON: the first ignored
                      files), ignored_count, planned_skips (JSON: {reason: count} of the
                      files the plan found done), created, started, finished, updated
- ``P:job:ID:parts``  hash: ``I.state``, ``I.worker``, ``I.attempts``, ``I.done``, ``I.start``,
                      ``I.stop``, ``I.error``, ``I.task_id``, ``I.sent``, ``I.sent_at``,
                      ``I.token`` (the run holding it), ``I.beat`` (its last heartbeat, Redis
                      time), ``I.resent`` (sent again by the watchdog) for segment or chunk I;
                      a finished chunk's counts: ``I.files``, ``I.processed``, ``I.skipped``,
                      ``I.failed``, ``I.faces``, ``I.seconds``; the job hash holds ``plan.*``
                      and ``last.*`` (join, summary) the same way
- ``P:job:ID:finished`` set of the part indices that completed (a redelivered part counts once)
- ``P:job:ID:plan``   the video plan (JSON)
- ``P:jobs``          sorted set of job ids by creation time (for ``list``)
- ``P:active``        set of the ids of unfinished jobs (for the watchdog)

No key holds a list of the job's files: a folder job's file lists and per-file outcomes are
files beside its output (``worker.chunks``), its summary keeps counts and the first
``FIRST_FAILURES`` failures, so a record stays small whatever the folder's size (the number of
chunks is bounded by FACEMEND_MAX_PARTS).

A terminal state (DONE, FAILED, CANCELLED) is never overwritten: state changes go through one
Lua script that checks the current state first (``worker.lua``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis

from . import lua
from .errors import BrokerUnavailable, JobNotFound
from .settings import Settings, redact

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
TERMINAL = (DONE, FAILED, CANCELLED)


@dataclass
class Job:
    """A job record as read back from Redis."""

    id: str
    kind: str
    task: str
    input: str
    output: str
    state: str
    options: dict = field(default_factory=dict)
    unit: str = "frames"
    done: int = 0
    total: int = 0
    parts: list = field(default_factory=list)  # [{"index", "state", "worker", "attempts", ...}]
    error: str | None = None
    exit_code: int = 0
    summary: dict = field(default_factory=dict)
    cancel: bool = False
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    updated: float | None = None
    segment_seconds: float = 30.0
    chunk_files: int = 16
    queue: str = ""  # queue of the segments/chunks ("": the gpu queue)
    records: bool = False  # a folder job keeps its manifest and report (``--manifest``)
    report: str = ""  # a folder job that kept records: its report.json

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["done"] = min(self.done, self.total) if self.total else self.done
        return d


def _num(v, kind=float):
    return kind(v) if v not in (None, "") else None


class JobStore:
    """Reads and writes job records; one per process (thread-safe connection pool)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self.ttl = settings.record_ttl
        if client is None:
            kwargs = {}
            url = settings.store_url
            if url.startswith("rediss://"):
                kwargs["ssl_cert_reqs"] = settings.ssl_cert_reqs
                if settings.ssl_ca_certs:
                    kwargs["ssl_ca_certs"] = settings.ssl_ca_certs
            client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                          health_check_interval=30, **kwargs)
        self.r = client
        self._set_state = self.r.register_script(lua.SET_STATE)
        self._start_part = self.r.register_script(lua.START_PART)
        self._beat = self.r.register_script(lua.BEAT)
        self._take_stage = self.r.register_script(lua.TAKE_STAGE)
        self._finish_part = self.r.register_script(lua.FINISH_PART)
        self._resend_part = self.r.register_script(lua.RESEND_PART)

    # keys
    def key(self, job_id: str, sub: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{sub}" if sub else "")

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def active_key(self) -> str:
        """Set of the ids of the jobs not finished yet (what the watchdog looks at)."""
        return f"{self.prefix}:active"

    def now(self) -> float:
        """Redis's clock: heartbeats and the watchdog use it, so clocks of machines may differ."""
        sec, usec = self.r.time()
        return sec + usec / 1e6

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise BrokerUnavailable(f"{redact(self.settings.store_url)}: cannot reach Redis ({e})") from None

    # creating and reading
    def create(self, job_id: str, *, kind: str, task: str, input: str, output: str, options: dict,
               segment_seconds: float, chunk_files: int, queue: str = "", records: bool = False) -> None:
        now = time.time()
        unit = "frames" if kind == "video" else "files"
        with self.r.pipeline() as p:
            p.hset(self.key(job_id), mapping={
                "id": job_id, "kind": kind, "task": task, "input": input, "output": output,
                "options": json.dumps(options), "state": QUEUED, "unit": unit, "done": 0,
                "total": 0, "parts": 0, "exit_code": 0, "created": now, "updated": now,
                "segment_seconds": segment_seconds, "chunk_files": chunk_files, "queue": queue,
                "records": int(records),
            })
            p.expire(self.key(job_id), self.ttl)
            p.zadd(self.index_key, {job_id: now})
            p.sadd(self.active_key, job_id)
            p.execute()

    PART_FIELDS = ("state", "worker", "attempts", "done", "start", "stop", "error", "task_id", "sent", "resent")

    def get(self, job_id: str, *, part: int | None = None) -> Job:
        """The job's record. ``part``: read that part's fields only (what a running segment or
        chunk needs; a job of a thousand chunks has tens of thousands of part fields): the
        other parts are listed, with their default fields."""
        try:
            with self.r.pipeline() as p:
                p.hgetall(self.key(job_id))
                if part is None:
                    p.hgetall(self.key(job_id, "parts"))
                else:
                    p.hmget(self.key(job_id, "parts"), [f"{part}.{k}" for k in self.PART_FIELDS])
                h, parts = p.execute()
            if part is not None:
                parts = {f"{part}.{k}": v for k, v in zip(self.PART_FIELDS, parts) if v is not None}
        except redis.RedisError as e:
            raise BrokerUnavailable(f"{redact(self.settings.store_url)}: cannot reach Redis ({e})") from None
        if not h:
            raise JobNotFound(f"{job_id}: no such job (never submitted, or its record expired)")
        return self._job(h, parts)

    def _job(self, h: dict, parts: dict) -> Job:
        n = int(h.get("parts") or 0)
        plist = []
        for i in range(n):
            g = lambda k, i=i: parts.get(f"{i}.{k}")  # noqa: E731
            plist.append({"index": i, "state": g("state") or QUEUED, "worker": g("worker"),
                          "attempts": int(g("attempts") or 0), "done": int(g("done") or 0),
                          "start": _num(g("start"), int), "stop": _num(g("stop"), int),
                          "error": g("error") or None, "task_id": g("task_id"), "sent": g("sent") == "1",
                          "resent": int(g("resent") or 0)})
        return Job(
            id=h["id"], kind=h.get("kind", ""), task=h.get("task", ""), input=h.get("input", ""),
            output=h.get("output", ""), state=h.get("state", QUEUED),
            options=json.loads(h.get("options") or "{}"), unit=h.get("unit", "frames"),
            done=max(0, int(h.get("done") or 0)), total=int(h.get("total") or 0), parts=plist,
            error=h.get("error") or None, exit_code=int(h.get("exit_code") or 0),
            summary=json.loads(h.get("summary") or "{}"), cancel=h.get("cancel") == "1",
            created=float(h.get("created") or 0), started=_num(h.get("started")),
            finished=_num(h.get("finished")), updated=_num(h.get("updated")),
            segment_seconds=float(h.get("segment_seconds") or 30), chunk_files=int(h.get("chunk_files") or 16),
            queue=h.get("queue") or "", records=h.get("records") == "1", report=h.get("report") or "",
        )

    def state(self, job_id: str) -> tuple[str | None, bool]:
        """(state, cancel flag) in one round trip: what a running part checks between batches."""
        state, cancel = self.r.hmget(self.key(job_id), "state", "cancel")
        return state, cancel == "1"

    def list(self, state: str | None = None, limit: int = 20) -> list[Job]:
        ids = self.r.zrevrange(self.index_key, 0, -1)
        jobs: list[Job] = []
        for job_id in ids:
            h = self.r.hgetall(self.key(job_id))
            if not h:
                self.r.zrem(self.index_key, job_id)  # the record expired
                continue
            if state and h.get("state") != state:
                continue
            jobs.append(self._job(h, self.r.hgetall(self.key(job_id, "parts"))))
            if len(jobs) >= limit:
                break
        return jobs

    # state changes
    def set_state(self, job_id: str, state: str, **fields) -> bool:
        """Move a job to ``state`` unless it is already terminal. True if it moved."""
        now = time.time()
        fields["updated"] = now
        if state == RUNNING:
            fields.setdefault("started", now)
        if state in TERMINAL:
            fields.setdefault("finished", now)
        args = [state]
        for k, v in fields.items():
            args += [k, json.dumps(v) if isinstance(v, (dict, list)) else v]
        moved = bool(self._set_state(keys=[self.key(job_id)], args=args))
        if moved and state in TERMINAL:
            self.expire(job_id)
            self.r.srem(self.active_key, job_id)
        return moved

    def fail(self, job_id: str, error: str, exit_code: int = 1) -> bool:
        return self.set_state(job_id, FAILED, error=error.splitlines()[0] if error else "failed",
                              exit_code=exit_code)

    def request_cancel(self, job_id: str) -> bool:
        """Raise the cancel flag and mark the job CANCELLED (unless it already finished)."""
        moved = self.set_state(job_id, CANCELLED, cancel=1, exit_code=5, error="cancelled by request")
        return moved

    def update(self, job_id: str, **fields) -> None:
        fields["updated"] = time.time()
        self.r.hset(self.key(job_id), mapping={
            k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()})

    def expire(self, job_id: str) -> None:
        with self.r.pipeline() as p:
            for sub in ("", "parts", "finished", "plan"):
                p.expire(self.key(job_id, sub), self.ttl)
            p.execute()

    # parts (video segments, folder chunks)
    def add_parts(self, job_id: str, parts: list[dict], *, total: int) -> None:
        """Record the planned parts ({"start", "stop", "task_id"}) and the job's total."""
        mapping = {}
        now = self.now()  # the watchdog gives a part that was never sent its time from here
        for i, part in enumerate(parts):
            mapping.update({f"{i}.{k}": v for k, v in part.items()})
            mapping[f"{i}.state"] = QUEUED
            mapping[f"{i}.attempts"] = 0
            mapping[f"{i}.sent_at"] = now
        with self.r.pipeline() as p:
            if mapping:
                p.hset(self.key(job_id, "parts"), mapping=mapping)
            p.hset(self.key(job_id), mapping={"parts": len(parts), "total": total, "updated": time.time()})
            for sub in ("", "parts"):
                p.expire(self.key(job_id, sub), self.ttl)
            p.execute()

    def start_part(self, job_id: str, index: int, worker: str, token: str = "-") -> int:
        """Take part ``index`` for ``worker`` (its run holds ``token``) and count one more
        attempt; returns the attempt number, -1 when the part has already finished, -2 while
        another runner of it sends heartbeats (within FACEMEND_HEARTBEAT_TIMEOUT)."""
        return int(self._start_part(
            keys=[self.key(job_id), self.key(job_id, "parts"), self.key(job_id, "finished")],
            args=[index, worker, token, self.settings.heartbeat_timeout]))

    def beat(self, job_id: str, index: int | str, token: str) -> bool:
        """A heartbeat of part ``index`` (or stage "plan" / "last"); False when ``token`` no
        longer holds it (another runner, or the watchdog, took it over)."""
        key = self.key(job_id, "parts") if isinstance(index, int) else self.key(job_id)
        return bool(self._beat(keys=[key], args=[f"{index}.", token]))

    def take_stage(self, job_id: str, stage: str, token: str) -> bool:
        """Hold stage "plan" or "last" (join, summary) with ``token``; False while another
        runner of it sends heartbeats."""
        return bool(self._take_stage(keys=[self.key(job_id)],
                                     args=[f"{stage}.", token, self.settings.heartbeat_timeout]))

    def resend_part(self, job_id: str, index: int, reason: str) -> int:
        """Record that the watchdog sends part ``index`` again (unless it finished or a runner
        sent a heartbeat meanwhile); returns how often it was sent again, 0 for not now."""
        return int(self._resend_part(keys=[self.key(job_id, "parts"), self.key(job_id, "finished")],
                                     args=[index, self.settings.heartbeat_timeout, reason]))

    def mark_sent(self, job_id: str, index: int, queue: str) -> None:
        """Part ``index`` was sent to ``queue`` (where the watchdog looks for its message)."""
        self.set_part(job_id, index, sent=1, sent_at=self.now(), queue=queue)

    def finished(self, job_id: str) -> set[int]:
        return {int(i) for i in self.r.smembers(self.key(job_id, "finished"))}

    def part_fields(self, job_id: str) -> dict[str, str]:
        return self.r.hgetall(self.key(job_id, "parts"))

    def set_part(self, job_id: str, index: int, **fields) -> None:
        self.r.hset(self.key(job_id, "parts"), mapping={f"{index}.{k}": v for k, v in fields.items()})

    def progress(self, job_id: str, index: int, n: int) -> None:
        """Add ``n`` finished frames (or files) to the job and to part ``index``."""
        with self.r.pipeline(transaction=False) as p:
            p.hincrby(self.key(job_id), "done", n)
            p.hincrby(self.key(job_id, "parts"), f"{index}.done", n)
            p.hset(self.key(job_id), "updated", time.time())
            p.execute()

    def finish_part(self, job_id: str, index: int, **fields) -> tuple[bool, int]:
        """Mark part ``index`` DONE; returns (whether this call finished it, how many distinct
        parts have finished). A copy of a finished part changes nothing."""
        args = [index, self.ttl]
        for k, v in fields.items():
            args += [f"{index}.{k}", v]
        first, n = self._finish_part(keys=[self.key(job_id, "parts"), self.key(job_id, "finished"),
                                           self.key(job_id)], args=args)
        return bool(first), int(n)

    # payloads
    def save_plan(self, job_id: str, plan: dict) -> None:
        self.r.set(self.key(job_id, "plan"), json.dumps(plan), ex=self.ttl)

    def load_plan(self, job_id: str) -> dict:
        raw = self.r.get(self.key(job_id, "plan"))
        if raw is None:
            raise JobNotFound(f"{job_id}: the job's video plan is missing from Redis")
        return json.loads(raw)
