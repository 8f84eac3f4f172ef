"""A nightly archive at scale: a synthetic archive run queued on two real workers and embedded.

    python -m bench.archive [--files N] [--videos K] [--task identity] [--work DIR] [--redis URL]

Builds an archive of N photos (default 20,000: hard links to ``../shared/data/faces/utkface``,
copies where links are refused, in nested ``yyyy/mm/dd`` folders of at most 100 files; K short
videos from ``../shared/data/videos`` besides, default 0), then:

- queued: two worker processes (``cli.py worker``, one child each, all three queues) on the
  bench's own Redis database (default redis://127.0.0.1:6379/14, emptied first). The job is
  submitted as the schedule does (``--skip-existing``, records kept, chunks to the ``archive``
  queue): submit latency (``worker.jobs.submit`` in this process: it walks nothing; the rerun
  with nothing to do is submitted by ``cli.py submit``, a process of its own), files/s,
  the job's Redis memory (``MEMORY USAGE`` summed over its keys, the most seen while it ran
  and at the end); then reruns: nothing to do, after touching 10 inputs (must process exactly
  10), after a weights change (must process all);
- embedded: the same archive into another folder in this process (``pipeline.job.run_job``,
  in ``--jobs`` processes side by side): files/s, then the rerun with nothing to do.

Prints one JSON object. The task defaults to ``identity`` (no network: the figures are the
archive machinery's, not a model's). A weights change is simulated, as identity loads no
weights: the workers run with ``pipeline.weights.weights_files`` returning one file of the
bench's (``weights_python``), whose bytes the bench rewrites; the manifest then records
another sha256 and every file must be redone.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PER_FOLDER = 100


def build_archive(root: Path, files: int, *, depth: int = 3, videos: int = 0) -> Path:
    """``files`` photos under ``root`` in nested folders (``depth`` levels), hard links where
    the file system allows (copies otherwise), plus ``videos`` clips. Returns ``root``."""
    faces = sorted((DATA / "faces" / "utkface").iterdir())
    if not faces:
        raise SystemExit(f"{DATA / 'faces' / 'utkface'}: no photos to build an archive from")
    for i in range(files):
        leaf = i // PER_FOLDER
        parts = [f"{(leaf // 12 ** k) % 12 + 1:02d}" for k in range(depth - 1, 0, -1)] + [f"{leaf:04d}"]
        d = root.joinpath(*parts[-depth:]) if depth else root
        d.mkdir(parents=True, exist_ok=True)
        face = faces[i % len(faces)]
        dst = d / f"{i:06d}_{face.name}"
        try:
            os.link(face, dst)
        except OSError:
            shutil.copyfile(face, dst)
    clips = sorted((DATA / "videos").glob("*.mp4"))
    for k in range(videos):
        (root / "videos").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clips[k % len(clips)], root / "videos" / f"{k:03d}_{clips[k % len(clips)].name}")
    return root


def weights_python(path: Path, weights: Path) -> Path:
    """An executable that runs Python with ``pipeline.weights.weights_files`` returning
    ``[weights]`` for every task (then the script and arguments it is given): workers started
    with it record that file's sha256 as their weights, so rewriting it simulates new weights."""
    code = ("import runpy, sys; from pathlib import Path; sys.path.insert(0, {root!r}); "
            "from pipeline import weights; weights.weights_files = lambda task: [Path({w!r})]; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
            ).format(root=str(ROOT), w=str(weights))
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} \"$@\"\n")
    path.chmod(0o755)
    return path


def job_memory(r, job_id: str, prefix: str = "facemend") -> dict:
    """Bytes Redis uses for a job's keys (``MEMORY USAGE`` of each, all samples)."""
    keys = list(r.scan_iter(f"{prefix}:job:{job_id}*"))
    used = sum(r.memory_usage(k, samples=0) or 0 for k in keys)
    return {"keys": len(keys), "bytes": used}


def start_workers(n: int, python: Path, env: dict, logs: Path) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        log = open(logs / f"w{i + 1}.log", "w")
        procs.append(subprocess.Popen([str(python), str(ROOT / "cli.py"), "worker", "-n", f"w{i + 1}@%h", "-c", "1"],
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    deadline = time.monotonic() + 180
    for i, p in enumerate(procs):
        while "models loaded" not in (logs / f"w{i + 1}.log").read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker w{i + 1} did not start:\n" + (logs / f"w{i + 1}.log").read_text()[-2000:])
            time.sleep(0.3)
    return procs


def queued_run(store, settings, src: Path, opts, r, *, cli_env: dict | None = None) -> dict:
    """Submit as the schedule does (``cli_env``: with ``cli.py submit`` in a process of its own,
    whose whole run is the latency); follow it; the figures of the run."""
    from worker.jobs import submit

    t0 = time.perf_counter()
    if cli_env is None:
        job = submit(src, opts, settings, queue=settings.archive_queue, records=True)
    else:
        p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", str(src), "--task", opts.task,
                            "--skip-existing", "-o", opts.output, "--queue", settings.archive_queue, "-q"],
                           capture_output=True, text=True, env=cli_env, cwd=ROOT, check=True)
        job = store.get(p.stdout.strip())
    latency = time.perf_counter() - t0
    peak = 0
    while True:
        peak = max(peak, job_memory(r, job.id)["bytes"])
        job = store.get(job.id)
        if job.terminal:
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    work = Path(job.output) / ".facemend" / "jobs" / job.id
    while work.exists() and time.perf_counter() - t0 < seconds + 30:  # the summary's clean-up
        time.sleep(0.1)
    s = job.summary
    if job.state != "DONE":
        raise SystemExit(f"job {job.id} {job.state}: {job.error}")
    out = {"state": job.state, "submit_seconds": round(latency, 3),
            "submitted_by": "worker.jobs.submit" if cli_env is None else "cli.py submit", "seconds": round(seconds, 2),
            "processed": s["processed"], "skipped": s["skipped"], "failed": s["failed"],
            "files_per_second": round((s["processed"] + s["skipped"]) / seconds, 1),
            "redis_bytes_peak": peak, "redis_bytes_end": job_memory(r, job.id)["bytes"],
            "parts": len(job.parts), "report": job.report}
    print(json.dumps(out), file=sys.stderr, flush=True)  # each run as it ends
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20000, help="photos in the archive (default 20000)")
    ap.add_argument("--videos", type=int, default=0, help="short videos besides (default 0)")
    ap.add_argument("--task", default="identity", help="task (default identity: no network)")
    ap.add_argument("--work", type=Path, help="folder for the archive and outputs (default: a temporary one)")
    ap.add_argument("--redis", default=os.environ.get("FACEMEND_BENCH_REDIS", "redis://127.0.0.1:6379/14"),
                    help="Redis database of the bench, emptied first (default redis://127.0.0.1:6379/14)")
    ap.add_argument("--skip-embedded", action="store_true", help="the queued runs only")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes of the embedded run (cli.py submit --jobs; default 1, as one worker child)")
    args = ap.parse_args(argv)
    if args.files < 10:
        ap.error("--files: at least 10 (10 inputs are touched)")
    sys.path.insert(0, str(ROOT))
    import redis

    from pipeline.job import Hooks, JobOptions, run_job
    from worker.app import configure
    from worker.jobs import connect
    from worker.settings import Settings

    work = args.work or Path(tempfile.mkdtemp(prefix="facemend-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "archive"
    t0 = time.perf_counter()
    if not src.exists():
        build_archive(src, args.files, videos=args.videos)
    out = {"files": args.files, "videos": args.videos, "task": args.task, "workers": 2,
           "build_seconds": round(time.perf_counter() - t0, 1), "archive": str(src)}
    r = redis.Redis.from_url(args.redis)
    r.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEMEND_")}
    env.update(FACEMEND_BROKER_URL=args.redis, FACEMEND_PRELOAD_TASKS=args.task, FACEMEND_TORCH_THREADS="1",
               PYTHONUNBUFFERED="1")
    weights = work / "weights.bin"
    weights.write_bytes(b"weights of the first night")
    (work / "logs").mkdir(exist_ok=True)
    procs = start_workers(2, weights_python(work / "python-w", weights), env, work / "logs")
    try:
        settings = Settings.from_env(env)
        configure(settings)
        store = connect(settings)
        opts = JobOptions(task=args.task, skip_existing=True, output=str(work / f"queued.{args.task}"))
        q = out["queued"] = queued_run(store, settings, src, opts, r)
        q["rerun_nothing_to_do"] = queued_run(store, settings, src, opts, r, cli_env=env)
        for p in sorted(src.rglob("*.jpg"))[:: max(1, args.files // 10)][:10]:
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        q["rerun_10_touched"] = queued_run(store, settings, src, opts, r)
        weights.write_bytes(b"weights of the second night")
        q["rerun_new_weights"] = queued_run(store, settings, src, opts, r)
        checks = {"touched_processed_exactly_10": q["rerun_10_touched"]["processed"] == 10,
                  "new_weights_processed_all": q["rerun_new_weights"]["processed"] == args.files + args.videos,
                  "nothing_to_do_processed_0": q["rerun_nothing_to_do"]["processed"] == 0}
        out["checks"] = checks
    finally:
        for p in procs:  # a warm shutdown: the worker's running task ends first
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its process group
            except ProcessLookupError:
                pass
        r.flushdb()
    if not args.skip_embedded:
        eopts = JobOptions(task=args.task, skip_existing=True, output=str(work / f"embedded.{args.task}"))
        e = out["embedded"] = {"processes": args.jobs}
        for name in ("first", "rerun_nothing_to_do"):
            t0 = time.perf_counter()
            res = run_job(src, JobOptions(**vars(eopts)), Hooks(), processes=args.jobs)
            sec = time.perf_counter() - t0
            e[name] = {"seconds": round(sec, 2), **res.files,
                       "files_per_second": round((res.files["processed"] + res.files["skipped"]) / sec, 1)}
    print(json.dumps(out, indent=2))
    return 0 if all(out.get("checks", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
