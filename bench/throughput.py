"""Throughput of the embedded pipeline against its floor and against the anchors' per-face loop.

    python -m bench.throughput --input CLIP [--task denoise] [--device cpu|cuda] [--frames N] [--json]
        [--detect-every K] [--io-queue N] [--threads N] [--skip naive,fast,restore,crop]

Runs, in this one process, on the same clip and the same encoder settings:
- transcode: decode + encode + audio remux only (the physical floor);
- pipeline: the embedded job as users run it (``pipeline.job.run_video``);
- fast: for a task with self-ensembles (unmask: mirror and three zooms, six network passes per
  face), the pipeline again with ``--fast`` (one pass per face);
- naive: the way GFPGAN / CodeFormer / facefusion scripts work: one frame at a time, detection
  at full resolution, each face restored alone at batch 1 in fp32, no tracking, every frame
  converted to RGB and back; built from this project's own functions;
- restore: the restoration network alone, faces/second at batch 1, 32 and 128;
- crop: ``pipeline.align.warp_face`` alone, ms per face on a frame of the clip's size, for faces
  of 96 to 512 px cropped to the task's crop, with the anti-aliasing shrink and without it.
Prints fps, the ratios pipeline/transcode and pipeline/naive, peak RSS and per-stage times.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path



def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
            "detected_frames": stats.detected,
            "stages": {k: round(v, 3) for k, v in stats.stages.items()}}


def run_naive(vplan, opts, engine, out_dir: Path, stop: int) -> dict:
    """One frame at a time: full-resolution detection, batch-1 fp32 restoration per face."""
    from pipeline.faces import FaceDetector
    from pipeline.images import add_delta
    from pipeline.media import VideoEncoder, i420_to_rgb, iter_frames
    from pipeline.restore import FaceRestorer
    import cv2
    import torch

    det = FaceDetector(device=engine.device, min_face=opts.min_face, max_side=100_000, batch_size=1)
    # the anchors run their networks in PyTorch's default layout (NCHW), fp32; a copy, since the
    # pipeline's restorer made the engine's model channels-last in place
    model = copy.deepcopy(engine.model).float().to(memory_format=torch.contiguous_format)
    rest = FaceRestorer(model, device=engine.device, batch_size=1, half=False, channels_last=False)
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


def run_restore(model, device: str, batches=(1, 32, 128), size: int = 128, repeats: int = 3) -> dict:
    import torch

    out = {}
    half = device.startswith("cuda")
    with torch.inference_mode():
        for b in batches:
            x = torch.rand(b, 3, size, size, device=device)
            if half:
                x = x.half()
            model(x)  # warm-up
            if half:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                model(x)
            if half:
                torch.cuda.synchronize()
            out[f"batch_{b}"] = round(b * repeats / (time.perf_counter() - t), 2)
    return out


def run_crop(frame_size: tuple[int, int], size: int, height: int, repeats: int = 30) -> dict:
    """warp_face's cost per face (ms), anti-aliased and not, side by side, for faces of a few
    sizes (eye-to-mouth template scaled to the face) on a random frame of ``frame_size``."""
    import numpy as np

    from pipeline import align

    w, h = frame_size
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = {}
    for face in (96, 192, 384, 512):
        if face > min(w, h):
            continue
        m = align.estimate_transform(align.template(1.0) * face + [(w - face) / 2, (h - face) / 2], size)
        ms = {}
        for name, aa in (("antialias", True), ("plain", False)):
            align.warp_face(frame, m, size, height, antialias=aa)
            t = time.perf_counter()
            for _ in range(repeats):
                align.warp_face(frame, m, size, height, antialias=aa)
            ms[name] = round((time.perf_counter() - t) / repeats * 1000, 3)
        ms["ratio"] = round(ms["antialias"] / ms["plain"], 2)
        out[f"face_{face}px"] = ms
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--task", default="denoise")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=None, help="only the first N frames")
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--detect-every", type=int, default=None, help="default: the job's default")
    ap.add_argument("--io-queue", type=int, default=None,
                    help="frames queued to the decode and encode threads (0: none; default: the pipeline's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip", default="", help="comma list of modes to skip (naive,fast,restore,crop)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pipeline.job import Engine, JobOptions
    from pipeline.media import plan

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = JobOptions(task=args.task, device=args.device, preset=args.preset, crf=args.crf)
    if args.detect_every is not None:
        opts.detect_every = args.detect_every
    engine = Engine(opts)
    vplan = plan(args.input)
    stop = min(args.frames or vplan.frames, vplan.frames)
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"input": str(args.input), "device": engine.device, "task": args.task,
                 "frames": stop, "size": f"{vplan.width}x{vplan.height}", "settings": {
                     "preset": args.preset, "crf": args.crf, "detect_every": opts.detect_every,
                     "io_queue": args.io_queue, "torch_threads": _threads()}}
    if engine.device.startswith("cuda"):
        import torch

        res["device_name"] = torch.cuda.get_device_name()
    runs = {}
    rss = {}
    with tempfile.TemporaryDirectory(prefix="facemend-bench-") as tmp:
        tmp = Path(tmp)
        runs["transcode"] = run_transcode(vplan, opts.encoder(), tmp, stop)
        rss["transcode"] = peak_rss_mb()
        runs["pipeline"] = run_pipeline(vplan, opts, engine, tmp, stop, args.io_queue)
        rss["pipeline"] = peak_rss_mb()
        restorer = engine.restorer
        if "fast" not in skip and (len(restorer.zooms) > 1 or getattr(restorer.spec, "mirror", False)):
            restorer.ensemble = False  # as JobOptions(fast=True) builds it
            try:
                runs["fast"] = run_pipeline(vplan, opts, engine, tmp, stop, args.io_queue)
            finally:
                restorer.ensemble = True
        if "naive" not in skip:
            runs["naive"] = run_naive(vplan, opts, engine, tmp, stop)
            rss["naive"] = peak_rss_mb()
    fps = {k: round(v["frames"] / v["seconds"], 3) for k, v in runs.items()}
    res["fps"] = fps
    res["ratios"] = {"pipeline_over_transcode": round(fps["pipeline"] / fps["transcode"], 3)}
    if "fast" in fps:
        res["ratios"]["fast_over_pipeline"] = round(fps["fast"] / fps["pipeline"], 3)
    if "naive" in fps:
        res["ratios"]["pipeline_over_naive"] = round(fps["pipeline"] / fps["naive"], 3)
    res["stages"] = {k: v.get("stages") for k, v in runs.items() if v.get("stages")}
    res["faces"] = {k: v.get("faces") for k, v in runs.items() if "faces" in v}
    res["detected_frames"] = runs["pipeline"]["detected_frames"]
    res["peak_rss_mb_after"] = {k: round(v, 1) for k, v in rss.items()}
    if "restore" not in skip and engine.model.net is not None:
        res["restore_faces_per_s"] = run_restore(engine.model, engine.device)
    if "crop" not in skip and not engine.model.spec.native:
        spec = engine.model.spec
        res["crop_ms_per_face"] = run_crop((vplan.width, vplan.height), spec.size,
                                           spec.size + spec.rows_below)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
