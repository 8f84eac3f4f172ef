"""Peak RSS of the embedded pipeline over clip length: the clip once and the clip N times.

    python -m bench.memory --input CLIP [--repeat 10] [--task identity] [--json]

Builds the long clip by remuxing the source N times back to back (stream copy, timestamps
shifted), then runs each job in a fresh child process (``python cli.py submit``) and reads the
child's peak RSS, so both figures come from one run of this script.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]


def repeat_clip(src: Path, dst: Path, n: int) -> None:
    """``src`` n times in a row (video and audio packets copied, pts/dts shifted)."""
    with av.open(str(src)) as c, av.open(str(dst), "w") as o:
        streams = [s for s in c.streams if s.type in ("video", "audio")]
        outs = {s.index: o.add_stream_from_template(s) for s in streams}
        span = {}
        for s in streams:
            c.seek(0)
            last = [p for p in c.demux(s) if p.pts is not None and p.size]
            end = max(p.pts + (p.duration or 0) for p in last)
            start = min(p.pts for p in last)
            span[s.index] = end - start
        for k in range(n):
            c.seek(0)
            for p in c.demux(*streams):
                if p.dts is None or p.size == 0:
                    continue
                shift = k * span[p.stream.index]
                p.pts += shift
                p.dts += shift
                p.stream = outs[p.stream.index]
                o.mux(p)


def child_peak_rss(args: list[str]) -> tuple[float, float]:
    """Run the CLI in a child; its peak RSS (MB, of the largest child so far) and seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--task", default="identity")
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = {"input": str(a.input), "task": a.task, "repeat": a.repeat}
    with tempfile.TemporaryDirectory(prefix="facemend-mem-") as tmp:
        tmp = Path(tmp)
        long = tmp / f"long{a.input.suffix}"
        repeat_clip(a.input, long, a.repeat)
        common = ["submit", "--task", a.task, "--preset", a.preset, "-q"]
        # RUSAGE_CHILDREN reports the largest child so far: run the short clip first
        rss1, s1 = child_peak_rss([*common, str(a.input), "-o", str(tmp / f"o1{a.input.suffix}")])
        rssn, sn = child_peak_rss([*common, str(long), "-o", str(tmp / f"on{a.input.suffix}")])
    res.update({"peak_rss_mb": {"x1": round(rss1, 1), f"x{a.repeat}": round(rssn, 1)},
                "seconds": {"x1": round(s1, 1), f"x{a.repeat}": round(sn, 1)},
                "ratio": round(rssn / rss1, 3)})
    print(json.dumps(res) if a.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
