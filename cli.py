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
from pipeline.progress import ProgressBar
from worker.commands import add_job_commands, get_settings, positive, submit_queued  # light: no Celery

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
    p.add_argument("--deinterlace", choices=["auto", "all", "off"], default="auto",
                   help="video: auto (default) deinterlaces the frames flagged interlaced; all every frame "
                        "(a source whose flags were lost; unflagged frames taken as top field first); off none")
    p.add_argument("--batch-size", type=int, default=16, help="faces per network batch (default 16)")
    p.add_argument("--jobs", type=positive, default=None, metavar="N",
                   help="a job run in this process: N processes side by side, on a folder's files or a"
                        " long video's segments (default: one per 4 CPU cores, 1 to 4)")
    p.add_argument("--fast", action="store_true",
                   help="one network pass per face: skip the task's self-ensembles (unmask: its"
                        " mirror and three zooms, its jobs about 2.5x as fast on CPU, 0.4 dB lower;"
                        " enhance: its mirror, 0.2-0.4 dB lower)")
    p.add_argument("--strength", type=_strength, default=1.0, metavar="S",
                   help="denoise, enhance, restore: apply this fraction of the network's change, 0 < S <= 1"
                        " (default 1; lower keeps more of the input's own skin texture and grain)")
    p.add_argument("--no-colour-match", dest="colour_match", action="store_false",
                   help="do not match restored faces' mean colour to the original")
    p.add_argument("--no-grain", dest="grain", action="store_false",
                   help="unmask: do not give the painted area the grain of the skin around it")
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


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="facemend: %(message)s", stream=sys.stderr)


def check_engine_settings() -> None:
    """FACEMEND_ENGINE and FACEMEND_OPENVINO_PRECISION for a job run here: a bad value is a bad
    setting (exit 2) before any work, not a model that failed to load."""
    from models.export import openvino_precision, requested
    from worker.errors import SettingsError

    try:
        requested()
    except ValueError as e:
        raise SettingsError(f"FACEMEND_ENGINE: {e}") from None
    try:
        openvino_precision()
    except ValueError as e:  # its message names the variable
        raise SettingsError(str(e)) from None


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.job import Hooks, JobOptions, run_job

    if args.engine:  # the embedded run's engine (models.export reads it)
        os.environ["FACEMEND_ENGINE"] = args.engine

    opts = JobOptions(
        task=args.task, output=str(args.output) if args.output else None, overwrite=args.overwrite,
        skip_existing=args.skip_existing, device=args.device, codec=args.codec, crf=args.crf,
        preset=args.preset, min_face=args.min_face, batch_size=args.batch_size,
        detect_every=args.detect_every, deinterlace=args.deinterlace, strength=args.strength,
        colour_match=args.colour_match, grain=args.grain, fast=args.fast, preview=str(args.preview) if args.preview else None,
        amount=args.amount, sharpen=args.sharpen, to=str(args.to) if args.to else None,
        frames=args.frames, fps=args.fps,
    )
    check_facemath_args(args)
    settings = get_settings(args, segment_seconds=args.segment_seconds)
    if settings.queued:
        if args.jobs is not None:
            from pipeline.errors import InputError

            raise InputError("--jobs is for a job run in this process; a queued job runs in the"
                             " workers' pools (cli.py worker -c)")
        return submit_queued(args, opts, settings)
    check_engine_settings()
    threads = os.environ.get("FACEMEND_TORCH_THREADS", "")
    if threads.strip() not in ("", "0"):  # as the worker does; 1 is faster on a crowded CPU
        import torch  # the embedded run only: a queued submit runs no network (torch: ~1.5 s)

        torch.set_num_threads(int(threads))
    hooks = Hooks()
    if settings.storage_roots:  # embedded, as a worker does: every file opened or written
        from worker.storage import check_options, check_roots

        check_options(opts, Path(), settings)
        hooks.check_file = lambda src, dst: check_roots(src, dst, settings)
    bar = ProgressBar(enabled=not (args.quiet or args.json) and sys.stderr.isatty())
    hooks.total, hooks.advance = bar.total, bar.advance
    try:
        from pipeline.parallel import default_processes

        result = run_job(args.input, opts, hooks, records=args.manifest or None,
                         processes=args.jobs or default_processes())
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
    if args.strength != 1.0:
        from models.tasks import resolve

        spec = resolve(args.task)
        if not spec.native or spec.latent or spec.weights is None:
            raise InputError(f"--strength is for --task denoise, enhance or restore (the task is {args.task})")


def _strength(text: str) -> float:
    """``--strength``: a number more than 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: choose more than 0 and at most 1")
    return value


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
