"""A whole job in this process: a video, an image or a folder, from input path to output path.

This is the embedded default (no broker) and the building block the distributed worker reuses:
``pipeline.paths`` decides and validates where results go, ``Engine`` holds a loaded detector
and model, ``run_job`` does the rest with progress and cancel hooks (a folder's loop is in
``pipeline.folder``), and ``process_file`` restores one file of any kind.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import FacemendError, ModelError, OutputError, OutputUnwritable
from .faces import FaceDetector
from .images import is_image_path, restore_image, small_note, too_small_for_faces
from .media import DEINTERLACE_MODES, EncoderSettings, VideoPlan, encoder_available, join, plan
from .morph import write_morph
from .parallel import fit_in_memory, fit_on_device, work_dir  # light: no children until asked
from .paths import check_paths, is_fresh, make_parent, resolve_output
from .restore import FaceRestorer, PreviewSink
from .video import process_range

log = logging.getLogger(__name__)


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
    grain: bool = True  # unmask: grain matched to the skin around the painted area
    fast: bool = False  # one network pass per face: no mirror or zoom self-ensembles (TaskSpec)
    deinterlace: str = "auto"  # video: auto | all | off (``VideoPlan.deinterlaced``)
    strength: float = 1.0  # denoise, enhance, restore: the fraction of the network's change applied
    preview: str | None = None
    # FaceMath tasks (age, gender, morph)
    amount: float | None = None  # age: years (+ older, - younger); gender: + female, - male
    sharpen: bool = False  # unsharp-mask the VAE decoder's output
    to: str | None = None  # morph: the second face's image
    frames: int = 48  # morph: frames in the output
    fps: float = 24.0  # morph: frame rate of the output

    # options added after workers may already run: a record leaves them out at these defaults,
    # so a worker that predates one still runs the jobs that do not use it
    LATER = {"strength": 1.0}

    def record(self) -> dict:
        """The options as a job record holds them (``asdict``, less ``LATER`` at their default)."""
        return {k: v for k, v in asdict(self).items() if not (k in self.LATER and v == self.LATER[k])}

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

    def __post_init__(self) -> None:
        if not (isinstance(self.strength, (int, float)) and 0.0 < self.strength <= 1.0):
            raise FacemendError(f"strength must be more than 0 and at most 1, not {self.strength!r}")
        if self.deinterlace not in DEINTERLACE_MODES:
            raise FacemendError(f"deinterlace must be one of {', '.join(DEINTERLACE_MODES)}, "
                                f"not {self.deinterlace!r}")

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
                                     colour_match=opts.colour_match, grain=opts.grain,
                                     preview=self.preview,
                                     ensemble=not opts.fast, strength=opts.strength,
                                     half=self.device.startswith("cuda"))
        # a task that paints over a covered lower face (unmask) must first find such faces
        self.detector = FaceDetector(device=self.device, min_face=opts.min_face, max_side=opts.detect_side,
                                     **(FaceDetector.MASKED if self.restorer.replaces else {}))


def run_job(src: str | Path, opts: JobOptions, hooks: Hooks | None = None, *, engine: Engine | None = None,
            records: bool | None = None, processes: int = 1) -> JobResult:
    """Process ``src`` as ``opts`` says. Raises a FacemendError subclass on bad input/output.
    ``records``: a folder job keeps its manifest and report even without ``skip_existing``
    (``keeps_records``). ``processes``: child processes restoring side by side
    (``pipeline.parallel``): a folder's files, a long video's segments."""
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
        vplan = plan(src).deinterlaced(opts.deinterlace)  # validate before loading models
        engine = engine or Engine(opts)
        hooks.total(vplan.frames, "frames")
        processes = fit_in_memory(fit_on_device(processes, engine.device), vplan.width * vplan.height / 1e6)
        run_video(vplan, dst, opts, engine, hooks, result, processes)
    elif kind == "image":
        engine = engine or Engine(opts)
        hooks.total(1, "files")
        process_file(src, dst, opts, engine, result)
        result.items = []
        result.files["processed"] = 1
        hooks.advance(1)
    else:
        from .folder import run_folder_reported  # pipeline.folder builds on this module

        engine = engine or Engine(opts)
        run_folder_reported(src, dst, opts, engine, hooks, result, records=records,
                            processes=fit_in_memory(fit_on_device(processes, engine.device)))
    if opts.preview and engine is not None and engine.preview is not None:
        from .preview import write_preview

        write_preview(Path(opts.preview), engine.preview.pairs)
    result.seconds = time.perf_counter() - t0
    return result


def interlaced_note(vplan: VideoPlan) -> str:
    which = "every frame deinterlaced (--deinterlace all" if vplan.deinterlace_all else "deinterlaced (yadif"
    return f"{vplan.path}: interlaced; {which}, frame rate kept), the output is progressive"


def video_notes(vplan: VideoPlan, engine: Engine, result: JobResult) -> None:
    """What the result says about a video before it is restored: a padded odd size, an
    interlaced source, frames too small for the faces asked for."""
    if (vplan.width, vplan.height) != (vplan.out_width, vplan.out_height):
        note = (f"{vplan.path}: odd frame size {vplan.width}x{vplan.height} padded to "
                f"{vplan.out_width}x{vplan.out_height} for yuv420p")
        log.warning(note)
        result.notes.append(note)
    if vplan.interlaced:
        note = interlaced_note(vplan)
        log.warning(note)
        result.notes.append(note)
    if too_small_for_faces(engine.detector, vplan.width, vplan.height):
        note = small_note(vplan.path, vplan.width, vplan.height, engine.detector)
        log.warning(note)
        result.notes.append(note)


def run_video(vplan: VideoPlan, dst: Path, opts: JobOptions, engine: Engine, hooks: Hooks,
              result: JobResult, processes: int = 1) -> None:
    """One video into ``dst``. processes: a long video is cut into segments restored side by
    side in that many child processes and joined (``pipeline.parallel``), as a queued job's
    segments are; a short one, or one asked for a ``--preview`` sheet, runs in this process."""
    video_notes(vplan, engine, result)
    make_parent(dst)
    if processes > 1 and not opts.preview:
        from .parallel import run_segments, segment_ranges

        ranges = segment_ranges(vplan, processes)
        if len(ranges) > 1:
            run_segments(vplan, ranges, dst, opts, hooks, result, min(processes, len(ranges)))
            return
    engine.restorer.reset()  # a FaceMath edit's per-track state belongs to one video
    with work_dir(dst) as tmp:
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
    add_join_notes(result, summary)


def add_join_notes(result: JobResult, summary: dict) -> None:
    """What ``media.join`` did to the source's other streams, as the result's notes."""
    result.notes += [f"dropped {d}" for d in summary["dropped_streams"]]
    result.notes += [f"re-encoded {d}" for d in summary["reencoded_streams"]]


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
        run_video(plan(p).deinterlaced(opts.deinterlace), out, opts, engine, Hooks(), result)
        faces = result.faces - before
    result.items.append({"file": str(p), "output": str(out), "faces": faces})
