"""A whole job in this process: a video, an image or a folder, from input path to output path.

This is the embedded default (no broker) and the building block the distributed worker reuses:
``resolve_output`` and ``check_paths`` decide and validate where results go, ``Engine`` holds a
loaded detector and model, and ``run_job`` does the rest with progress and cancel hooks.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import (Cancelled, FacemendError, ModelError, InputError, InputNotFound, OutputError, OutputExists,
                     OutputUnwritable, UnsupportedInput, output_error)
from . import manifest
from .faces import FaceDetector
from .images import IMAGE_EXTENSIONS, is_image_path, restore_image, small_note, too_small_for_faces
from .media import EncoderSettings, VideoPlan, encoder_available, is_video_path, join, plan
from .morph import check_morph, write_morph
from .restore import FaceRestorer, PreviewSink
from .video import process_range

log = logging.getLogger(__name__)

KEEP_VIDEO_EXT = {".mp4", ".mov", ".mkv", ".m4v"}


@dataclass
class JobOptions:
    """Everything a job needs to know besides its input; JSON-serialisable (``asdict``)."""

    task: str = "identity"
    output: str | None = None
    overwrite: bool = False
    skip_existing: bool = False
    device: str = "auto"
    codec: str = "libx264"
    crf: int = 18
    preset: str = "medium"
    min_face: int = 40
    detect_side: int = 960
    detect_every: int = 3  # video: see process_range; bench/detect_quality.py measures it
    batch_size: int = 16
    colour_match: bool = True
    fast: bool = False  # one network pass per face: no mirror or zoom self-ensembles (TaskSpec)
    preview: str | None = None
    # FaceMath tasks (age, gender, morph)
    amount: float | None = None  # age: years (+ older, - younger); gender: + female, - male
    sharpen: bool = False  # unsharp-mask the VAE decoder's output
    to: str | None = None  # morph: the second face's image
    frames: int = 48  # morph: frames in the output
    fps: float = 24.0  # morph: frame rate of the output

    @classmethod
    def from_dict(cls, options: dict) -> "JobOptions":
        """The options of a job record (``asdict`` of one). A record written by a newer facemend
        can hold options this one does not know (a worker left un-upgraded while the CLI was
        upgraded): FacemendError names them, so the job FAILS with that reason rather than a
        TypeError, and is never run without an option it was submitted with."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise FacemendError(f"job option(s) {', '.join(unknown)} unknown to this worker's"
                                " facemend (older than the submitter's): upgrade the worker")
        return cls(**options)

    def encoder(self, *, joinable: bool = False) -> EncoderSettings:
        codec = self.codec
        if not encoder_available(codec):
            raise OutputError(f"encoder {codec!r} is not available in this FFmpeg build")
        return EncoderSettings(codec=codec, crf=self.crf, preset=self.preset,
                               bframes=0 if joinable else None)


@dataclass
class Hooks:
    """Callbacks a job reports through. total(n, unit) once, advance(n) as work is done."""

    total: Callable[[int, str], None] = lambda n, unit: None
    advance: Callable[[int], None] = lambda n: None
    cancelled: Callable[[], bool] = lambda: False
    # check_file(src, dst) before the job and before each file of a folder: raises a
    # FacemendError to refuse it (FACEMEND_STORAGE_ROOTS in the embedded mode)
    check_file: Callable[[Path, Path], None] = lambda src, dst: None


@dataclass
class JobResult:
    input: str
    output: str
    kind: str  # video | image | folder
    task: str
    frames: int = 0  # video frames or image files processed
    faces: int = 0
    frames_with_faces: int = 0
    seconds: float = 0.0
    files: dict = field(default_factory=lambda: {"processed": 0, "skipped": 0, "failed": 0})
    items: list = field(default_factory=list)  # folder jobs: [{"file", "output", "faces"}]
    failures: list = field(default_factory=list)  # [{"file": ..., "error": ...}]
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    report: str | None = None  # folder jobs: OUTPUT/.facemend/report.json

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["report"] is None:
            del d["report"]
        return d


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


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Engine:
    """A loaded detector and restoration model, reused across the files of a job."""

    def __init__(self, opts: JobOptions, *, model=None) -> None:
        import models

        self.opts = opts
        self.device = pick_device(opts.device)
        if model is None:
            try:
                # the inference engine is the machine's choice: FACEMEND_ENGINE (models.export);
                # on CUDA torch runs the network in fp16, as the restorer feeds it
                model = models.load(opts.task, self.device, amount=opts.amount, sharpen=opts.sharpen,
                                    half=self.device.startswith("cuda"))
            except (FileNotFoundError, OSError, ValueError) as e:
                raise ModelError(f"task {opts.task!r}: {e}") from None
        self.model = model
        self.preview = PreviewSink() if opts.preview else None
        self.restorer = FaceRestorer(self.model, device=self.device, batch_size=opts.batch_size,
                                     colour_match=opts.colour_match, preview=self.preview,
                                     ensemble=not opts.fast,
                                     half=self.device.startswith("cuda"))
        # a task that paints over a covered lower face (unmask) must first find such faces
        self.detector = FaceDetector(device=self.device, min_face=opts.min_face, max_side=opts.detect_side,
                                     **(FaceDetector.MASKED if self.restorer.replaces else {}))


def run_job(src: str | Path, opts: JobOptions, hooks: Hooks | None = None, *, engine: Engine | None = None,
            records: bool | None = None) -> JobResult:
    """Process ``src`` as ``opts`` says. Raises a FacemendError subclass on bad input/output.
    ``records``: a folder job keeps its manifest and report even without ``skip_existing``
    (``keeps_records``)."""
    src = Path(src)
    hooks = hooks or Hooks()
    dst = resolve_output(src, opts)
    hooks.check_file(src, dst)
    kind = check_paths(src, dst, opts)
    t0 = time.perf_counter()
    result = JobResult(str(src), str(dst), "morph" if opts.task == "morph" else kind, opts.task)
    if kind != "folder" and opts.skip_existing and is_fresh(src, dst):
        result.files["skipped"] = 1
        result.skipped.append({"file": str(src), "reason": "output is newer than input"})
        log.info("%s: skipped (output %s is newer)", src, dst)
    elif kind == "video":
        opts.encoder()  # an encoder missing from this FFmpeg build: refused before any work
        vplan = plan(src)  # validate before loading models
        engine = engine or Engine(opts)
        hooks.total(vplan.frames, "frames")
        run_video(vplan, dst, opts, engine, hooks, result)
    elif kind == "image":
        engine = engine or Engine(opts)
        hooks.total(1, "files")
        process_file(src, dst, opts, engine, result)
        result.items = []
        result.files["processed"] = 1
        hooks.advance(1)
    else:
        engine = engine or Engine(opts)
        run_folder_reported(src, dst, opts, engine, hooks, result, records=records)
    if opts.preview and engine is not None and engine.preview is not None:
        from .preview import write_preview

        write_preview(Path(opts.preview), engine.preview.pairs)
    result.seconds = time.perf_counter() - t0
    return result


def run_video(vplan: VideoPlan, dst: Path, opts: JobOptions, engine: Engine, hooks: Hooks,
              result: JobResult) -> None:
    if (vplan.width, vplan.height) != (vplan.out_width, vplan.out_height):
        note = (f"{vplan.path}: odd frame size {vplan.width}x{vplan.height} padded to "
                f"{vplan.out_width}x{vplan.out_height} for yuv420p")
        log.warning(note)
        result.notes.append(note)
    if too_small_for_faces(engine.detector, vplan.width, vplan.height):
        note = small_note(vplan.path, vplan.width, vplan.height, engine.detector)
        log.warning(note)
        result.notes.append(note)
    make_parent(dst)
    engine.restorer.reset()  # a FaceMath edit's per-track state belongs to one video
    try:
        work = tempfile.TemporaryDirectory(prefix=".facemend-", dir=dst.parent)
    except OSError as e:
        raise output_error(dst, e) from None
    with work as tmp:
        part = Path(tmp) / "part0.mp4"
        try:
            stats = process_range(vplan, part, detector=engine.detector, restorer=engine.restorer,
                                  settings=opts.encoder(), detect_every=opts.detect_every,
                                  progress=hooks.advance,
                                  should_cancel=hooks.cancelled)
        except OutputUnwritable as e:  # the part lives in a temporary folder: name the output
            raise OutputUnwritable(f"{dst}: cannot write the output ({e.reason})") from None
        summary = join([part], vplan, dst)
    result.frames += stats.frames
    result.faces += stats.faces
    result.frames_with_faces += stats.frames_with_faces
    result.notes += [f"dropped {d}" for d in summary["dropped_streams"]]
    result.notes += [f"re-encoded {d}" for d in summary["reencoded_streams"]]


def keeps_records(dst: Path, opts: JobOptions, records: bool | None = None) -> bool:
    """Whether a folder job into ``dst`` keeps ``dst/.facemend`` (manifest and report): when
    asked (``records``, the CLI's ``--manifest``), with ``--skip-existing`` (the nightly rerun
    the manifest is for), and always once ``dst`` has a manifest (a run that did not record
    could leave a record that no longer matches the output)."""
    return bool(records or opts.skip_existing or manifest.manifest_files(manifest.manifest_dir(dst)))


def run_folder_reported(src: Path, dst: Path, opts: JobOptions, engine: Engine, hooks: Hooks,
                        result: JobResult, *, records: bool | None = None) -> None:
    """``run_folder``; where the folder keeps records (``keeps_records``) with its manifest,
    then the morning report (``pipeline.report``) however the job ended: done, some files
    failed, stopped by an error, interrupted, or cancelled (a cancelled job that made its
    output folder leaves nothing, report included). A report that cannot be written is a
    warning; it never hides the job's own outcome."""
    if not keeps_records(dst, opts, records):
        run_folder(src, dst, opts, engine, hooks, result)
        return
    from .report import SAMPLES, build_report, write_report

    existed = dst.is_dir()
    restorer = engine.restorer
    sink, own_sink = restorer.preview, False
    if sink is None and not getattr(restorer, "identity", False):  # identity skips the faces' work
        sink = restorer.preview = PreviewSink(limit=SAMPLES)
        own_sink = True
    started = time.time()
    status, error = "interrupted", None
    try:
        with manifest.Manifest(src, dst, opts, lock=True) as book:
            run_folder(src, dst, opts, engine, hooks, result, book=book)
        status = "partly failed" if result.failures else "done"
    except (Cancelled, manifest.FolderBusy) as e:
        status = "cancelled" if isinstance(e, Cancelled) else "busy"
        raise
    except FacemendError as e:
        status, error = "stopped", str(e)
        raise
    except Exception as e:
        status, error = "stopped", unexpected(src, e)
        raise
    finally:
        if own_sink:
            restorer.preview = None
        if dst.is_dir() and status != "busy" and (existed or status != "cancelled"):
            report = build_report(result, opts, status=status, started=started, ended=time.time(),
                                  error=error)
            try:
                result.report = str(write_report(dst, report, sink.pairs if sink else []))
            except OSError as e:
                log.warning("%s: the report cannot be written (%s)", manifest.manifest_dir(dst),
                            e.strerror or e)


def run_folder(src: Path, dst: Path, opts: JobOptions, engine: Engine, hooks: Hooks,
               result: JobResult, *, book: manifest.Manifest | None = None) -> None:
    """Each media file under ``src`` into its mirrored place under ``dst``. With a manifest
    (``book``), each file's outcome is recorded as soon as it is known and ``skip_existing``
    asks the manifest which files are already done; without one, a file is skipped when its
    output is newer than it."""
    files, skipped = scan_folder(src)
    for item in skipped:
        log.info("%s: skipped (%s)", item["file"], item["reason"])
    result.skipped += skipped
    hooks.total(len(files), "files")
    existed = book is not None and book.existed
    for p in files:
        if hooks.cancelled():
            written = [Path(item["output"]) for item in result.items]
            if book is not None:
                for item in result.items:
                    book.record(Path(item["file"]), Path(item["output"]), manifest.REMOVED,
                                error="the job was cancelled")
                book.close()
                if not existed:  # no records before this run: take them back with the files
                    shutil.rmtree(manifest.manifest_dir(dst), ignore_errors=True)
            remove_written(written, dst)
            raise Cancelled(f"{src}: cancelled after {result.files['processed']} files "
                            "(the files it wrote are removed)")
        out = mirrored_output(p, src, dst)
        if opts.skip_existing:
            if book is not None:
                skip, why = book.decide(p, out)
            else:
                skip, why = out.exists() and is_fresh(p, out), manifest.FRESH_REASON
            if skip:
                if book is not None and why == manifest.FRESH_REASON:  # no record yet: adopted
                    book.record(p, out, manifest.DONE, adopted=True)
                result.files["skipped"] += 1
                result.skipped.append({"file": str(p), "reason": why})
                log.debug("%s: skipped (%s)", p, why)
                hooks.advance(1)
                continue
            log.debug("%s: processing (%s)", p, why)
        try:
            st = os.stat(p)
        except OSError:
            st = None
        t0 = time.perf_counter()
        try:
            hooks.check_file(p, out)  # a link in the folder may point elsewhere
            process_file(p, out, opts, engine, result)
            result.files["processed"] += 1
        except (OutputUnwritable, Cancelled):  # every file after it would fail the same way
            raise
        except Exception as e:  # one bad file: recorded, and the job goes on with the next
            error = str(e) if isinstance(e, FacemendError) else unexpected(p, e)
            if not isinstance(e, FacemendError):
                log.debug("%s", p, exc_info=True)
            result.files["failed"] += 1
            result.failures.append({"file": str(p), "error": error})
            log.info("%s", error)
            if book is not None:
                book.record(p, out, manifest.FAILED, error=error, stat=st,
                            seconds=time.perf_counter() - t0)
        else:
            if book is not None:
                book.record(p, out, manifest.DONE, faces=result.items[-1]["faces"], stat=st,
                            seconds=time.perf_counter() - t0)
        hooks.advance(1)


def remove_written(outputs: list[Path], top: Path | None) -> None:
    """Remove the files a cancelled job wrote, then the folders under (and including) a folder
    job's output folder ``top`` that this leaves empty; a folder still holding other files stays
    (``top`` None: no folder is removed)."""
    dirs = {top} if top is not None else set()
    for out in outputs:
        try:
            out.unlink(missing_ok=True)
        except OSError as e:
            log.warning("%s: cannot remove (%s)", out, e.strerror or e)
        d = out.parent
        while top is not None and d != top and d.is_relative_to(top):
            dirs.add(d)
            d = d.parent
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:  # not empty, or already gone
            pass


def unexpected(p: Path, e: BaseException) -> str:
    """One line for an error no check foresaw, naming the file it happened on."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{p}: cannot be processed ({type(e).__name__}{': ' + text if text else ''})"


def make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(out, e) from None


def process_file(p: Path, out: Path, opts: JobOptions, engine: Engine, result: JobResult) -> None:
    """One file of a folder job into ``out`` (parent folders created)."""
    make_parent(out)
    if opts.task == "morph":
        m = write_morph(p, Path(opts.to), out, detector=engine.detector, fm=engine.model.fm,
                        frames=opts.frames, fps=opts.fps, crisp=opts.sharpen, crf=opts.crf)
        result.frames += m.frames
        result.faces += 2
        result.frames_with_faces += m.frames
        faces = 2
    elif is_image_path(p):
        r = restore_image(p, out, detector=engine.detector, restorer=engine.restorer)
        result.frames += 1
        result.faces += r.faces
        result.frames_with_faces += int(r.faces > 0)
        result.notes += r.notes
        faces = r.faces
    else:
        before = result.faces
        run_video(plan(p), out, opts, engine, Hooks(), result)
        faces = result.faces - before
    result.items.append({"file": str(p), "output": str(out), "faces": faces})
