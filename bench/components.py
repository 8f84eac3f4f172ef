"""The components of the pipeline timed alone, for ``bench.throughput``: the restoration network
at batch 1/32/128, each network (the task's, MTCNN's P-, R- and O-Nets) per inference engine, and
the aligned crop (``pipeline.align.warp_face``)."""
from __future__ import annotations

import statistics
import time


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


def _median_ms(calls: dict, x, per: int, rounds: int) -> dict:
    """Median ms per item of each ``calls[name](x)``, the names' calls interleaved per round."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {k: [] for k in calls}
    with torch.inference_mode():
        for f in calls.values():
            f(x)  # warm-up (and an engine's first-shape compile)
        for _ in range(rounds):
            for k, f in calls.items():
                sync()
                t = time.perf_counter()
                f(x)
                sync()
                times[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v) * 1000 / per, 3) for k, v in times.items()}


def run_networks(task: str, device: str, engines: list[str], frame_size: tuple[int, int],
                 rounds: int = 7) -> dict:
    """Each network alone per engine: {case: {engine: ms per face}} at the pipeline's batches
    (P-Net: ms per frame, the whole pyramid of a frame of ``frame_size``, 8 frames a call)."""
    import torch

    import models
    from pipeline.mtcnn import FastMTCNN

    restorers, detectors = {}, {}
    for e in engines:
        m = models.load(task, device, engine=e)
        if getattr(m, "net", None) is not None and not m.spec.latent:
            restorers[e] = m.to(memory_format=torch.channels_last)
        detectors[e] = FastMTCNN(device=device, engine=e)
    out: dict = {"engines_run": {e: {"restore": getattr(restorers.get(e), "engine", None),
                                     "mtcnn": d.engine} for e, d in detectors.items()}}
    cl = torch.channels_last
    if restorers:
        spec = next(iter(restorers.values())).spec
        h = spec.size + spec.rows_below
        cases = [(1, h, spec.size), (16, h, spec.size)] if not spec.native else [
            (1, 128, 128), (16, 128, 128), (4, 256, 256), (1, 384, 384)]
        for b, hh, ww in cases:
            x = torch.rand(b, 3, hh, ww, device=device).contiguous(memory_format=cl)
            label = f"{task} {b}x{hh}x{ww}" + (" (mirrored: 2x)" if spec.mirror else "")
            out[label] = _median_ms(restorers, x, b, rounds)
    w, h = frame_size
    scale = min(1.0, 960 / max(w, h))
    sw, sh = int(round(w * scale)), int(round(h * scale))
    frames = torch.randint(0, 256, (8, sh, sw, 3), dtype=torch.uint8).numpy()
    out[f"mtcnn detect 8x{sw}x{sh} (per frame)"] = _median_ms(
        {e: d.detect for e, d in detectors.items()}, frames, 8, max(3, rounds // 2))
    m = 12.0 / max(12, int(round(40 * scale)))  # P-Net's first pyramid level (min_face 40)
    ph, pw = int(sh * m + 1), int(sw * m + 1)
    for name, idx, shape in (("pnet", 0, (8, 3, ph, pw)), ("rnet", 1, (256, 3, 24, 24)), ("onet", 2, (32, 3, 48, 48))):
        x = (torch.rand(*shape, device=device) * 2 - 1).contiguous(memory_format=cl)
        out[f"{name} {'x'.join(map(str, shape[:1] + shape[2:]))}"] = _median_ms(
            {e: d.runs[idx] for e, d in detectors.items()}, x, shape[0], rounds)
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
