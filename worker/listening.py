"""A worker that no longer takes messages notices it and starts again.

A Celery worker on Redis can come back from a broker reconnection connected and alive but never
receiving again (celery#8030, #8091, #10205): it answers pings, its process looks healthy, and
the messages of the queues it serves wait there for ever. Where it is the only worker of a
queue, every job sent there hangs until FACEMEND_STALL_SECONDS fails it; the watchdog cannot help,
as the messages are in their queue.

Every worker's watchdog thread samples, every FACEMEND_HEARTBEAT_INTERVAL: whether the worker
holds a task (reserved, running or waiting for its ETA), how many it has started, and how many
messages wait in each queue it was started on. A worker that held nothing and started nothing
for FACEMEND_DEAF_SECONDS while one of its queues held messages at every sample is deaf: a
healthy idle worker takes a waiting message within milliseconds. It logs one error, stops
(warm: it holds nothing) with exit code ``DEAF_EXIT``, and ``facemend worker`` starts again in
the same process (``exec``: fresh connections, the same PID for its supervisor). A shutdown that
does not end within FACEMEND_DEAF_SECONDS ends the process with that code at once; compose's
``restart: unless-stopped`` (or any supervisor) starts it again.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import redis

log = logging.getLogger(__name__)

DEAF_EXIT = 75  # EX_TEMPFAIL: "try again"; ``facemend worker`` restarts itself on it
deaf_stop = threading.Event()  # set when this process's worker was stopped as deaf


def waiting(client: redis.Redis, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each of ``queues`` (kombu's Redis lists, its priority lists included)."""
    from .watchdog import _PRIORITY_SEP, _PRIORITY_STEPS

    names = [(q, n) for q in queues for n in [q] + [f"{q}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]]
    with client.pipeline(transaction=False) as pipe:
        for _, n in names:
            pipe.llen(n)
        counts = pipe.execute()
    out = dict.fromkeys(queues, 0)
    for (q, _), c in zip(names, counts):
        out[q] += int(c)
    return out


class Deafness:
    """``observe(now, busy, started, waiting)`` -> whether the worker has been deaf for
    ``seconds``: idle (``busy`` False), ``started`` (its count of tasks started) unchanged and
    some queue of ``waiting`` ({queue: messages}) non-empty at every sample since then."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.since: float | None = None
        self.started: int | None = None
        self.queues: dict[str, int] = {}

    def observe(self, now: float, busy: bool, started: int, waiting: dict[str, int] | None) -> bool:
        moved = self.started is not None and started != self.started
        self.started = started
        if busy or moved or not waiting or not any(waiting.values()):
            self.since = None
            return False
        self.queues = {q: n for q, n in waiting.items() if n}
        if self.since is None:
            self.since = now
        return now - self.since >= self.seconds

    def describe(self, now: float) -> str:
        held = ", ".join(f"{q} ({n})" for q, n in sorted(self.queues.items()))
        return f"idle for {now - (self.since or now):.0f} s while its queues held messages: {held}"


class Listening:
    """The check a worker's watchdog thread runs (``worker.watchdog.Thread``)."""

    def __init__(self, client: redis.Redis, queues: list[str], seconds: float) -> None:
        self.client, self.queues = client, list(queues)
        self.deafness = Deafness(seconds)

    def deaf(self) -> bool:
        from celery.worker import state

        busy = bool(state.requests or state.reserved_requests or state.active_requests
                    or state.scheduled_requests)
        try:
            counts = waiting(self.client, self.queues)
        except redis.RedisError:  # Redis away: the consumer reconnects on its own
            counts = None
        return self.deafness.observe(time.monotonic(), busy, state.all_total_count[0], counts)

    def restart(self, hostname: str) -> None:
        """Stop the worker with ``DEAF_EXIT`` (``facemend worker`` starts again); past the grace
        of FACEMEND_DEAF_SECONDS, end the process with that code."""
        from celery.worker import state

        log.error("worker %s: %s; it takes none of them (its broker connection is deaf): restarting",
                  hostname, self.deafness.describe(time.monotonic()))
        deaf_stop.set()
        state.should_stop = DEAF_EXIT
        time.sleep(max(5.0, self.deafness.seconds))
        log.error("worker %s: did not stop within %g s: exiting with code %d", hostname,
                  max(5.0, self.deafness.seconds), DEAF_EXIT)
        logging.shutdown()
        os._exit(DEAF_EXIT)
