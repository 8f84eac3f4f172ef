"""A folder job's files side by side in several processes (``run_folder(..., processes=N)``).

One job keeps about 4 CPU cores busy (its Python thread, libx264's and the networks' threads)
and leaves a GPU mostly idle, so on a larger machine files processed side by side add up
(walking_1080p denoise on 16 cores: 8.3 fps in one process, 19.6 in four; with an H200 18.3 and
39.4). Each process is started fresh (spawn: CUDA and the engines' thread pools do not survive
a fork), loads its own models with its share of the cores, and is handed the next file when it
is done with one. The parent keeps everything a folder job records: the manifest (each file's
outcome as soon as it is known), the counts, the failures, the report's samples. A cancel is
seen between files, as in one process: the files in hand are finished, no new one is handed
out, and the caller removes what the job wrote. An interrupt (Ctrl-C, SIGTERM) stops every
process at once, each removing its unfinished output as a job in one process does.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Cancelled, FacemendError, OutputUnwritable  # light: no media or torch

if TYPE_CHECKING:
    from .job import Engine, JobOptions, JobResult

log = logging.getLogger(__name__)

MAX_DEFAULT = 4  # processes side by side unless asked for more (memory: ~2 GB each for 1080p)


def cores() -> int:
    """The CPU cores this process may run on (a container's cpuset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_processes(cpus: int | None = None) -> int:
    """One process per 4 CPU cores, 1 to ``MAX_DEFAULT`` (a 2-core machine runs one: two
    there ran 9.5 fps together against one's 10.2)."""
    return max(1, min(MAX_DEFAULT, (cpus or cores()) // 4))


_engine: Engine | None = None  # each child's, built once by ``_start``


def _start(opts: JobOptions, threads: int, level: int, samples: int) -> None:
    """A child's start: logging as the parent's, its share of the cores, its own models."""
    global _engine
    logging.basicConfig(level=level, format="facemend: %(message)s")
    import torch

    from .job import Engine
    from .restore import PreviewSink

    torch.set_num_threads(threads)
    _engine = Engine(opts)
    if samples and _engine.restorer.preview is None and not getattr(_engine.restorer, "identity", False):
        _engine.restorer.preview = PreviewSink(limit=samples)


def _one(p: Path, out: Path, opts: JobOptions) -> dict:
    """One file in a child: what ``run_folder`` adds to its result for it. A file's own error
    is returned as its one line; an error that stops the whole job (an output that cannot be
    written) is returned as ``stop``."""
    from .folder import unexpected
    from .job import JobResult, process_file

    part = JobResult(str(p), str(out), "folder", opts.task)
    t0 = time.perf_counter()
    done = {"error": None, "stop": None}
    try:
        process_file(p, out, opts, _engine, part)
    except (OutputUnwritable, Cancelled) as e:
        done["stop"] = (type(e).__name__, str(e))
    except Exception as e:  # one bad file: it fails alone
        done["error"] = str(e) if isinstance(e, FacemendError) else unexpected(p, e)
        if not isinstance(e, FacemendError):
            log.debug("%s", p, exc_info=True)
    sink, pairs = _engine.restorer.preview, []
    if sink is not None:  # the report's samples go back to the parent
        pairs, sink.pairs = sink.pairs, []
    return {**done, "seconds": time.perf_counter() - t0, "frames": part.frames, "faces": part.faces,
            "frames_with_faces": part.frames_with_faces, "notes": part.notes, "items": part.items,
            "pairs": pairs}


def _child(tasks, results, opts: JobOptions, threads: int, level: int, samples: int) -> None:
    """A child process: its models once, then the files it is handed, until ``None``. An
    interrupt (Ctrl-C, or the parent's terminate: SIGTERM) stops the file in hand the way it
    stops a job in one process (its temporary output removed) and ends the child quietly."""
    import signal

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        _start(opts, threads, level, samples)
        while (item := tasks.get()) is not None:
            k, p, out = item
            results.put(("start", os.getpid(), k))
            results.put(("done", k, _one(p, out, opts)))
    except KeyboardInterrupt:
        pass


def run_files(todo: list[tuple[Path, Path, os.stat_result | None]], opts: JobOptions, engine: Engine,
              hooks, result: JobResult, book, processes: int) -> None:
    """``todo`` (input, output, the input's stat) in ``processes`` child processes, each handed
    one file at a time; each outcome goes into ``result`` and ``book`` (the manifest, or None)
    as ``run_folder`` records it in one process. Raises ``Cancelled`` after a cancel (the files
    in hand are finished first), the error of a file that stops the job (``OutputUnwritable``),
    and a ``FacemendError`` naming the file whose process died. On any other way out (an
    interrupt) the children are stopped at once, their files in hand left unwritten."""
    import queue as queues

    sink = engine.restorer.preview
    threads = int(os.environ.get("FACEMEND_TORCH_THREADS") or 0) or max(1, cores() // processes)
    level = logging.getLogger().getEffectiveLevel()
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    children = [ctx.Process(target=_child, daemon=True, name=f"facemend-file-{n}",
                            args=(tasks, results, opts, threads, level, sink.limit if sink is not None else 0))
                for n in range(processes)]
    for c in children:
        c.start()
    nxt, sent, held = 0, set(), {}  # the next file to hand out; those handed out; pid -> its file
    stop: BaseException | None = None
    clean = False
    try:
        for _ in children:  # one file in hand per child
            nxt, k = _hand_out(todo, nxt, tasks, hooks, result, book)
            sent |= {k} - {None}
        while sent:
            if stop is None and hooks.cancelled():
                stop = Cancelled(f"cancelled after {result.files['processed']} files")
            try:
                kind, a, b = results.get(timeout=0.5)
            except queues.Empty:
                for c in children:  # none ends before it is told to (``None``)
                    if not c.is_alive():
                        k = held.get(c.pid)
                        what = todo[k][0] if k is not None else "a file of the folder"
                        raise FacemendError(f"{what}: the process restoring it stopped (exit code "
                                            f"{c.exitcode}; out of memory?); rerun with --skip-existing "
                                            "to go on") from None
                continue
            if kind == "start":  # (pid, file index)
                held[a] = b
                continue
            k, got = a, b  # "done": (file index, its outcome)
            sent.discard(k)
            held = {pid: h for pid, h in held.items() if h != k}
            p, out, st = todo[k]
            if got["stop"] is not None:
                name, text = got["stop"]
                stop = stop or (OutputUnwritable(text) if name == "OutputUnwritable" else Cancelled(text))
            else:
                _record(result, book, p, out, st, got)
                if sink is not None:
                    sink.pairs += got["pairs"][: max(0, sink.limit - len(sink.pairs))]
                hooks.advance(1)
            if stop is None:
                nxt, k = _hand_out(todo, nxt, tasks, hooks, result, book)
                sent |= {k} - {None}
        clean = True
        if stop is not None:
            raise stop
    finally:
        for _ in children:
            tasks.put(None)
        if not clean:  # an interrupt or an error here: the children stop now
            for c in children:
                if c.is_alive():
                    c.terminate()
        for c in children:
            c.join(timeout=60)
            if c.is_alive():
                c.kill()
        order = {str(p): k for k, (p, _, _) in enumerate(todo)}
        result.items.sort(key=lambda item: order.get(item["file"], -1))  # the folder's order


def _hand_out(todo, nxt: int, tasks, hooks, result: JobResult, book) -> tuple[int, int | None]:
    """Hand the children the first file of ``todo`` from index ``nxt`` on that the job may
    touch; one it may not (``hooks.check_file``) is recorded as failed. Returns the index to go
    on from and the index of the file handed out (None: none was left)."""
    while nxt < len(todo):
        p, out, st = todo[nxt]
        try:
            hooks.check_file(p, out)  # a link in the folder may point elsewhere
        except FacemendError as e:
            _record(result, book, p, out, st, {"error": str(e), "seconds": 0.0})
            hooks.advance(1)
            nxt += 1
            continue
        tasks.put((nxt, p, out))
        return nxt + 1, nxt
    return nxt, None


def _record(result: JobResult, book, p: Path, out: Path, st, got: dict) -> None:
    """One file's outcome into the folder's result and manifest, as ``run_folder`` records it."""
    from . import manifest

    if got["error"] is not None:
        result.files["failed"] += 1
        result.failures.append({"file": str(p), "error": got["error"]})
        log.info("%s", got["error"])
        if book is not None:
            book.record(p, out, manifest.FAILED, error=got["error"], stat=st, seconds=got["seconds"])
        return
    result.files["processed"] += 1
    for key in ("frames", "faces", "frames_with_faces"):
        setattr(result, key, getattr(result, key) + got[key])
    result.notes += got["notes"]
    result.items += got["items"]
    if book is not None:
        book.record(p, out, manifest.DONE, faces=got["items"][-1]["faces"], stat=st, seconds=got["seconds"])
