"""The Celery application: configuration from ``Settings`` and the worker-child start-up.

``python cli.py worker`` runs a worker, as does ``celery -A worker.app worker -P prefork -c 4
-Q gpu,cpu -n gpu0@%h --without-mingle --without-gossip`` (why without: ``worker.commands``).
The model is loaded in the pool child after the fork (``worker_process_init``): CUDA does not
survive a fork.
"""
from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from .settings import Settings

log = logging.getLogger(__name__)

_SSL = {"required": "CERT_REQUIRED", "optional": "CERT_OPTIONAL", "none": "CERT_NONE"}


def celery_config(s: Settings) -> dict:
    """Celery settings for ``s`` (see DESIGN.md: acks late, prefetch 1, long visibility)."""
    transport = {
        "visibility_timeout": s.visibility_timeout,
        # look for the tasks of dead workers often enough that a short timeout is honoured
        "unacked_restore_interval": max(1, min(10, s.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
    }
    conf = {
        "broker_url": s.broker_url,
        "result_backend": s.backend_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # a pool child loads its models before it reports up: a child started after another
        # died (killed, or terminated when the broker connection was lost) must not be killed
        # for taking more than billiard's default 4 s to do so
        "worker_proc_alive_timeout": 300,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": s.soft_time_limit,
        "task_time_limit": s.time_limit,
        "result_expires": s.result_expires,
        "task_track_started": True,
        "task_default_queue": s.cpu_queue,
        "task_routes": {
            "facemend.segment": {"queue": s.gpu_queue},
            "facemend.chunk": {"queue": s.gpu_queue},
            "facemend.plan": {"queue": s.cpu_queue},
            "facemend.join": {"queue": s.cpu_queue},
            "facemend.summarise": {"queue": s.cpu_queue},
        },
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.5, "interval_step": 1},
    }
    if s.broker_url and s.broker_url.startswith("rediss://"):
        conf["broker_use_ssl"] = _ssl_options(s)
    if s.backend_url and s.backend_url.startswith("rediss://"):
        conf["redis_backend_use_ssl"] = _ssl_options(s)
    return conf


def _ssl_options(s: Settings) -> dict:
    import ssl

    opts = {"ssl_cert_reqs": getattr(ssl, _SSL[s.ssl_cert_reqs])}
    if s.ssl_ca_certs:
        opts["ssl_ca_certs"] = s.ssl_ca_certs
    return opts


def make_app(settings: Settings) -> Celery:
    app = Celery("facemend", include=["worker.tasks", "worker.schedule"])
    app.conf.update(celery_config(settings))
    app.facemend_settings = settings
    return app


def configure(settings: Settings) -> None:
    """Re-point the module's app (the CLI's ``--broker``). Connections made to the previous
    broker are closed, so nothing is sent there any more. The same settings again change
    nothing (a task of a worker that submits a job keeps the worker's connections)."""
    if settings == getattr(app, "facemend_settings", None):
        return
    if getattr(app, "_pool", None) is not None:
        app._pool = None  # the old pool is dropped, not closed: a producer may still hold it
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    app.conf.update(celery_config(settings))
    app.facemend_settings = settings


app = make_app(Settings.from_env())


@worker_process_init.connect
def _load_models(**_) -> None:
    """In each pool child, after the fork: thread count, then the preloaded models."""
    from .engines import preload

    s: Settings = app.facemend_settings
    if s.torch_threads:
        import torch

        torch.set_num_threads(s.torch_threads)
    log.info("worker child %d: loading %s on %s", os.getpid(), ",".join(s.preload_tasks) or "nothing",
             s.device or "auto")
    preload(s)
    log.info("worker child %d: models loaded", os.getpid())


_watchdog = None


@worker_ready.connect
def _start_watchdog(sender=None, **_) -> None:
    """In the worker's main process: the watchdog thread (``worker.watchdog``), no extra process;
    it also restarts a worker that stopped taking the messages of the queues it started on
    (``worker.listening``)."""
    global _watchdog
    from .watchdog import Thread

    if _watchdog is None:
        queues = list(app.amqp.queues.consume_from or app.amqp.queues)
        _watchdog = Thread(app, queues, getattr(sender, "hostname", "") or "")
        _watchdog.start()
        s: Settings = app.facemend_settings
        log.info("watchdog: checks unfinished jobs every %g s (heartbeat timeout %g s, stall %g s) and "
                 "that this worker takes the messages of %s (deaf after %g s)", s.heartbeat_interval,
                 s.heartbeat_timeout, s.stall_seconds, ",".join(queues), s.deaf_seconds)


@worker_shutdown.connect
def _stop_watchdog(**_) -> None:
    if _watchdog is not None:
        _watchdog.stop()
