"""The command line's job commands: ``status``, ``list``, ``wait``, ``cancel`` and ``worker``, and
``submit`` when a broker is configured (the job is queued to the worker pool).

Importing this module imports nothing heavy: Celery and the job records load when a command runs.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.errors import exit_codes_text
from pipeline.progress import ProgressBar

# a queued job's parts listed one by one up to this many; beyond, counts by state and the parts not done
PARTS_LISTED = 20


def add_job_commands(sub, common: argparse.ArgumentParser) -> None:
    """status, list, wait, cancel and worker (the distributed mode; need a broker)."""
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("status", help="a queued job's state, progress and segments", parents=[common, js])
    p.add_argument("id", help="job id (printed by submit)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("list", help="recent jobs, newest first", parents=[common, js])
    p.add_argument("--state", type=str.upper, choices=["QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED"])
    p.add_argument("--limit", type=int, default=20, help="at most N jobs (default 20)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("wait", help="follow a job with a progress bar; exit code by outcome",
                       parents=[common, js], epilog=exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 9)")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("cancel", help="stop a job: running segments stop, queued ones are revoked",
                       parents=[common, js])
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("worker", help="run a Celery worker (prefork; one per GPU, its processes sharing it)",
                       parents=[common])
    p.add_argument("--queues", default=None, help="queues to serve (default: gpu,cpu,archive)")
    p.add_argument("--device", help="device of this worker: cpu, cuda:0, ... (default: the job's)")
    p.add_argument("-n", "--hostname", help="node name (default: facemend-PID@%%h)")
    p.add_argument("-c", "--concurrency", type=positive, default=None,
                   help="pool processes (default: one per 4 CPU cores, 1 to 4; the cores are shared out among them)")
    p.set_defaults(func=cmd_worker)


def positive(text: str) -> int:
    """An option's whole number of 1 or more (``-c``, ``--jobs``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: choose a whole number of 1 or more")
    return value


def pool_size(requested: int | None, cpus: int | None = None, device: str | None = None) -> int:
    """A worker's pool processes: as asked, else one per 4 CPU cores, 1 to 4
    (``pipeline.parallel.default_processes``, where the measurements are), and no more than
    nine tenths of its GPU's memory holds at 1.5 GB a process."""
    from pipeline.parallel import GPU_BYTES_PER_PROCESS, default_processes

    if requested is not None:
        return requested
    pool = default_processes(cpus)
    total = gpu_memory(device) if pool > 1 else None
    return pool if total is None else max(1, min(pool, int(0.9 * total // GPU_BYTES_PER_PROCESS)))


def gpu_memory(device: str | None) -> int | None:
    """The memory (bytes) of the GPU a worker for ``device`` (None: the job's, a GPU where there
    is one) runs on, as nvidia-smi tells it: the worker's parent must not start CUDA before its
    pool forks. None on a CPU device or where nvidia-smi cannot tell."""
    import os
    import shutil
    import subprocess

    if (device and not device.startswith("cuda")) or shutil.which("nvidia-smi") is None:
        return None
    index = device.split(":", 1)[1] if device and ":" in device else "0"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:  # cuda:N is the N-th visible GPU; nvidia-smi wants its own index or UUID
        if not index.isdigit() or int(index) >= len(visible):
            return None
        index = visible[int(index)]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              "-i", index], capture_output=True, text=True, timeout=20)
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def get_settings(args: argparse.Namespace, **overrides):
    from worker.settings import Settings

    return Settings.from_env(**overrides).with_broker(args.broker)


def job_store(args: argparse.Namespace):
    from worker.errors import SettingsError
    from worker.jobs import connect

    settings = get_settings(args)
    if not settings.queued:
        raise SettingsError(f"{args.command}: no broker configured (set FACEMEND_BROKER_URL or --broker)")
    return settings, connect(settings)


def submit_queued(args: argparse.Namespace, opts, settings) -> int:
    from worker.jobs import submit

    job = submit(args.input, opts, settings, queue=args.queue, records=args.manifest)
    if not args.wait:
        print(json.dumps(job.to_dict()) if args.json else job.id, flush=True)
        return 0
    if not args.json:
        print(job.id, flush=True)
    from worker.jobs import connect

    return follow_job(args, connect(settings), job.id)


def follow_job(args: argparse.Namespace, store, job_id: str, timeout: float | None = None) -> int:
    from worker.jobs import describe, exit_code, follow

    bar = ProgressBar(enabled=not (args.quiet or args.json) and sys.stderr.isatty())
    seen = {"total": 0, "done": 0}

    def update(job):
        if job.total and not seen["total"]:
            seen["total"] = job.total
            bar.total(job.total, job.unit)
        done = min(job.done, job.total)
        if done > seen["done"]:
            bar.advance(done - seen["done"])
            seen["done"] = done

    try:
        job = follow(store, job_id, on_update=update, timeout=timeout)
    except KeyboardInterrupt as e:
        bar.close()
        print(f"facemend: stopped following {job_id}; the job goes on "
              f"(facemend cancel {job_id} stops it)", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    finally:
        bar.close()
    print(json.dumps(job.to_dict()) if args.json else describe(job))
    for item in job.summary.get("failures", []):
        print(f"failed: {item['error']}", file=sys.stderr)
    if job.state == "FAILED" and job.error:  # as the embedded run reports it: one line on stderr
        print(f"facemend: error: {job.error.splitlines()[0]}", file=sys.stderr)
    return exit_code(job)


def cmd_status(args: argparse.Namespace) -> int:
    from worker.jobs import describe, watch

    _, store = job_store(args)
    job = store.get(args.id)
    if not job.terminal:  # as ``wait`` does: lost parts are sent again, a stalled job FAILS now
        try:
            for line in watch(store, args.id):
                print(f"facemend: watchdog: {line}", file=sys.stderr)
            job = store.get(args.id)
        except Exception as e:  # the check is a help; the record is still the answer
            print(f"facemend: watchdog check of {args.id} skipped: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(job.to_dict()))
        return 0
    print(describe(job))
    kind = "segment" if job.kind == "video" else "chunk"
    shown = job.parts
    if len(job.parts) > PARTS_LISTED:  # a long folder job: counts, then only what is not done
        counts: dict[str, int] = {}
        for p in job.parts:
            counts[p["state"]] = counts.get(p["state"], 0) + 1
        print(f"  {len(job.parts)} {kind}s: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        shown = [p for p in job.parts if p["state"] != "DONE"]
    for p in shown[:PARTS_LISTED]:
        print(f"  {kind} {p['index']}: {p['state']:<9} {p['start']}..{p['stop']}  done {p['done']}  "
              f"worker {p['worker'] or '-'}  attempts {p['attempts']}" + (f"  {p['error']}" if p["error"] else ""))
    if len(shown) > PARTS_LISTED:
        print(f"  ... and {len(shown) - PARTS_LISTED} more not done (status --json lists every {kind})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from worker.jobs import describe

    _, store = job_store(args)
    jobs = store.list(args.state, args.limit)
    if args.json:
        print(json.dumps([j.to_dict() for j in jobs]))
    else:
        for job in jobs:
            print(describe(job))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    _, store = job_store(args)
    return follow_job(args, store, args.id, timeout=args.timeout)


def cmd_cancel(args: argparse.Namespace) -> int:
    from worker.jobs import cancel, describe

    settings, store = job_store(args)
    job = cancel(store, settings, args.id)
    print(json.dumps(job.to_dict()) if args.json else describe(job))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import os
    from dataclasses import replace

    settings = get_settings(args)
    if not settings.queued:
        from worker.errors import SettingsError

        raise SettingsError("worker: no broker configured (set FACEMEND_BROKER_URL or --broker)")
    # the Celery app module reads the environment; pool children inherit it
    os.environ["FACEMEND_BROKER_URL"] = settings.broker_url
    if args.device:
        os.environ["FACEMEND_DEVICE"] = args.device
    pool = pool_size(args.concurrency, device=os.environ.get("FACEMEND_DEVICE"))
    if pool > 1 and not settings.torch_threads:  # the cores shared out among the pool's processes
        from pipeline.parallel import share_of_cores

        os.environ["FACEMEND_TORCH_THREADS"] = str(share_of_cores(pool))
    from worker.app import app, configure

    settings = get_settings(args)  # again: now with FACEMEND_DEVICE (and the threads)
    queues = args.queues or f"{settings.gpu_queue},{settings.cpu_queue},{settings.archive_queue}"
    if not {settings.gpu_queue, settings.archive_queue} & set(queues.split(",")):  # plan/join only: no model
        settings = replace(settings, preload_tasks=())
    configure(settings)
    level = "WARNING" if args.quiet else ("INFO", "DEBUG")[min(args.verbose, 1)]
    # without mingle and gossip: both talk to the other workers again at every reconnection, and
    # with them a Celery worker on Redis can come back from a broker restart connected but never
    # consuming again (celery#8030, #8091, #10205); facemend uses neither (cancels are flags in
    # the job record, revokes only a courtesy)
    app.worker_main(["worker", "-P", "prefork", "-c", str(pool), "-Q", queues,
                     "--without-mingle", "--without-gossip",
                     "-n", args.hostname or f"facemend-{os.getpid()}@%h", "-l", level])
    from worker.listening import deaf_stop

    if deaf_stop.is_set():  # it stopped taking messages (worker.listening): start afresh, same PID
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return 0
