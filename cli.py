#!/usr/bin/env python3
"""facemend command line: restore faces in videos, images and folders.

The same program runs as ``python cli.py ...`` and as the ``facemend`` console script.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_CODES = """\
exit codes:
  0  done
  1  unexpected failure (a bug: please report it with the log)
  2  input not found
  3  bad input: not a video/image, corrupt or truncated, no video stream, empty folder
  4  output problem: exists (use --overwrite), equals the input, cannot be written
  5  cancelled
  6  folder job finished but some files failed (listed on stderr)
  130 interrupted (Ctrl-C); no partial file is left at the output path
"""

EXAMPLES = """\
examples:
  facemend submit clip.mp4 --task denoise               # writes clip.denoise.mp4
  facemend submit photos/ --task enhance --skip-existing  # mirrors into photos.enhance/
  facemend submit face.jpg --task unmask --output out.jpg --preview sheet.png
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
                   help="folders: skip files whose output is newer than the input")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--codec", default="libx264", help="video encoder: libx264 (default), h264_nvenc, libx265")
    p.add_argument("--crf", type=int, default=18, help="video quality, lower is better (default 18)")
    p.add_argument("--preset", default="medium", help="encoder speed preset (default medium)")
    p.add_argument("--min-face", type=int, default=40, help="smallest face to restore, in pixels (default 40)")
    p.add_argument("--batch-size", type=int, default=16, help="faces per network batch (default 16)")
    p.add_argument("--no-colour-match", dest="colour_match", action="store_false",
                   help="do not match restored faces' mean colour to the original")
    p.add_argument("--preview", type=Path, metavar="PATH.png",
                   help="write a before/after sheet of up to 16 face crops")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_submit)
    return parser


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

    opts = JobOptions(
        task=args.task, output=str(args.output) if args.output else None, overwrite=args.overwrite,
        skip_existing=args.skip_existing, device=args.device, codec=args.codec, crf=args.crf,
        preset=args.preset, min_face=args.min_face, batch_size=args.batch_size,
        colour_match=args.colour_match, preview=str(args.preview) if args.preview else None,
    )
    bar = ProgressBar(enabled=not (args.quiet or args.json) and sys.stderr.isatty())
    try:
        result = run_job(args.input, opts, Hooks(total=bar.total, advance=bar.advance))
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        per = f", {result.faces / max(result.frames, 1):.2f} faces/frame" if result.kind == "video" else ""
        unit = "frames" if result.kind == "video" else "files"
        print(f"{result.output}: {result.frames} {unit}, {result.faces} faces{per}, "
              f"{result.seconds:.1f} s")
        for item in result.failures:
            print(f"failed: {item['error']}", file=sys.stderr)
    return 6 if result.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = make_argument_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from pipeline.errors import FacemendError

    try:
        return args.func(args)
    except FacemendError as e:
        print(f"facemend: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("facemend: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
