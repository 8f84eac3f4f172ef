"""The morning report of a folder job: ``OUTPUT/.facemend/report.json`` and ``report.html``.

Written when a folder job ends (an embedded one however it ends: done, some files failed,
stopped by an error, interrupted, cancelled with files kept; a queued one when its summary is
made, from the counts of its chunks): counts, rate, per-worker figures, failures with their
reasons, the task, its pixel options and weights, and a before/after sheet of up to ``SAMPLES`` faces
restored in this run. The HTML page stands alone (inline CSS, images as data: URIs). Both files
are written under a temporary name and renamed, so a crash leaves the previous report whole.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from .manifest import manifest_dir, now_iso, pixel_options
from .weights import weights_digest

SAMPLES = 8
JSON_NAME, HTML_NAME = "report.json", "report.html"


def build_report(result, opts, *, status: str, started: float, ended: float, error: str | None = None,
                 workers: dict | None = None) -> dict:
    """The report's data from a folder job's ``JobResult``. ``workers``: {name: {"files",
    "seconds", ...}} of a queued job's workers (default: this process did every file)."""
    from .manifest import worker_name

    seconds = max(ended - started, 0.0)
    processed = result.files["processed"]
    if workers is None:
        done = processed + result.files["failed"]
        workers = {worker_name(): {"files": done, "seconds": round(seconds, 2),
                                   "files_per_second": round(done / seconds, 2) if seconds > 0 else None}}
    return {
        "status": status,  # done | partly failed | stopped | interrupted | cancelled
        "error": error,
        "input": result.input, "output": result.output,
        "task": pixel_options(opts)["task"],
        "options": pixel_options(opts),
        "weights": weights_digest(opts.task),
        "files": dict(result.files),
        "faces": result.faces,
        "seconds": round(seconds, 2),
        "files_per_second": round(processed / seconds, 3) if seconds > 0 else None,
        "started": now_iso(started), "ended": now_iso(ended),
        "failures": list(result.failures),
        "skipped_other": [s for s in result.skipped if s.get("reason") not in SKIP_REASONS],
        "notes": list(result.notes),
        "workers": workers,
    }


def _skip_reasons() -> set:
    from .manifest import FRESH_REASON, SKIP_REASON

    return {FRESH_REASON, SKIP_REASON}


SKIP_REASONS = _skip_reasons()


def write_report(dst_root: Path, report: dict, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write report.json and report.html under ``dst_root/.facemend``; returns the JSON's path."""
    folder = manifest_dir(dst_root)
    folder.mkdir(parents=True, exist_ok=True)
    report = dict(report, samples=min(len(pairs), SAMPLES), html=str(folder / HTML_NAME))
    _write_atomic(folder / HTML_NAME, render_html(report, pairs[:SAMPLES]).encode())
    _write_atomic(folder / JSON_NAME, (json.dumps(report, indent=2) + "\n").encode())
    return folder / JSON_NAME


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _small(rgb: np.ndarray, side: int = 256) -> np.ndarray:
    """A crop at most ``side`` px wide (shown 128 px wide: sharp on a high-density screen)."""
    import cv2

    h, w = rgb.shape[:2]
    if w <= side:
        return rgb
    return cv2.resize(rgb, (side, max(1, round(h * side / w))), interpolation=cv2.INTER_AREA)


CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} .sub{color:#666;margin-bottom:1.2em}
.counts{display:flex;gap:1em;margin:1em 0}
.count{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1.2em;min-width:6em}
.count b{display:block;font-size:1.8em} .failed b{color:#b00020} .status-done{color:#176b2c}
.status-other{color:#b00020}
table{border-collapse:collapse;background:#fff;margin:.5em 0 1.5em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
code{font-size:.9em;word-break:break-all}
.faces{display:flex;flex-wrap:wrap;gap:12px}
.pair{background:#222;color:#ccc;padding:6px;border-radius:4px;font-size:12px}
.pair img{width:128px;height:auto;display:inline-block;margin-right:4px;image-rendering:auto}
"""


def render_html(report: dict, pairs: list[tuple[np.ndarray, np.ndarray]]) -> str:
    from .preview import data_uri

    e = html.escape
    files = report["files"]
    ok = report["status"] == "done"
    rows = "".join(f"<tr><td><code>{e(f['file'])}</code></td><td>{e(f['error'])}</td></tr>"
                   for f in report["failures"])
    failures = (f"<table><tr><th>file</th><th>reason</th></tr>{rows}</table>" if rows
                else "<p>None.</p>")
    options = "".join(f"<tr><th>{e(str(k))}</th><td><code>{e(str(v))}</code></td></tr>"
                      for k, v in report["options"].items())
    weights = "".join(f"<tr><th>{e(k)}</th><td><code>sha256 {e(v)}</code></td></tr>"
                      for k, v in report["weights"].items()) or "<tr><td>none (this task loads no weights)</td></tr>"
    if pairs:
        pairs = [(_small(b), _small(a)) for b, a in pairs]
        faces = "<div class='faces'>" + "".join(
            f"<div class='pair'>before / after<br><img alt='before' src='{data_uri(b)}'>"
            f"<img alt='after' src='{data_uri(a)}'></div>" for b, a in pairs) + "</div>"
    else:
        faces = "<p>No face was restored in this run.</p>"
    rate = report["files_per_second"]
    workers = "".join(f"<tr><td><code>{e(str(name))}</code></td><td>{w.get('files')}</td><td>{w.get('seconds')}</td>"
                      f"<td>{w.get('files_per_second')}</td></tr>" for name, w in report.get("workers", {}).items())
    error = f"<p class='status-other'>{e(report['error'])}</p>" if report.get("error") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>facemend: {e(report['output'])}</title>
<style>{CSS}</style></head><body>
<h1>facemend {e(report['task'])}: <span class="{'status-done' if ok else 'status-other'}">{e(report['status'])}</span></h1>
<div class="sub"><code>{e(report['input'])}</code> &rarr; <code>{e(report['output'])}</code><br>
{e(report['started'])} to {e(report['ended'])} ({report['seconds']:.1f} s{f', {rate:.2f} files/s' if rate else ''})</div>
{error}
<div class="counts">
<div class="count"><b>{files['processed']}</b>processed</div>
<div class="count"><b>{files['skipped']}</b>skipped</div>
<div class="count failed"><b>{files['failed']}</b>failed</div>
<div class="count"><b>{report['faces']}</b>faces</div>
</div>
<h2>Workers</h2><table><tr><th>worker</th><th>files</th><th>seconds</th><th>files/s</th></tr>{workers}</table>
<h2>Failures</h2>{failures}
<h2>Sample faces (up to {SAMPLES} restored in this run)</h2>{faces}
<h2>Options that change pixels</h2><table>{options}</table>
<h2>Weights</h2><table>{weights}</table>
</body></html>
"""
