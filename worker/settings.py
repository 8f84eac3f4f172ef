"""Every setting of the distributed worker, read once from the environment.

``Settings.from_env()`` is the only place that reads ``FACEMEND_*`` variables; a bad value raises
``SettingsError`` naming the variable. No broker URL means the embedded default (jobs run in the
submitting process); a broker URL means jobs are queued to Celery workers.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from .errors import SettingsError


@dataclass(frozen=True)
class Settings:
    broker_url: str | None = None
    """FACEMEND_BROKER_URL: ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS).
    Unset: the embedded default, no queue."""

    result_backend: str | None = None
    """FACEMEND_RESULT_BACKEND: where Celery keeps task results (default: the broker URL)."""

    records_url: str | None = None
    """FACEMEND_RECORDS_URL: the Redis that holds job records (default: the broker URL)."""

    gpu_queue: str = "gpu"
    """FACEMEND_GPU_QUEUE: queue of the model work (video segments, image chunks)."""

    cpu_queue: str = "cpu"
    """FACEMEND_CPU_QUEUE: queue of the light work (plan, join, folder summary)."""

    segment_seconds: float = 30.0
    """FACEMEND_SEGMENT_SECONDS: target length of a video segment; cuts snap to a keyframe
    within a quarter of it when there is one."""

    chunk_files: int = 16
    """FACEMEND_CHUNK_FILES: files of a folder job per task."""

    max_parts: int = 500
    """FACEMEND_MAX_PARTS: most chunks of one folder job; a bigger folder gets bigger chunks, so
    its record in Redis stays small (about 1.4 KB a chunk) and so does the work per file."""

    archive_queue: str = "archive"
    """FACEMEND_ARCHIVE_QUEUE: queue of the scheduled archive jobs' chunks. Workers listen on it
    besides the gpu and cpu queues unless given ``--queues``."""

    archive_folders: tuple[str, ...] = ()
    """FACEMEND_ARCHIVE_FOLDERS: the folders the schedule (``worker.schedule``, Celery beat)
    processes every day, separated by ``:``; each ``INPUT`` (output ``INPUT.TASK`` beside it) or
    ``INPUT=OUTPUT``. Absolute paths on the shared storage."""

    archive_task: str = "denoise"
    """FACEMEND_ARCHIVE_TASK: the task of the scheduled archive jobs."""

    archive_at: str = "02:00"
    """FACEMEND_ARCHIVE_AT: time of day (HH:MM, in FACEMEND_ARCHIVE_TIMEZONE) the schedule
    submits its folders."""

    archive_timezone: str = "UTC"
    """FACEMEND_ARCHIVE_TIMEZONE: time zone of FACEMEND_ARCHIVE_AT (an IANA name)."""

    storage_roots: tuple[str, ...] = ()
    """FACEMEND_STORAGE_ROOTS: allowed folders for inputs and outputs, separated by ``:``
    (the shared storage every worker mounts at the same path). Empty: any path."""

    visibility_timeout: int = 6 * 3600
    """FACEMEND_VISIBILITY_TIMEOUT: seconds before Redis gives an unacknowledged task (its worker
    died) to another worker. Must stay far above the longest segment's run time."""

    soft_time_limit: int = 3600
    """FACEMEND_SOFT_TIME_LIMIT: seconds a segment or chunk may run before it is asked to stop."""

    time_limit: int = 3900
    """FACEMEND_TIME_LIMIT: seconds before the worker child running a task is killed."""

    max_attempts: int = 3
    """FACEMEND_MAX_ATTEMPTS: attempts of one segment or chunk (crashes and kills included)
    before the job is FAILED."""

    heartbeat_interval: float = 10.0
    """FACEMEND_HEARTBEAT_INTERVAL: seconds between the heartbeats a running part (and a running
    plan or join) writes into its job record, and between the watchdog checks every worker (and
    ``wait``) runs over the unfinished jobs."""

    heartbeat_timeout: float = 120.0
    """FACEMEND_HEARTBEAT_TIMEOUT: a part that has sent no heartbeat for this long (its worker is
    gone: killed, crashed, cut off when Redis restarted), or that is recorded as queued while no
    queue holds its message for this long, is sent again by the watchdog (attempts bounded by
    FACEMEND_MAX_ATTEMPTS). A copy delivered while its part still sends heartbeats steps aside."""

    stall_seconds: float = 6 * 3600
    """FACEMEND_STALL_SECONDS: a job that makes no progress for this long while none of its parts
    waits in a queue is FAILED, the error naming what stalled. 0: never."""

    deaf_seconds: float = 120.0
    """FACEMEND_DEAF_SECONDS: a worker that holds no task and starts none for this long while a
    queue it serves holds messages stops with exit code 75 and ``facemend worker`` starts again
    (``worker.listening``). 0: never."""

    result_expires: int = 24 * 3600
    """FACEMEND_RESULT_EXPIRES: seconds Celery keeps task results."""

    record_ttl: int = 30 * 24 * 3600
    """FACEMEND_RECORD_TTL: seconds job records are kept (far beyond Celery's results)."""

    progress_interval: float = 1.0
    """FACEMEND_PROGRESS_INTERVAL: seconds between progress writes of a running task."""

    key_prefix: str = "facemend"
    """FACEMEND_KEY_PREFIX: prefix of the job record keys in Redis."""

    device: str | None = None
    """FACEMEND_DEVICE: device of this worker (``cuda:0``, ``cpu``); overrides the job's."""

    preload_tasks: tuple[str, ...] = ("denoise",)
    """FACEMEND_PRELOAD_TASKS: models loaded when a worker child starts (comma-separated)."""

    torch_threads: int = 0
    """FACEMEND_TORCH_THREADS: CPU threads per worker child (0: torch's default; ``cli.py worker``
    with a pool of several sets it to the cores shared out among them)."""

    ssl_cert_reqs: str = "required"
    """FACEMEND_SSL_CERT_REQS: ``required``, ``optional`` or ``none`` for ``rediss://`` URLs."""

    ssl_ca_certs: str | None = None
    """FACEMEND_SSL_CA_CERTS: CA bundle for ``rediss://`` URLs (default: the system's)."""

    @property
    def queued(self) -> bool:
        return bool(self.broker_url)

    @property
    def backend_url(self) -> str | None:
        return self.result_backend or self.broker_url

    @property
    def store_url(self) -> str | None:
        return self.records_url or self.broker_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            name = f"FACEMEND_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(name, raw.strip(), f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**values)
        s.check()
        return s

    def with_broker(self, url: str | None) -> "Settings":
        if not url:
            return self
        s = replace(self, broker_url=url)
        s.check()
        return s

    def check(self) -> None:
        for var, url in (("FACEMEND_BROKER_URL", self.broker_url),
                         ("FACEMEND_RESULT_BACKEND", self.result_backend),
                         ("FACEMEND_RECORDS_URL", self.records_url)):
            if url and urlsplit(url).scheme not in ("redis", "rediss"):
                raise SettingsError(f"{var}={_redact(url)}: must be a redis:// or rediss:// URL")
        if self.segment_seconds <= 0:
            raise SettingsError(f"FACEMEND_SEGMENT_SECONDS={self.segment_seconds}: must be > 0")
        if self.chunk_files < 1:
            raise SettingsError(f"FACEMEND_CHUNK_FILES={self.chunk_files}: must be >= 1")
        if self.max_parts < 1:
            raise SettingsError(f"FACEMEND_MAX_PARTS={self.max_parts}: must be >= 1")
        try:
            archive_time(self.archive_at)
        except ValueError:
            raise SettingsError(f"FACEMEND_ARCHIVE_AT={self.archive_at!r}: expected HH:MM (e.g. 02:30)") from None
        for entry in self.archive_folders:
            if not all(Path(p).is_absolute() for p in entry.split("=", 1)):
                raise SettingsError(f"FACEMEND_ARCHIVE_FOLDERS: {entry!r} is not an absolute path "
                                    "(INPUT or INPUT=OUTPUT)")
        if self.max_attempts < 1:
            raise SettingsError(f"FACEMEND_MAX_ATTEMPTS={self.max_attempts}: must be >= 1")
        if self.time_limit <= self.soft_time_limit:
            raise SettingsError(f"FACEMEND_TIME_LIMIT={self.time_limit}: must exceed "
                                f"FACEMEND_SOFT_TIME_LIMIT={self.soft_time_limit}")
        if self.visibility_timeout <= 0:
            raise SettingsError(f"FACEMEND_VISIBILITY_TIMEOUT={self.visibility_timeout}: must be > 0")
        if self.heartbeat_interval <= 0:
            raise SettingsError(f"FACEMEND_HEARTBEAT_INTERVAL={self.heartbeat_interval}: must be > 0")
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise SettingsError(f"FACEMEND_HEARTBEAT_TIMEOUT={self.heartbeat_timeout}: must be at least twice "
                                f"FACEMEND_HEARTBEAT_INTERVAL={self.heartbeat_interval}")
        if self.deaf_seconds and self.deaf_seconds < 2 * self.heartbeat_interval:
            raise SettingsError(f"FACEMEND_DEAF_SECONDS={self.deaf_seconds}: must be 0 (never) or at least "
                                f"twice FACEMEND_HEARTBEAT_INTERVAL={self.heartbeat_interval}")
        if self.stall_seconds < 0:
            raise SettingsError(f"FACEMEND_STALL_SECONDS={self.stall_seconds}: must be >= 0 (0: never)")
        if self.ssl_cert_reqs not in ("required", "optional", "none"):
            raise SettingsError(f"FACEMEND_SSL_CERT_REQS={self.ssl_cert_reqs!r}: "
                                "use required, optional or none")
        for root in self.storage_roots:
            if not Path(root).is_absolute():
                raise SettingsError(f"FACEMEND_STORAGE_ROOTS: {root!r} is not an absolute path")


def _parse(name: str, raw: str, default):
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            sep = ":" if name in ("FACEMEND_STORAGE_ROOTS", "FACEMEND_ARCHIVE_FOLDERS") else ","
            return tuple(p.strip() for p in raw.split(sep) if p.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a {type(default).__name__}") from None
    return raw


def archive_time(text: str) -> tuple[int, int]:
    """(hour, minute) of ``HH:MM``; ValueError otherwise."""
    hour, minute = (int(v) for v in text.split(":"))
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise ValueError(text)
    return hour, minute


def _redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


redact = _redact
