"""Loaded detectors and models of one worker child, reused by every task it runs."""
from __future__ import annotations

import logging
from dataclasses import replace

from pipeline.errors import FacemendError
from pipeline.job import Engine, JobOptions
from pipeline.weights import weights_digest

from .settings import Settings

log = logging.getLogger(__name__)

_engines: dict[tuple, Engine] = {}
KEEP = 2  # engines kept per child (a detector and one model each)


def engine_for(opts: JobOptions, settings: Settings) -> Engine:
    """The Engine for a job's task and detector options on this worker's device.

    Keyed by the sha256 of the weights files too (``pipeline.weights.weights_digest``, hashed
    again only when a file's size or mtime changes): weights updated under a running worker are
    loaded for its next task, so what a folder's manifest records as the weights a file was
    restored with is what restored it."""
    opts = replace(opts, device=settings.device or opts.device, preview=None)
    key = (opts.task, opts.device, opts.min_face, opts.detect_side, opts.batch_size, opts.colour_match,
           opts.grain, opts.fast, opts.strength, opts.amount, opts.sharpen, tuple(sorted(weights_digest(opts.task).items())))
    if key not in _engines:
        if len(_engines) >= KEEP:
            _engines.pop(next(iter(_engines)))
        _engines[key] = Engine(opts)
    return _engines[key]


def preload(settings: Settings) -> None:
    for task in settings.preload_tasks:
        try:
            engine_for(JobOptions(task=task), settings)
        except FacemendError as e:  # a model still training must not stop the worker
            log.warning("preload of %r skipped: %s", task, e)
