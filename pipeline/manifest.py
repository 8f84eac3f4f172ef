"""What a folder job has already done, kept beside its results: ``OUTPUT/.facemend/manifest.jsonl``.

One JSON line per input processed (appended, flushed and fsynced one record at a time, so a run
killed at any moment leaves every finished file recorded; a torn last line is ignored on
reading: ``pipeline.jsonl``). A record says which input it was (path relative to the input
folder, size, mtime_ns), how it was processed (the task, the options that change pixels:
``pixel_options``, and the sha256 of the tensors the task loads: ``pipeline.weights``), where the
result went (path relative to the output folder), the outcome (``done``, ``failed`` with its
reason, ``removed`` when a cancelled job took its output back), which worker (host:pid) and
when.

``--skip-existing`` skips an input only when its latest record says it was done from the same
size and mtime, with the same pixel options and weights, into the same output path, and that
output still exists. An input the manifest has no record of (an output folder written before
manifests existed, or a file finished in the instant before a crash) keeps the old rule: skipped
when its output is newer than the input, and then recorded (``adopted``) as done with the
current options, so the next run decides by the manifest alone.

Pure Python (no Celery): the embedded ``run_folder`` uses ``Manifest``; a queued chunk task can
use the module-level ``should_skip`` and ``record`` (one ``Manifest`` per output folder and
shard, cached in the process), writing its own shard file ``manifest.<shard>.jsonl`` so that
workers on different machines never append to the same file; reading merges every shard.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from . import weights
from .errors import OutputError
from .jsonl import open_append, read_lines

DIR_NAME = ".facemend"  # under a folder job's output folder; never scanned as input
MANIFEST = "manifest.jsonl"
LOCK = "lock"
VERSION = 1

DONE, FAILED, REMOVED = "done", "failed", "removed"
SKIP_REASON = "done before from the same input, options and weights (manifest)"
FRESH_REASON = "output is newer than input"  # the rule without a manifest record


class FolderBusy(OutputError):
    """Another run holds the output folder's lock (exit 4, as other output problems)."""


def manifest_dir(dst_root: str | Path) -> Path:
    return Path(dst_root) / DIR_NAME


# ---- what changes pixels --------------------------------------------------------------------

VIDEO_OPTIONS = ("codec", "crf", "preset", "detect_every")


def pixel_options(opts, src: str | Path | None = None) -> dict:
    """The options of ``opts`` (a ``JobOptions``) that change the pixels written for ``src``:
    a record made with other values is not a reason to skip. The task is by its canonical name
    (``deblur`` is ``enhance``), a FaceMath amount left to its default is that default; the
    encoder settings and ``detect_every`` only count for videos (``src`` a video; all of them
    when ``src`` is None). Batch size and device are left out: they do not change what a face
    becomes beyond float rounding."""
    from models.tasks import resolve

    from .media import is_video_path

    spec = resolve(opts.task)
    out = {"task": spec.name, "min_face": opts.min_face, "detect_side": opts.detect_side,
           "colour_match": bool(opts.colour_match), "fast": bool(opts.fast)}
    if spec.replaces:
        out["grain"] = bool(opts.grain)
    if opts.strength != 1.0:  # records made before the option hold none: the whole change
        out["strength"] = float(opts.strength)
    if spec.latent:
        out["amount"] = float(spec.default_amount if opts.amount is None else opts.amount)
        out["sharpen"] = bool(opts.sharpen)
    if spec.name == "morph":
        out.update(to=str(opts.to), to_stat=_stat_key(opts.to), frames=opts.frames,
                   fps=float(opts.fps), crf=opts.crf)
    if src is None or is_video_path(Path(src)):
        out.update({k: getattr(opts, k) for k in VIDEO_OPTIONS})
        if opts.deinterlace != "auto":  # records made before the option hold none: auto's
            out["deinterlace"] = opts.deinterlace
    return out


def _stat_key(path) -> list | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return [st.st_size, st.st_mtime_ns]


# ---- records --------------------------------------------------------------------------------

def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(timespec="seconds")


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:  # not under the root (a single file): its name
        return Path(path).name


def manifest_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("manifest*.jsonl"))


def read_records(folder: Path) -> list[dict]:
    """Every whole record of every manifest file in ``folder`` (``manifest.jsonl`` and its
    shards), oldest first. A line that is not a JSON object (torn by a crash) is ignored."""
    records = []
    for path in manifest_files(folder):
        records += read_lines(path)[0]
    return sorted(records, key=lambda r: r.get("t", 0.0))  # stable: file order within a time


class Manifest:
    """The manifest of one folder job's output folder ``dst_root`` for inputs under ``src_root``,
    as ``opts`` processes them. ``decide`` says whether an input may be skipped, ``record``
    appends one outcome. ``lock``: hold an exclusive lock on the folder while open (the
    embedded run: two runs into one folder would redo each other's work); ``shard``: append to
    ``manifest.<shard>.jsonl`` instead (one per worker process)."""

    def __init__(self, src_root: str | Path, dst_root: str | Path, opts, *, shard: str | None = None,
                 lock: bool = False) -> None:
        self.src_root, self.dst_root, self.opts = Path(src_root), Path(dst_root), opts
        self.dir = manifest_dir(dst_root)
        if shard:
            shard = re.sub(r"[^A-Za-z0-9@._-]", "-", shard)
        self.path = self.dir / (f"manifest.{shard}.jsonl" if shard else MANIFEST)
        self.task = opts.task
        self.weights = weights.weights_digest(opts.task)
        self.weights_file = weights.weights_file_digest(opts.task)
        self.worker = worker_name()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self.latest: dict[str, dict] = {}
        self._seen: dict[Path, int] = {}  # bytes of each manifest file read so far
        if lock:
            self._take_lock()
        self.existed = bool(manifest_files(self.dir))
        self.refresh()

    # -- reading

    def refresh(self) -> None:
        """Read what was appended since the last read (other writers' shards too)."""
        for path in manifest_files(self.dir):
            records, self._seen[path] = read_lines(path, self._seen.get(path, 0))
            for rec in records:
                old = self.latest.get(rec["input"])
                if old is None or rec.get("t", 0.0) >= old.get("t", 0.0):
                    self.latest[rec["input"]] = rec

    def decide(self, src: Path, out: Path) -> tuple[bool, str]:
        """(skip, why): skip ``src`` (its result going to ``out``) only when its latest record
        is a ``done`` from the same size, mtime, pixel options, weights and output path, and the
        output is still there. Without a record: the file-time rule (output newer than input)."""
        rec = self.latest.get(_rel(src, self.src_root))
        try:
            st = os.stat(src)
        except OSError:
            return False, "input cannot be read"
        if rec is None:
            if _is_fresh(st, out):
                return True, FRESH_REASON
            return False, "new"
        try:
            return self._decide(rec, st, src, out)
        except (AttributeError, TypeError, ValueError):  # a record from elsewhere, malformed
            return False, "its record cannot be understood"

    def _decide(self, rec: dict, st: os.stat_result, src: Path, out: Path) -> tuple[bool, str]:
        if rec.get("outcome") != DONE:
            return False, f"{rec.get('outcome', 'unknown')} last time"
        if (rec.get("size"), rec.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
            return False, "input changed"
        opts = pixel_options(self.opts, src)
        if rec.get("options", {}).get("task") != opts["task"]:
            return False, "task changed"
        if rec.get("options") != opts:
            return False, "options changed"
        if rec.get("weights") not in (self.weights, self.weights_file):
            return False, "weights changed"
        if rec.get("output") != _rel(out, self.dst_root):
            return False, "output path changed"
        if not out.is_file():
            return False, "output missing"
        return True, SKIP_REASON

    # -- writing

    def record(self, src: Path, out: Path, outcome: str, *, error: str | None = None,
               faces: int | None = None, seconds: float | None = None, stat: os.stat_result | None = None,
               adopted: bool = False) -> dict:
        """Append one record, durably (flush + fsync) before returning it. ``stat``: the
        input's stat taken before it was processed (a file changed meanwhile is then redone)."""
        if stat is None:
            try:
                stat = os.stat(src)
            except OSError:
                stat = None
        try:
            out_size = os.stat(out).st_size if outcome == DONE else None
        except OSError:
            out_size = None
        t = time.time()
        rec = {
            "v": VERSION, "input": _rel(src, self.src_root),
            "size": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None,
            "task": self.task, "options": pixel_options(self.opts, src), "weights": self.weights,
            "output": _rel(out, self.dst_root), "output_size": out_size, "outcome": outcome,
            "error": error, "faces": faces, "seconds": None if seconds is None else round(seconds, 3),
            "worker": self.worker, "time": now_iso(t), "t": t,
        }
        if adopted:
            rec["adopted"] = True
        self._append(rec)
        self.latest[rec["input"]] = rec
        return rec

    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        try:
            if self._fd is None:
                self._open()
            os.write(self._fd, line)  # O_APPEND: one write per record
            os.fsync(self._fd)
        except OSError as e:
            from .errors import output_error

            raise output_error(self.path, e) from None

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = open_append(self.path)

    def _take_lock(self) -> None:
        import fcntl

        from .errors import output_error

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(self.dir / LOCK, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(f"{self.dst_root}: another facemend run is writing this output "
                                  f"folder ({holder}); try again when it has finished") from None
            raise output_error(self.dir / LOCK, e) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.worker} since {now_iso()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_fresh(st: os.stat_result, out: Path) -> bool:
    try:
        return os.stat(out).st_mtime >= st.st_mtime
    except OSError:
        return False


# ---- for a queued chunk task: two calls per file -------------------------------------------

_open: dict[tuple, Manifest] = {}  # the manifests a long-lived worker process has open, newest last
OPEN_AT_MOST = 8


def _manifest(src_root, dst_root, opts, shard: str | None) -> Manifest:
    key = (str(src_root), str(dst_root), opts.task,
           json.dumps(pixel_options(opts), sort_keys=True, default=str),
           shard or worker_name().replace(":", "-"))
    book = _open.pop(key, None)
    if book is None:
        book = Manifest(src_root, dst_root, opts, shard=key[-1])
    else:  # weights replaced while the worker ran: records made from now on say so
        book.weights = weights.weights_digest(opts.task)
        book.weights_file = weights.weights_file_digest(opts.task)
    _open[key] = book
    while len(_open) > OPEN_AT_MOST:  # close the least recently used
        _open.pop(next(iter(_open))).close()
    return book


def forget(dst_root=None) -> None:
    """Close the cached manifests of ``dst_root`` (all of them when None), e.g. when a job ends."""
    for key in [k for k in _open if dst_root is None or k[1] == str(dst_root)]:
        _open.pop(key).close()


def should_skip(src_root, dst_root, src, out, opts, *, shard: str | None = None) -> str | None:
    """The reason to skip ``src`` (a file of the folder ``src_root`` whose result goes to
    ``out`` under ``dst_root``) as ``opts`` would process it, or None to process it. Rereads
    what other workers appended since the last call. Call it only when ``opts.skip_existing``."""
    book = _manifest(src_root, dst_root, opts, shard)
    book.refresh()
    skip, why = book.decide(Path(src), Path(out))
    if skip and why == FRESH_REASON:  # no record: adopt the output, as the embedded run does
        book.record(Path(src), Path(out), DONE, adopted=True)
    return why if skip else None


def record(src_root, dst_root, src, out, opts, outcome: str, *, error: str | None = None,
           faces: int | None = None, seconds: float | None = None, stat=None,
           shard: str | None = None) -> dict:
    """Append the outcome of one file (``"done"`` or ``"failed"`` with ``error``) to this
    worker's shard of ``dst_root``'s manifest, durably. ``shard``: a name no other process
    writing the folder at the same time uses (a Celery node name such as ``w1@host`` is stable
    across restarts; default host-pid, a new file for each process). ``stat``: the input's
    ``os.stat`` taken before it was processed."""
    return _manifest(src_root, dst_root, opts, shard).record(
        Path(src), Path(out), outcome, error=error, faces=faces, seconds=seconds, stat=stat)
