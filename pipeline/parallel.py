"""A job's work side by side in several processes: a folder's files (``run_files``, from
``run_folder(..., processes=N)``) or a long video's segments (``run_segments``, from ``run_video``).

One job does not keep a larger machine busy (its Python thread runs detection, restoration and
pasting one after another) and leaves a GPU mostly idle, so work side by side adds up
(walking_1080p denoise on 16 cores: 8.3 fps in one process, 19.6 in four; with an H200 18.3 and
39.4). Each process is started fresh (spawn: CUDA and the engines' thread pools do not survive
a fork), loads its own models with its share of the cores, and is handed the next file or
segment when it is done with one. The parent keeps everything a folder job records: the manifest (each file's
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


GPU_BYTES_PER_PROCESS = 1.5 * 2**30  # a child's CUDA context and models (1.2 GB measured on an H200)


def fit_on_device(processes: int, device: str) -> int:
    """``processes``, or fewer where a CUDA device's free memory holds fewer children."""
    if processes <= 1 or not str(device).startswith("cuda"):
        return processes
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError, ValueError):
        return processes
    fits = max(1, int(free // GPU_BYTES_PER_PROCESS))
    if fits < processes:
        log.info("%s: %.1f GB free, room for %d processes side by side (of %d)", device, free / 2**30,
                 fits, processes)
    return min(processes, fits)


def memory_available() -> int | None:
    """The memory the kernel says can be taken without swapping (Linux's MemAvailable), bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fit_in_memory(processes: int, megapixels: float = 2.1) -> int:
    """``processes``, or fewer where the memory available holds fewer children: each takes about
    1 GB (libraries, models) and 0.45 GB a megapixel of frame (1080p: 1.9 GB measured)."""
    free = memory_available() if processes > 1 else None
    if free is None:
        return processes
    fits = max(1, int(free // ((1.0 + 0.45 * max(megapixels, 2.1)) * 2**30)))
    if fits < processes:
        log.info("%.1f GB of memory available: room for %d processes side by side (of %d)", free / 2**30,
                 fits, processes)
    return min(processes, fits)


def work_prefix(pid: int | None = None) -> str:
    """The name prefix of the temporary folder a video's part is written in beside its output,
    by this process or process ``pid``: a child that dies is cleaned up after by name."""
    return f".facemend-{pid or os.getpid()}-"


def work_dir(dst: Path):
    """The temporary folder beside ``dst`` that a video's parts are written in, named for this
    process (``work_prefix``); a folder that cannot be made is ``dst``'s output error."""
    import tempfile

    from .errors import output_error

    try:
        return tempfile.TemporaryDirectory(prefix=work_prefix(), dir=dst.parent)
    except OSError as e:
        raise output_error(dst, e) from None


def share_of_cores(processes: int) -> int:
    """Torch threads for each of ``processes`` processes side by side: ``FACEMEND_TORCH_THREADS``
    where set, else the cores shared out."""
    return int(os.environ.get("FACEMEND_TORCH_THREADS") or 0) or max(1, cores() // processes)


def remove_left(out: Path, pid: int) -> None:
    """What process ``pid`` (a child killed while it wrote ``out``) left beside ``out``: its
    partial file and its temporary folder. A child that is stopped cleans up itself; one that
    is killed (the out-of-memory killer, SIGKILL) cannot."""
    import shutil

    from .media import partial_name

    partial_name(out, pid).unlink(missing_ok=True)
    for d in out.parent.glob(work_prefix(pid) + "*"):
        shutil.rmtree(d, ignore_errors=True)


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
    from .folder import file_error
    from .job import JobResult, process_file

    part = JobResult(str(p), str(out), "folder", opts.task)
    t0 = time.perf_counter()
    done = {"error": None, "stop": None}
    try:
        process_file(p, out, opts, _engine, part)
    except (OutputUnwritable, Cancelled) as e:
        done["stop"] = (type(e).__name__, str(e))
    except Exception as e:  # one bad file: it fails alone
        done["error"] = file_error(p, e)
    sink, pairs = _engine.restorer.preview, []
    if sink is not None:  # the report's samples go back to the parent
        pairs, sink.pairs = sink.pairs, []
    return {**done, "seconds": time.perf_counter() - t0, "frames": part.frames, "faces": part.faces,
            "frames_with_faces": part.frames_with_faces, "notes": part.notes, "items": part.items,
            "pairs": pairs}


def _segment(vplan: dict, start: int, stop: int, part: Path, opts: JobOptions, progress, cancelled) -> dict:
    """Frames ``start``..``stop`` of a video in a child, into ``part`` (``process_range`` with
    the context frames a queued segment has, so the parts join as a worker's do)."""
    from .media import VideoPlan
    from .video import process_range

    _engine.restorer.reset()  # per-video state belongs to one range
    done = {"error": None, "stop": None}
    try:
        r = process_range(VideoPlan.from_dict(vplan), part, detector=_engine.detector,
                          restorer=_engine.restorer, settings=opts.encoder(joinable=True), start=start,
                          stop=stop, detect_every=opts.detect_every, progress=progress,
                          should_cancel=cancelled.is_set)
    except Exception as e:  # the video fails as a whole: its error, by kind, to the parent
        done["stop"] = (type(e).__name__, str(e) if isinstance(e, FacemendError) else f"{type(e).__name__}: {e}")
        return done
    return {**done, "frames": r.frames, "faces": r.faces, "frames_with_faces": r.frames_with_faces}


def _child(tasks, results, cancelled, opts: JobOptions, threads: int, level: int, samples: int) -> None:
    """A child process: its models once, then the tasks it is handed (a folder's file, a
    video's segment), until ``None``. An interrupt (Ctrl-C, or the parent's terminate: SIGTERM)
    stops the task in hand the way it stops a job in one process (its temporary output removed)
    and ends the child quietly."""
    import signal

    def interrupted(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        _start(opts, threads, level, samples)
        while (item := tasks.get()) is not None:
            kind, k, *args = item
            results.put(("start", os.getpid(), k))
            if kind == "file":
                got = _one(*args, opts)
            else:
                got = _segment(*args, opts, lambda n, k=k: results.put(("frames", k, n)), cancelled)
            results.put(("done", k, got))
    except KeyboardInterrupt:
        pass
    # on its way out (flushing its queue) a signal ends the child without a word: the parent
    # that sends it is stopping and needs nothing more from it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _serve(count: int, processes: int, opts: JobOptions, samples: int, hooks, hand, done, name,
           lost=None) -> None:
    """Tasks 0..count-1 in ``processes`` child processes, each handed one at a time, in order:
    ``hand(k)`` gives task k's tuple, or None when it was dealt with here (refused);
    ``done(k, outcome)`` takes its outcome and returns an exception that stops the job, or None;
    ``name(k)`` says what task k is. A stop, or a cancel (``hooks.cancelled``), hands out no
    more, tells the segments in hand to stop (``process_range``'s ``should_cancel``), lets the
    files in hand end, and raises. On any other way out (an interrupt, an error here) the
    children are stopped at once. A child that dies is a ``FacemendError`` naming its task;
    ``lost(k, pid)`` first removes what it left."""
    import queue as queues

    threads = share_of_cores(processes)
    level = logging.getLogger().getEffectiveLevel()
    ctx = multiprocessing.get_context("spawn")
    tasks, results, cancelled = ctx.Queue(), ctx.Queue(), ctx.Event()
    children = [ctx.Process(target=_child, daemon=True, name=f"facemend-{n}",
                            args=(tasks, results, cancelled, opts, threads, level, samples))
                for n in range(processes)]
    for c in children:
        c.start()
    nxt = 0  # the next task to hand out
    sent, held = set(), {}  # tasks handed out and not back; pid -> the task it holds

    def hand_next() -> None:
        nonlocal nxt
        while nxt < count:
            k, nxt = nxt, nxt + 1
            item = hand(k)
            if item is not None:
                tasks.put(item)
                sent.add(k)
                return

    stop: BaseException | None = None
    clean = False
    try:
        for _ in children:  # one task in hand per child
            hand_next()
        while sent:
            if stop is None and hooks.cancelled():
                stop = Cancelled("cancelled")
                cancelled.set()
            try:
                kind, a, b = results.get(timeout=0.5)
            except queues.Empty:
                for c in children:  # none ends before it is told to (``None``)
                    if not c.is_alive():
                        if c.pid in held and lost is not None:
                            lost(held[c.pid], c.pid)
                        what = name(held[c.pid]) if c.pid in held else "a process restoring it"
                        raise FacemendError(f"{what}: the process restoring it stopped (exit code "
                                            f"{c.exitcode}; out of memory?)") from None
                continue
            if kind == "start":  # (pid, task)
                held[a] = b
            elif kind == "frames":  # (task, frames done)
                hooks.advance(b)
            else:  # "done": (task, its outcome)
                sent.discard(a)
                held = {pid: h for pid, h in held.items() if h != a}
                error = done(a, b)  # recorded whatever happened before: a cancel removes it
                stop = stop or error
                if stop is None:
                    hand_next()
                else:
                    cancelled.set()  # a video's other segments are of no use now
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


def _stop_error(name: str, text: str) -> BaseException:
    """The exception a child reported by class name: facemend's own kinds keep their exit codes."""
    from . import errors

    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, FacemendError):
        try:
            return cls(text)
        except TypeError:
            pass
    return FacemendError(text) if name != "Cancelled" else Cancelled(text)


def run_files(todo: list[tuple[Path, Path, os.stat_result | None]], opts: JobOptions, engine: Engine,
              hooks, result: JobResult, book, processes: int) -> None:
    """``todo`` (input, output, the input's stat) in ``processes`` child processes; each
    outcome goes into ``result`` and ``book`` (the manifest, or None) as ``run_folder`` records
    it in one process. Raises ``Cancelled`` after a cancel (the files in hand are finished
    first) and the error of a file that stops the job (``OutputUnwritable``)."""
    sink = engine.restorer.preview

    def hand(k: int):
        p, out, st = todo[k]
        try:
            hooks.check_file(p, out)  # a link in the folder may point elsewhere
        except FacemendError as e:
            _record(result, book, p, out, st, {"error": str(e), "seconds": 0.0})
            hooks.advance(1)
            return None
        return ("file", k, p, out)

    def done(k: int, got: dict):
        p, out, st = todo[k]
        if got["stop"] is not None:
            return _stop_error(*got["stop"])
        _record(result, book, p, out, st, got)
        if sink is not None:
            sink.pairs += got["pairs"][: max(0, sink.limit - len(sink.pairs))]
        hooks.advance(1)
        return None

    try:
        _serve(len(todo), processes, opts, sink.limit if sink is not None else 0, hooks, hand, done,
               lambda k: str(todo[k][0]), lambda k, pid: remove_left(todo[k][1], pid))
    finally:
        order = {str(p): k for k, (p, _, _) in enumerate(todo)}
        result.items.sort(key=lambda item: order.get(item["file"], -1))  # the folder's order


SEGMENT_LEAST = 20.0  # seconds: a shorter video runs in one process


def segment_ranges(vplan, processes: int) -> list[tuple[int, int]]:
    """Where a video run in ``processes`` processes is cut: about three segments a process (for
    balance, and so a cancel is not kept waiting), none shorter than ``SEGMENT_LEAST`` seconds
    (each decodes some context frames twice). One range: not worth cutting."""
    from fractions import Fraction

    from .media import split

    duration = float((vplan.pts[-1] - vplan.pts[0]) * Fraction(vplan.time_base)) if vplan.frames else 0.0
    return split(vplan, max(SEGMENT_LEAST, duration / (3 * processes)))


def run_segments(vplan, ranges: list[tuple[int, int]], dst: Path, opts: JobOptions, hooks,
                 result: JobResult, processes: int) -> None:
    """One video's ``ranges`` in ``processes`` child processes, joined into ``dst`` with the
    source's audio (``media.join``, as a queued job's parts are)."""
    from .job import add_join_notes
    from .media import join

    with work_dir(dst) as tmp:
        parts = [Path(tmp) / f"part{k}.mp4" for k in range(len(ranges))]
        plan_dict = vplan.to_dict()
        got_all: dict[int, dict] = {}

        def hand(k: int):
            return ("segment", k, plan_dict, *ranges[k], parts[k])

        def done(k: int, got: dict):
            if got["stop"] is not None:
                return _stop_error(*got["stop"])
            got_all[k] = got
            return None

        try:
            _serve(len(ranges), processes, opts, 0, hooks, hand, done,
                   lambda k: f"{vplan.path} (frames {ranges[k][0]} to {ranges[k][1] - 1})")
        except Cancelled:
            raise Cancelled(f"{vplan.path}: cancelled") from None
        except OutputUnwritable as e:  # the parts live in a temporary folder: name the output
            text = str(e)
            why = text[text.rfind(" ("):] if " (" in text else ""
            raise OutputUnwritable(f"{dst}: cannot write the output{why}") from None
        summary = join(parts, vplan, dst)
    for key in ("frames", "faces", "frames_with_faces"):
        setattr(result, key, getattr(result, key) + sum(g[key] for g in got_all.values()))
    add_join_notes(result, summary)


def _record(result: JobResult, book, p: Path, out: Path, st, got: dict) -> None:
    """One file's outcome from a child into the folder's result and manifest (``folder.record``)."""
    from .folder import record

    if got["error"] is None:
        for key in ("frames", "faces", "frames_with_faces"):
            setattr(result, key, getattr(result, key) + got[key])
        result.notes += got["notes"]
        result.items += got["items"]
    record(result, book, p, out, st, got["seconds"], got["error"])
