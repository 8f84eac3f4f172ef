#!/usr/bin/env python3
"""facemend command line: restore faces in videos, images and folders.

The same program runs as ``python cli.py ...`` and as the ``facemend`` console script.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import exit_codes_text  # light: no media or torch

EXIT_CODES = exit_codes_text()

EXAMPLES = """\
examples:
  facemend submit clip.mp4 --task denoise               # writes clip.denoise.mp4
  facemend submit photos/ --task enhance --skip-existing  # mirrors into photos.enhance/
  facemend submit face.jpg --task unmask --output out.jpg --preview sheet.png
  facemend submit clip.mp4 --task age --amount +30      # FaceMath: every face 30 years older
  facemend submit a.jpg --task morph --to b.jpg --frames 48 --output morph.gif
  facemend generate --count 16 --output grid.png        # random faces from the VAE's prior
  FACEMEND_BROKER_URL=redis://127.0.0.1:6379/0 facemend worker --queues gpu,cpu --device cuda:0
  facemend submit clip.mp4 --task denoise --broker redis://127.0.0.1:6379/0 --wait
  facemend status JOB_ID --json; facemend list --state RUNNING; facemend cancel JOB_ID
"""

log = logging.getLogger("facemend")


def make_argument_parser() -> argparse.ArgumentParser:
    from models.tasks import task_names

    parser = argparse.ArgumentParser(
        prog="facemend", description="Restore faces in videos, images and image folders.",
        epilog=EXAMPLES + "\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar, errors only")
    common.add_argument("--broker", metavar="URL",
                        help="redis:// or rediss:// URL of the job queue (default: $FACEMEND_BROKER_URL; "
                             "none: submit runs the job in this process)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="restore faces in a video, an image or a folder", parents=[common],
                       epilog=EXAMPLES + "\n" + EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="video file, image file or folder")
    p.add_argument("--task", default="denoise", choices=task_names(),
                   help="what to restore (default: denoise; identity changes nothing)")
    p.add_argument("-o", "--output", type=Path,
                   help="output path (default: INPUT.TASK.ext beside the input; INPUT.TASK/ for a folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--skip-existing", action="store_true",
                   help="folders: skip files already done with the same input, options and weights "
                        "(OUTPUT/.facemend/manifest.jsonl; without a record of a file: its output is "
                        "newer than it); a single file: its output is newer than it")
    p.add_argument("--manifest", action="store_true",
                   help="folders: keep OUTPUT/.facemend/ (the manifest of what was done and a report) "
                        "without --skip-existing too (with it, or once the folder has a manifest, always)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "openvino"],
                   help="inference engine of the networks (default: $FACEMEND_ENGINE or auto: on CPU the "
                        "fastest installed, on CUDA torch fp16); queued jobs: the worker's FACEMEND_ENGINE")
    p.add_argument("--codec", default="libx264", help="video encoder: libx264 (default), h264_nvenc, libx265")
    p.add_argument("--crf", type=int, default=18, help="video quality, lower is better (default 18)")
    p.add_argument("--preset", default="medium", help="encoder speed preset (default medium)")
    p.add_argument("--min-face", type=int, default=40, help="smallest face to restore, in pixels (default 40)")
    p.add_argument("--detect-every", type=int, default=3, metavar="K",
                   help="video: detect faces on every K-th frame (and on the frames between two whose "
                        "faces differ), track in between (1-6, default 3)")
    p.add_argument("--batch-size", type=int, default=16, help="faces per network batch (default 16)")
    p.add_argument("--fast", action="store_true",
                   help="one network pass per face: skip the task's self-ensembles (unmask: its"
                        " mirror and three zooms; its jobs about 2.5x as fast on CPU, 0.4 dB lower)")
    p.add_argument("--no-colour-match", dest="colour_match", action="store_false",
                   help="do not match restored faces' mean colour to the original")
    p.add_argument("--preview", type=Path, metavar="PATH.png",
                   help="write a before/after sheet of up to 16 face crops")
    fm = p.add_argument_group("FaceMath tasks (age, gender, morph)")
    fm.add_argument("--amount", type=float, metavar="X",
                    help="age: years to add (+30) or remove (-20), default +30; "
                         "gender: +1.0 toward female-typical features, -1.0 toward male, default +1.0")
    fm.add_argument("--to", type=Path, metavar="IMAGE", help="morph: the face to morph into")
    fm.add_argument("--frames", type=int, default=48, help="morph: number of frames (default 48)")
    fm.add_argument("--fps", type=float, default=24.0, help="morph: frames per second (default 24)")
    fm.add_argument("--sharpen", action="store_true",
                    help="unsharp-mask the VAE decoder's output (crisper, noisier; default off)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--wait", action="store_true", help="queued: follow the job until it finishes")
    p.add_argument("--queue", metavar="NAME",
                   help="queued: queue of the job's segments/chunks (default: $FACEMEND_GPU_QUEUE or gpu)")
    p.add_argument("--segment-seconds", type=float, metavar="S",
                   help="queued videos: segment length (default: $FACEMEND_SEGMENT_SECONDS or 30)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("generate", help="new random faces from FaceMath's VAE, as a grid image", parents=[common])
    p.add_argument("--count", type=int, default=16, help="number of faces (default 16)")
    p.add_argument("-o", "--output", type=Path, required=True, help="grid image to write (.png, .jpg)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0: same faces every run)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="spread of the codes drawn from the prior (default 0.8; 1.0 = the prior)")
    p.add_argument("--face-size", type=int, default=128, help="pixels per face in the grid (default 128)")
    p.add_argument("--columns", type=int, default=0, help="faces per row (default: a square-ish grid)")
    p.add_argument("--sharpen", action="store_true", help="unsharp-mask the decoder's output")
    p.add_argument("--prior", choices=["fitted", "standard"], default="fitted",
                   help="codes from a Gaussian fitted to real faces' codes (default) or from N(0, I)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=cmd_generate)
    add_job_commands(sub, common)
    return parser


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
                       parents=[common, js], epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 9)")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("cancel", help="stop a job: running segments stop, queued ones are revoked",
                       parents=[common, js])
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("worker", help="run a Celery worker (prefork, one process per GPU)", parents=[common])
    p.add_argument("--queues", default=None, help="queues to serve (default: gpu,cpu,archive)")
    p.add_argument("--device", help="device of this worker: cpu, cuda:0, ... (default: the job's)")
    p.add_argument("-n", "--hostname", help="node name (default: facemend-PID@%%h)")
    p.add_argument("-c", "--concurrency", type=int, default=1, help="pool processes (default 1: one per GPU)")
    p.set_defaults(func=cmd_worker)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="facemend: %(message)s", stream=sys.stderr)


class ProgressBar:
    """tqdm bar on stderr: frames (or files) done / total, rate, ETA."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def total(self, n: int, unit: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=n, unit=unit.rstrip("s"), dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.job import Hooks, JobOptions, run_job

    threads = os.environ.get("FACEMEND_TORCH_THREADS", "")
    if threads.strip() not in ("", "0"):  # as the worker does; 1 is faster on a crowded CPU
        import torch

        torch.set_num_threads(int(threads))
    if args.engine:  # the embedded run's engine (models.export reads it)
        os.environ["FACEMEND_ENGINE"] = args.engine

    opts = JobOptions(
        task=args.task, output=str(args.output) if args.output else None, overwrite=args.overwrite,
        skip_existing=args.skip_existing, device=args.device, codec=args.codec, crf=args.crf,
        preset=args.preset, min_face=args.min_face, batch_size=args.batch_size,
        detect_every=args.detect_every,
        colour_match=args.colour_match, fast=args.fast, preview=str(args.preview) if args.preview else None,
        amount=args.amount, sharpen=args.sharpen, to=str(args.to) if args.to else None,
        frames=args.frames, fps=args.fps,
    )
    check_facemath_args(args)
    settings = get_settings(args, segment_seconds=args.segment_seconds)
    if settings.queued:
        return submit_queued(args, opts, settings)
    hooks = Hooks()
    if settings.storage_roots:  # embedded, as a worker does: every file opened or written
        from worker.storage import check_options, check_roots

        check_options(opts, Path(), settings)
        hooks.check_file = lambda src, dst: check_roots(src, dst, settings)
    bar = ProgressBar(enabled=not (args.quiet or args.json) and sys.stderr.isatty())
    hooks.total, hooks.advance = bar.total, bar.advance
    try:
        result = run_job(args.input, opts, hooks, records=args.manifest or None)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        per = f", {result.faces / max(result.frames, 1):.2f} faces/frame" if result.kind == "video" else ""
        unit = "frames" if result.kind in ("video", "morph") else "files"
        count = result.files["processed"] if result.kind == "folder" else result.frames
        skipped = f", {result.files['skipped']} skipped" if result.kind == "folder" and result.files["skipped"] else ""
        report = f"; report {Path(result.report).with_suffix('.html')}" if result.report else ""
        print(f"{result.output}: {count} {unit}{skipped}, {result.faces} faces{per}, "
              f"{result.seconds:.1f} s{report}")
    for item in result.failures:  # on stderr with --json too: stdout stays one JSON object
        print(f"failed: {item['error']}", file=sys.stderr)
    return 6 if result.failures else 0


def check_facemath_args(args: argparse.Namespace) -> None:
    """Options that only mean something for some tasks: refuse them elsewhere (exit 3)."""
    from pipeline.errors import InputError

    if args.task != "morph" and args.to is not None:
        raise InputError(f"--to is for --task morph (the task is {args.task})")
    if args.task == "morph" and args.frames < 2:
        raise InputError(f"--frames {args.frames}: a morph needs at least 2 frames")
    if args.amount is not None and args.task not in ("age", "gender"):
        raise InputError(f"--amount is for --task age or gender (the task is {args.task})")
    if args.fps <= 0:
        raise InputError(f"--fps {args.fps}: must be positive")


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError, ModelError, OutputError, OutputExists, output_error
    from pipeline.generate import write_grid
    from pipeline.job import pick_device
    from pipeline.paths import check_name_length, check_writable

    if not 1 <= args.count <= 1024:
        raise InputError(f"--count {args.count}: choose 1 to 1024 faces")
    if not 16 <= args.face_size <= 1024:
        raise InputError(f"--face-size {args.face_size}: choose 16 to 1024 pixels")
    if args.output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise OutputError(f"{args.output}: the grid is written as .png, .jpg or .webp")
    check_name_length(args.output, OutputError)
    if args.output.is_dir():
        raise OutputError(f"{args.output}: is a folder; give --output a file name")
    if args.output.exists() and not args.overwrite:
        raise OutputExists(f"{args.output}: the output exists (use --overwrite to replace it)")
    check_writable(args.output)
    try:
        from models.facemath import FaceMath

        fm = FaceMath.load(pick_device(args.device))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ModelError(f"generate: {e}") from None
    try:
        n = write_grid(fm, args.output, count=args.count, seed=args.seed, temperature=args.temperature,
                       face_size=args.face_size, columns=args.columns, crisp=args.sharpen, prior=args.prior)
    except OSError as e:  # a full disk, no permission: one line
        raise output_error(args.output, e) from None
    print(f"{args.output}: {n} faces (seed {args.seed}, temperature {args.temperature:g})")
    return 0


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
    from worker.jobs import describe

    _, store = job_store(args)
    job = store.get(args.id)
    if args.json:
        print(json.dumps(job.to_dict()))
        return 0
    print(describe(job))
    for p in job.parts:
        kind = "segment" if job.kind == "video" else "chunk"
        print(f"  {kind} {p['index']}: {p['state']:<9} {p['start']}..{p['stop']}  done {p['done']}  "
              f"worker {p['worker'] or '-'}  attempts {p['attempts']}" + (f"  {p['error']}" if p["error"] else ""))
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
    from worker.app import app, configure

    settings = get_settings(args)  # again: now with FACEMEND_DEVICE
    queues = args.queues or f"{settings.gpu_queue},{settings.cpu_queue},{settings.archive_queue}"
    if not {settings.gpu_queue, settings.archive_queue} & set(queues.split(",")):  # plan/join only: no model
        settings = replace(settings, preload_tasks=())
    configure(settings)
    level = "WARNING" if args.quiet else ("INFO", "DEBUG")[min(args.verbose, 1)]
    app.worker_main(["worker", "-P", "prefork", "-c", str(args.concurrency), "-Q", queues,
                     "-n", args.hostname or f"facemend-{os.getpid()}@%h", "-l", level])
    return 0


class _TermAsInterrupt:
    """While a command runs, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main
    thread, so that a job unwinds as on Ctrl-C: its temporary files and folders are removed and
    nothing is left at the output path. A second SIGTERM during that clean-up is ignored. The
    worker keeps Celery's own SIGTERM handling (a warm shutdown)."""

    def __init__(self) -> None:
        self.previous = None
        self.fired = False

    def _handle(self, signum, frame) -> None:
        from pipeline.errors import Terminated

        if not self.fired:
            self.fired = True
            raise Terminated()

    def __enter__(self) -> "_TermAsInterrupt":
        import signal

        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def main(argv: list[str] | None = None) -> int:
    parser = make_argument_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from contextlib import nullcontext

    from pipeline.errors import FacemendError

    try:
        with nullcontext() if args.command == "worker" else _TermAsInterrupt():
            return args.func(args)
    except FacemendError as e:
        print(f"facemend: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        code = getattr(e, "exit_code", 130)
        print("facemend: terminated (SIGTERM)" if code == 143 else "facemend: interrupted", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
