"""A folder (or image) job's work files on the shared storage, beside its output:
``OUTPUT/.facemend/jobs/ID/`` (an image job: ``.facemend/jobs/ID/`` in the output's folder).

- ``chunk-NNNNN.json``   the chunk's files, ``[[input, output], ...]``, written by the plan task
                         before the chunk is sent (so the job record in Redis holds no file list);
- ``chunk-NNNNN.jsonl``  one line per file the chunk finished (appended): a chunk run
                         again after its worker died goes on from the first file without a line;
- ``samples/``           a few before/after face crops for the report.

The folder is removed when the job is over (its report and the manifest stay in ``.facemend``).
Every worker must see the output folder at the same path (FACEMEND_STORAGE_ROOTS).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline import manifest
from pipeline.jsonl import read_lines

FIRST_FAILURES = 50  # failures, notes and ignored files a job record keeps (the report has all)


def job_dir(kind: str, output: str | Path, job_id: str) -> Path:
    out = Path(output)
    return manifest.manifest_dir(out if kind == "folder" else out.parent) / "jobs" / job_id


def _chunk_name(index: int) -> str:
    return f"chunk-{index:05d}"


def write_chunk(folder: Path, index: int, pairs: list[tuple[Path, Path]]) -> None:
    """The chunk's file list, written under a temporary name and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_chunk_name(index)}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps([[str(a), str(b)] for a, b in pairs]))
    os.replace(tmp, path)


def read_chunk(folder: Path, index: int) -> list[tuple[str, str]]:
    return [tuple(p) for p in json.loads((folder / f"{_chunk_name(index)}.json").read_text())]


def add_result(folder: Path, index: int, src: str, outcome: dict) -> None:
    """Append one file's outcome to the chunk's results. Not fsynced: a process killed after the
    write keeps it (the page cache is the kernel's), and a line lost with the machine's power
    only means that file is decided again (the manifest, fsynced, says what was done)."""
    line = json.dumps({"input": src, "t": time.time(), **outcome}, separators=(",", ":")) + "\n"
    fd = os.open(folder / f"{_chunk_name(index)}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def results(folder: Path, index: int, *, repair: bool = False) -> dict[str, dict]:
    """{input: outcome} of the files chunk ``index`` finished. A line torn by a crash is
    ignored; ``repair`` (the chunk starting again) ends it, so that the next line appended
    stands on its own."""
    path = folder / f"{_chunk_name(index)}.jsonl"
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # the chunk has not finished a file yet
        return {}
    if repair and data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    records, _ = read_lines(path)
    return {r["input"]: r for r in records}


def all_results(folder: Path, parts: int):
    """Every chunk's outcomes, chunk by chunk: (input, outcome)."""
    for i in range(parts):
        yield from results(folder, i).items()


def tally(outcomes: dict[str, dict]) -> dict:
    """Counts of one chunk's outcomes, as its part record keeps them."""
    n = {"processed": 0, "skipped": 0, "failed": 0, "faces": 0}
    for r in outcomes.values():
        n[r["status"]] += 1
        n["faces"] += int(r.get("faces") or 0)
    return n


def save_samples(folder: Path, index: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Keep a chunk's before/after crops (RGB) for the report."""
    import cv2

    d = folder / "samples"
    d.mkdir(parents=True, exist_ok=True)
    for k, (before, after) in enumerate(pairs):
        for name, rgb in (("before", before), ("after", after)):
            path = d / f"{index:05d}-{k:02d}-{name}.png"
            tmp = path.with_name(f".{path.name}.partial.png")
            cv2.imwrite(str(tmp), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
            os.replace(tmp, path)


def load_samples(folder: Path, limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    import cv2

    pairs = []
    for before in sorted((folder / "samples").glob("*-before.png"))[:limit]:
        after = before.with_name(before.name.replace("-before", "-after"))
        a, b = cv2.imread(str(before)), cv2.imread(str(after))
        if a is not None and b is not None:
            pairs.append((cv2.cvtColor(a, cv2.COLOR_BGR2RGB), cv2.cvtColor(b, cv2.COLOR_BGR2RGB)))
    return pairs


def remove(folder: Path) -> None:
    """Remove a finished job's work folder, then ``jobs/`` and ``.facemend`` if that empties them."""
    shutil.rmtree(folder, ignore_errors=True)
    for d in (folder.parent, folder.parent.parent):
        try:
            d.rmdir()
        except OSError:  # not empty (other jobs, the manifest, a report), or gone
            break
