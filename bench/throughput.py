"""Throughput of the embedded pipeline against its floor and against the anchors' per-face loop.

    python -m bench.throughput --input CLIP [--task denoise] [--device cpu|cuda] [--frames N] [--json]
        [--engine auto|torch|onnxruntime|openvino|all|E1,E2] [--detect-every K] [--io-queue N]
        [--threads N] [--skip transcode,naive,fast,restore,networks,crop] [--repeat N] [--jobs N]
        [--rounds N]

Runs, in this one process, on the same clip and the same encoder settings:
- transcode: decode + encode + audio remux only (the physical floor);
- pipeline: the embedded job as users run it (``pipeline.job.run_video``), once per inference
  engine asked for (``--engine``, a comma list or ``all``: ``pipeline[ENGINE]``; ``pipeline`` is
  the first one's), with the engine each network really ran with, per-stage times and the peak
  RSS sampled during that run;
- fast: for a task with self-ensembles (unmask: mirror and three zooms, six network passes per
  face), the pipeline again with ``--fast`` (one pass per face);
- naive: the way GFPGAN / CodeFormer / facefusion scripts work: one frame at a time, detection
  at full resolution, each face restored alone at batch 1 in fp32, no tracking, every frame
  converted to RGB and back; built from this project's own functions;
- restore: the restoration network alone, faces/second at batch 1, 32 and 128, per engine;
- networks: each network alone (the task's, MTCNN's P-, R- and O-Nets) per engine, ms per face
  (P-Net: per frame of the detector's size) at the batch sizes the pipeline runs, the engines'
  calls interleaved so that a busy machine slows each alike (median of the rounds);
- crop: ``pipeline.align.warp_face`` alone, ms per face on a frame of the clip's size, for faces
  of 96 to 512 px cropped to the task's crop, with the anti-aliasing shrink and without it.
- jobs (``--jobs N``): the embedded job as users run it (``pipeline.job.run_job``) on the clip
  repeated to a minute or more, in one process and with its segments in N processes side by
  side (``cli.py submit --jobs``): seconds, fps and their ratio;
- repeat (``--repeat N``): peak RSS against the clip's length: the pipeline alone on the clip and
  on the clip N times back to back (``bench.memory.repeat_clip``), each in a fresh child process
  (this command with every other mode skipped), so neither run's peak holds the other's memory;
  with ``--frames F`` the clip is its first F frames (re-encoded with the run's settings).
Prints fps, the ratios pipeline/transcode and pipeline/naive (per engine), peak RSS and
per-stage times. ``--rounds N`` runs transcode, pipeline(s) and naive N times in turn and
reports each fps and ratio as the median over the rounds (the runs' spread on a shared machine
is about a tenth), every round's figures under ``rounds``, and the stages and memory of the
round whose pipeline ran at the median speed. The naive loop always runs in torch fp32, as the anchors do.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.components import run_crop, run_networks, run_restore

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssPeak:
    """The largest resident set size (MB) of this process while the ``with`` block runs,
    sampled every ``every`` seconds from /proc (ru_maxrss only ever grows over a process)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the process's peak so far
            return peak_rss_mb()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> "RssPeak":
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = round(max(self.peak, self.now()), 1)
        self.growth = round(self.peak - self.start, 1)  # what the run itself added


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def run_transcode(vplan, settings, out_dir: Path, stop: int) -> dict:
    from pipeline.media import VideoEncoder, iter_frames, join

    t0 = time.perf_counter()
    part = out_dir / "transcode.part.mp4"
    with VideoEncoder(part, vplan, settings) as enc:
        for i, yuv in iter_frames(vplan, 0, stop):
            enc.write(i, yuv)
    if stop == vplan.frames:
        join([part], vplan, out_dir / "transcode.mp4")
    return {"seconds": time.perf_counter() - t0, "frames": stop}


def run_pipeline(vplan, opts, engine, out_dir: Path, stop: int, io_queue: int | None = None) -> dict:
    from pipeline.media import join
    from pipeline.video import process_range

    t0 = time.perf_counter()
    part = out_dir / "pipeline.part.mp4"
    stats = process_range(vplan, part, detector=engine.detector, restorer=engine.restorer,
                          settings=opts.encoder(), stop=stop, detect_every=opts.detect_every,
                          detect_batch=8, **({} if io_queue is None else {"io_queue": io_queue}))
    if stop == vplan.frames:
        join([part], vplan, out_dir / "pipeline.mp4")
    return {"seconds": time.perf_counter() - t0, "frames": stats.frames, "faces": stats.faces,
            "detected_frames": stats.detected, "searched_frames": stats.searched,
            "stages": {k: round(v, 3) for k, v in stats.stages.items()}}


def run_naive(vplan, opts, engine, out_dir: Path, stop: int) -> dict:
    """One frame at a time: full-resolution detection, batch-1 fp32 restoration per face."""
    from pipeline.faces import FaceDetector
    from pipeline.images import add_delta
    from pipeline.media import VideoEncoder, i420_to_rgb, iter_frames
    from pipeline.restore import FaceRestorer
    import cv2

    import models

    det = FaceDetector(device=engine.device, min_face=opts.min_face, max_side=100_000, batch_size=1,
                       engine="torch")
    # the anchors run their networks in PyTorch eager, default layout (NCHW), fp32
    model = models.load(opts.task, engine.device, amount=opts.amount, sharpen=opts.sharpen, engine="torch")
    rest = FaceRestorer(model, device=engine.device, batch_size=1, half=False, channels_last=False)
    rest.bucket = 1  # a local task's head cut alone at its own size, as the anchors cut each face
    stages = dict.fromkeys(("decode", "detect", "restore", "encode"), 0.0)
    faces = 0
    t0 = time.perf_counter()
    with VideoEncoder(out_dir / "naive.part.mp4", vplan, opts.encoder()) as enc:
        it = iter_frames(vplan, 0, stop)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            if item is None:
                break
            i, yuv = item
            rgb = i420_to_rgb(yuv)
            stages["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            found = det.detect([rgb])[0]
            stages["detect"] += time.perf_counter() - t
            t = time.perf_counter()
            for f in found:  # each face alone, batch 1
                for rect, d in rest.deltas([rgb], [[f]])[0]:
                    add_delta(rgb, rect, d)
            faces += len(found)
            stages["restore"] += time.perf_counter() - t
            t = time.perf_counter()
            enc.write(i, cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420))
            stages["encode"] += time.perf_counter() - t
    return {"seconds": time.perf_counter() - t0, "frames": stop, "faces": faces,
            "stages": {k: round(v, 3) for k, v in stages.items()}}


def argv_for_child(args, engine: str) -> list[str]:
    """This command's pipeline settings, for a child that runs the pipeline alone with ``engine``."""
    out = ["--task", args.task, "--device", args.device, "--engine", engine, "--codec", args.codec,
           "--preset", args.preset, "--crf", str(args.crf), "--skip", "transcode,naive,fast,restore,networks,crop",
           "--json"]
    for flag, v in (("--detect-every", args.detect_every), ("--io-queue", args.io_queue),
                    ("--threads", args.threads)):
        if v is not None:
            out += [flag, str(v)]
    return out


def run_repeat(args, child: list[str], vplan, settings) -> dict:
    """Peak RSS (MB, whole child process) and fps of the pipeline alone on the clip (with
    ``--frames F``: its first F frames, re-encoded) and on that clip ``args.repeat`` times, each
    in a fresh child process."""
    import subprocess

    from bench.memory import repeat_clip

    n = args.repeat
    out: dict = {"n": n, "peak_rss_mb": {}, "fps": {}, "frames": {}}
    with tempfile.TemporaryDirectory(prefix="facemend-repeat-") as tmp:
        tmp = Path(tmp)
        clip = args.input
        if args.frames and args.frames < vplan.frames:
            run_transcode(vplan, settings, tmp, args.frames)
            clip = tmp / "transcode.part.mp4"
        long = tmp / f"x{n}{clip.suffix}"
        repeat_clip(clip, long, n)
        for key, path in (("x1", clip), (f"x{n}", long)):
            cmd = [sys.executable, "-m", "bench.throughput", "--input", str(path), *child]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                            cwd=Path(__file__).resolve().parents[1]).stdout.strip().splitlines()[-1])
            out["peak_rss_mb"][key] = got["peak_rss_mb_process"]
            out["fps"][key] = got["fps"].get("pipeline")
            out["frames"][key] = got["frames"]
    out["ratio"] = round(out["peak_rss_mb"][f"x{n}"] / out["peak_rss_mb"]["x1"], 3)
    return out


def run_jobs(args, n: int) -> dict:
    """The embedded job as ``cli.py submit`` runs it, on the clip repeated to a minute or more,
    in one process and with ``--jobs n`` (its segments side by side): seconds, fps, the ratio."""
    import math
    from fractions import Fraction

    from bench.memory import repeat_clip
    from pipeline.job import JobOptions, run_job
    from pipeline.media import plan
    from pipeline.parallel import segment_ranges

    src = plan(args.input)
    seconds = max(float((src.pts[-1] - src.pts[0]) * Fraction(src.time_base)), 1e-3)
    reps = max(1, math.ceil(60.0 / seconds))
    out: dict = {"repeats": reps}
    with tempfile.TemporaryDirectory(prefix="facemend-jobs-") as tmp:
        long = Path(tmp) / f"x{reps}{args.input.suffix}"
        repeat_clip(args.input, long, reps)
        out["frames"] = plan(long).frames
        out["segments"] = len(segment_ranges(plan(long), n))
        for k in dict.fromkeys((1, n)):
            opts = JobOptions(task=args.task, device=args.device, preset=args.preset, crf=args.crf,
                              codec=args.codec, output=str(Path(tmp) / f"jobs{k}{args.input.suffix}"))
            t = time.perf_counter()
            r = run_job(long, opts, processes=k)
            sec = time.perf_counter() - t
            out[f"jobs{k}"] = {"seconds": round(sec, 2), "fps": round(r.frames / sec, 3)}
    out["ratio"] = round(out[f"jobs{n}"]["fps"] / out["jobs1"]["fps"], 3)
    return out


def engines_asked(value: str) -> list[str]:
    """``--engine``: one engine, a comma list, or ``all`` (torch and the installed others)."""
    from models.export import ENGINES, installed, requested

    if value == "all":
        return [e for e in ENGINES[1:] if installed(e)]
    return [requested(e) for e in value.split(",") if e.strip()]


def run_round(args, vplan, opts, engines, built, tmp: Path, stop: int, skip: set) -> tuple[dict, dict]:
    """One round of the modes not skipped, one after another: (runs, peak RSS per run)."""
    engine = built[engines[0]][0]
    runs, rss = {}, {}
    if "transcode" not in skip:
        with RssPeak() as peak:
            runs["transcode"] = run_transcode(vplan, opts.encoder(), tmp, stop)
        rss["transcode"] = (peak.peak, peak.growth)
    for e in engines:
        name = "pipeline" if len(engines) == 1 else f"pipeline[{e}]"
        en = built[e][0]
        with RssPeak() as peak:
            runs[name] = run_pipeline(vplan, opts, en, tmp, stop, args.io_queue)
        rss[name] = (peak.peak, peak.growth)
        restorer = en.restorer
        if "fast" not in skip and (len(restorer.zooms) > 1 or getattr(restorer.spec, "mirror", False)):
            restorer.ensemble = False  # as JobOptions(fast=True) builds it
            try:
                runs[name.replace("pipeline", "fast")] = run_pipeline(vplan, opts, en, tmp, stop, args.io_queue)
            finally:
                restorer.ensemble = True
    if "naive" not in skip:
        with RssPeak() as peak:
            runs["naive"] = run_naive(vplan, opts, engine, tmp, stop)
        rss["naive"] = (peak.peak, peak.growth)
    return runs, rss


def ratios_of(fps: dict) -> dict:
    """pipeline/transcode, fast/pipeline and pipeline/naive (per engine) from one round's fps."""
    ratios = {}
    for name in [k for k in fps if k.startswith("pipeline")]:
        tag = name[len("pipeline"):]
        if "transcode" in fps:
            ratios[f"pipeline{tag}_over_transcode"] = round(fps[name] / fps["transcode"], 3)
        if f"fast{tag}" in fps:
            ratios[f"fast{tag}_over_pipeline{tag}"] = round(fps[f"fast{tag}"] / fps[name], 3)
        if "naive" in fps:
            ratios[f"pipeline{tag}_over_naive"] = round(fps[name] / fps["naive"], 3)
    return ratios


def _median(dicts) -> dict:
    """Key by key, the median of the values the dicts hold for it."""
    import statistics

    dicts = list(dicts)
    return {k: round(statistics.median(d[k] for d in dicts if k in d), 3) for k in dicts[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--task", default="denoise")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="auto",
                    help="inference engine(s) for the pipeline runs: auto, torch, onnxruntime, openvino, "
                         "a comma list, or all (default auto)")
    ap.add_argument("--frames", type=int, default=None, help="only the first N frames")
    ap.add_argument("--codec", default="libx264", help="video encoder (h264_nvenc: NVENC)")
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--detect-every", type=int, default=None, help="default: the job's default")
    ap.add_argument("--io-queue", type=int, default=None,
                    help="frames queued to the decode and encode threads (0: none; default: the pipeline's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip", default="",
                    help="comma list of modes to skip (transcode,naive,fast,restore,networks,crop)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="also the pipeline's peak RSS on the clip and on the clip N times, each in a child process")
    ap.add_argument("--jobs", type=int, default=None,
                    help="also the embedded job on the clip repeated to a minute, in one process and in N side by side")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run transcode, pipeline and naive this many times in turn; medians are reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least 1")

    from pipeline.job import Engine, JobOptions
    from pipeline.media import plan

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engines = engines_asked(args.engine)
    opts = JobOptions(task=args.task, device=args.device, preset=args.preset, crf=args.crf, codec=args.codec)
    if args.detect_every is not None:
        opts.detect_every = args.detect_every
    vplan = plan(args.input)
    stop = min(args.frames or vplan.frames, vplan.frames)
    skip = set(filter(None, args.skip.split(",")))
    built = {}
    saved = os.environ.get("FACEMEND_ENGINE")
    try:
        for e in engines:  # the job's Engine reads the machine's choice from FACEMEND_ENGINE
            os.environ["FACEMEND_ENGINE"] = e
            t = time.perf_counter()
            built[e] = (Engine(opts), round(time.perf_counter() - t, 2))
    finally:
        if saved is None:
            os.environ.pop("FACEMEND_ENGINE", None)
        else:
            os.environ["FACEMEND_ENGINE"] = saved
    engine = built[engines[0]][0]
    res: dict = {"input": str(args.input), "device": engine.device, "task": args.task,
                 "frames": stop, "size": f"{vplan.width}x{vplan.height}", "settings": {
                     "codec": args.codec, "preset": args.preset, "crf": args.crf, "detect_every": opts.detect_every,
                     "io_queue": args.io_queue, "torch_threads": _threads()},
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                 "engines": {e: {"restore": getattr(en.model, "engine", "torch"),
                                 "restore_precision": "fp16" if en.restorer.half else getattr(en.model, "precision", "f32"),
                                 "mtcnn": en.detector.engine, "load_seconds": s} for e, (en, s) in built.items()}}
    if engine.device.startswith("cuda"):
        import torch

        res["device_name"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="facemend-bench-") as tmp:
        tmp = Path(tmp)
        if engine.device.startswith("cuda"):  # CUDA's start and cuDNN's first plans: not timed
            for en, _s in built.values():
                run_pipeline(vplan, opts, en, tmp, min(stop, 8), args.io_queue)
            if "naive" not in skip:
                run_naive(vplan, opts, engine, tmp, min(stop, 8))
        rounds = [run_round(args, vplan, opts, engines, built, tmp, stop, skip) for _ in range(args.rounds)]
    per_round = [({k: v["frames"] / v["seconds"] for k, v in rr.items()}, rr, rs) for rr, rs in rounds]
    # the round whose pipeline ran at the median speed gives the stages and memory; fps and
    # ratios are each the median over the rounds (runs minutes apart swing by a tenth)
    _f, runs, rss = sorted(per_round, key=lambda x: x[0].get("pipeline", 0))[len(per_round) // 2]
    res["fps"] = _median({k: round(v, 3) for k, v in f.items()} for f, _r, _s in per_round)
    res["ratios"] = _median(ratios_of(f) for f, _r, _s in per_round)
    if args.rounds > 1:
        res["rounds"] = [{"fps": {k: round(v, 3) for k, v in f.items()}, "ratios": ratios_of(f)}
                         for f, _r, _s in per_round]
    res["stages"] = {k: v.get("stages") for k, v in runs.items() if v.get("stages")}
    res["faces"] = {k: v.get("faces") for k, v in runs.items() if "faces" in v}
    res["detected_frames"] = {k: v["detected_frames"] for k, v in runs.items() if "detected_frames" in v}
    res["searched_frames"] = {k: v["searched_frames"] for k, v in runs.items() if "searched_frames" in v}
    # sampled during each run: the process's peak, and its growth over the run's start (the
    # engines' models stay loaded, so a later run's peak holds the earlier ones' memory too)
    res["peak_rss_mb"] = {k: v[0] for k, v in rss.items()}
    res["rss_growth_mb"] = {k: v[1] for k, v in rss.items()}
    res["peak_rss_mb_process"] = round(peak_rss_mb(), 1)
    if "restore" not in skip and getattr(engine.model, "net", None) is not None:
        res["restore_faces_per_s"] = {e: run_restore(en.model, en.device) for e, (en, _s) in built.items()}
    if "networks" not in skip:
        res["networks_ms_per_face"] = run_networks(args.task, engine.device, engines, (vplan.width, vplan.height))
    if "crop" not in skip and not engine.model.spec.native:
        spec = engine.model.spec
        res["crop_ms_per_face"] = run_crop((vplan.width, vplan.height), spec.size,
                                           spec.size + spec.rows_below)
    if args.repeat:
        res["repeat"] = run_repeat(args, argv_for_child(args, engines[0]), vplan, opts.encoder())
    if args.jobs:
        res["jobs"] = run_jobs(args, args.jobs)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
