"""Where a job's results go, and the checks on its paths before any work.

``resolve_output`` names the output (``default_output``: beside the input, the task in its
name; ``mirrored_output``: a folder job's file under its output folder); ``check_paths`` refuses,
before a model is loaded, an input that cannot be read and an output that cannot be written
(or would replace something it should not). ``walk_folder`` and ``scan_folder`` say which files
of a folder a job covers and why the others are left.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from . import manifest
from .errors import (FacemendError, InputError, InputNotFound, OutputError, OutputExists, OutputUnwritable,
                     UnsupportedInput, output_error)
from .images import IMAGE_EXTENSIONS, is_image_path
from .media import is_video_path
from .morph import check_morph

if TYPE_CHECKING:
    from .job import JobOptions

log = logging.getLogger(__name__)

KEEP_VIDEO_EXT = {".mp4", ".mov", ".mkv", ".m4v"}


def default_output(src: Path, task: str) -> Path:
    if task == "morph":
        return src.with_name(f"{src.stem}.morph.mp4")
    if src.is_dir():
        return src.with_name(f"{src.name}.{task}")
    ext = src.suffix if (is_image_path(src) or src.suffix.lower() in KEEP_VIDEO_EXT) else ".mp4"
    return src.with_name(f"{src.stem}.{task}{ext}")


def resolve_output(src: Path, opts: JobOptions) -> Path:
    check_name_length(Path(src), InputNotFound)  # such a path cannot even be asked about
    return Path(opts.output) if opts.output else default_output(src, opts.task)


def check_name_length(path: Path, error: type[FacemendError]) -> None:
    """Raise ``error`` when a component of ``path`` is longer than a file name can be (255 bytes
    on Linux file systems; ``Path.exists`` raises instead of answering for such a path)."""
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > 255:
        raise error(f"{path}: file name too long ({longest} bytes, 255 at most)")


def check_paths(src: Path, dst: Path, opts: JobOptions) -> str:
    """Validate input and output before any work; returns the input kind."""
    try:
        return _check_paths(src, dst, opts)
    except FacemendError:  # InputNotFound and OutputExists are OSErrors too
        raise
    except OSError as e:  # a folder on the way that may not be searched (Path.exists raises)
        inputs = [src, *([Path(opts.to)] if opts.to else [])]
        bad = Path(e.filename) if e.filename else None
        if bad is not None and any(p == bad or p.is_relative_to(bad) for p in inputs):
            raise InputError(f"{bad}: cannot be read ({e.strerror or e})") from None
        raise output_error(dst, e) from None


def _check_paths(src: Path, dst: Path, opts: JobOptions) -> str:
    check_name_length(src, InputNotFound)
    check_name_length(dst, OutputUnwritable)
    for other, error in ((opts.to, InputNotFound), (opts.preview, OutputUnwritable)):
        if other:
            check_name_length(Path(other), error)
    if not src.exists():
        raise InputNotFound(f"{src}: no such file or folder")
    for path in (src, *([Path(opts.to)] if opts.to else [])):
        special = special_file(path)
        if special:  # opening a FIFO would wait for a writer forever
            raise UnsupportedInput(f"{path}: is {special}, not a file facemend can read")
    if src.resolve() == dst.resolve():
        raise OutputError(f"{dst}: the output path is the input; choose another --output")
    if opts.preview:
        sheet = Path(opts.preview)
        if not is_image_path(sheet):
            raise OutputError(f"{sheet}: --preview writes an image; give it a .png or .jpg name")
        if sheet.resolve() in (src.resolve(), dst.resolve()):
            raise OutputError(f"{sheet}: --preview would overwrite the input or the output")
        if sheet.is_dir():
            raise OutputError(f"{sheet}: --preview names a folder; give it a .png or .jpg file name")
        check_writable(sheet)
    if opts.task == "morph":
        other = check_morph(src, opts.to, dst)
        if other.resolve() == dst.resolve():
            raise OutputError(f"{dst}: the output path is the --to image; choose another --output")
        if dst.is_dir():
            raise OutputError(f"{dst}: is a folder; give --output a file name")
        if dst.exists() and not opts.overwrite and not (opts.skip_existing and is_fresh(src, dst)):
            raise OutputExists(f"{dst}: the output exists (use --overwrite to replace it)")
        check_writable(dst)
        return "image"
    if src.is_dir():
        if dst.resolve().is_relative_to(src.resolve()):
            raise OutputError(f"{dst}: the output folder is inside the input folder {src}")
        if not any(p is not None for p, _ in walk_folder(src, warn=False)):  # stops at the first
            raise InputError(f"{src}: the folder holds no images or videos")
        if dst.exists() and not dst.is_dir():
            raise OutputError(f"{dst}: exists and is not a folder")
        if dst.exists() and any(p.name != manifest.DIR_NAME for p in dst.iterdir()) and not (
                opts.overwrite or opts.skip_existing):
            raise OutputExists(f"{dst}: the output folder exists (use --overwrite or --skip-existing)")
        check_writable(dst, folder=True)
        return "folder"
    if is_video_path(src):
        kind = "video"
    elif is_image_path(src):
        kind = "image"
    else:
        raise UnsupportedInput(f"{src}: not a video or image file facemend knows (by its extension)")
    if dst.is_dir():
        raise OutputError(f"{dst}: is a folder; give --output a file name such as "
                          f"{dst / default_output(src, opts.task).name}")
    check_output_extension(src, dst, kind)
    if dst.exists() and not opts.overwrite and not (opts.skip_existing and is_fresh(src, dst)):
        raise OutputExists(f"{dst}: the output exists (use --overwrite to replace it)")
    check_writable(dst)
    return kind


def check_output_extension(src: Path, dst: Path, kind: str) -> None:
    """An image is written as an image and a video as a video, in a format facemend writes."""
    ext = dst.suffix.lower() or "no extension"
    if kind == "image" and not is_image_path(dst):
        raise OutputError(f"{dst}: an image is written as {_names(IMAGE_EXTENSIONS)}, not {ext}")
    if kind == "video" and ext not in KEEP_VIDEO_EXT:
        raise OutputError(f"{dst}: a video is written as {_names(KEEP_VIDEO_EXT)}, not {ext}")


def _names(exts) -> str:
    exts = sorted(exts)
    return ", ".join(exts[:-1]) + " or " + exts[-1]


def check_writable(path: Path, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: the nearest existing folder
    at or above it (``path`` itself for an existing output ``folder``) must be a writable folder,
    not a file."""
    start = path if folder else path.parent
    for p in (start, *start.parents):
        if p.is_symlink() and not p.exists():  # a link to nowhere: mkdir would fail on it
            raise OutputUnwritable(f"{path}: cannot write the output ({p} is a broken link)")
        if not p.exists():  # made when the job writes (or under a file, found further up)
            continue
        if not p.is_dir():
            raise OutputUnwritable(f"{path}: cannot write the output ({p} is a file, not a folder)")
        if not os.access(p, os.W_OK | os.X_OK):
            why = "read-only file system" if _read_only(p) else "permission denied"
            raise OutputUnwritable(f"{path}: cannot write the output ({p}: {why})")
        return


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def special_file(p: Path) -> str:
    """What ``p`` is when it is neither a regular file nor a folder (links followed): "a named
    pipe (FIFO)", "a socket", "a character device", "a block device"; "" otherwise."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return ""  # missing or a broken link: reported as such where it is opened
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return ""


def mirrored_output(p: Path, src: Path, dst: Path) -> Path:
    """Where a folder job writes the result for ``p`` (a file under ``src``)."""
    rel = p.relative_to(src)
    if is_video_path(p) and p.suffix.lower() not in KEEP_VIDEO_EXT:
        rel = rel.with_suffix(".mp4")
    return dst / rel


def is_fresh(src: Path, dst: Path) -> bool:
    """True when ``dst`` exists and is newer than ``src`` (skip-existing)."""
    try:
        return dst.stat().st_mtime >= src.stat().st_mtime
    except OSError:
        return False


def scan_folder(root: Path, *, warn: bool = True) -> tuple[list[Path], list[dict]]:
    """Media files under ``root`` (sorted, recursive) and the other files with a skip reason."""
    files, skipped = [], []
    for p, item in walk_folder(root, warn=warn):
        if p is not None:
            files.append(p)
        else:
            skipped.append(item)
    return files, skipped


def walk_folder(root: Path, *, warn: bool = True):
    """``scan_folder`` one file at a time, in the same order: ``(path, None)`` for a media file,
    ``(None, {"file", "reason"})`` for one skipped. A big folder's plan streams from it, and a
    folder's check stops at its first media file."""
    unread: list[dict] = []

    def unreadable(e: OSError) -> None:  # a subfolder that cannot be listed: said, not ignored
        unread.append({"file": str(e.filename), "reason": f"folder cannot be read ({e.strerror or e})"})
        if warn:
            log.warning("%s: skipped (%s)", e.filename, unread[-1]["reason"])

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        while unread:
            yield None, unread.pop(0)
        dirnames[:] = sorted(d for d in dirnames if d != manifest.DIR_NAME)  # a result folder's records
        for name in sorted(filenames):
            p = Path(dirpath) / name
            special = special_file(p)
            if special:
                yield None, {"file": str(p), "reason": f"{special}, not a regular file"}
            elif is_image_path(p) or is_video_path(p):
                yield p, None
            else:
                yield None, {"file": str(p), "reason": "not an image or video"}
    while unread:
        yield None, unread.pop(0)


def make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(out, e) from None
