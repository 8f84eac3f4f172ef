"""What detecting every K-th frame costs in faces: the tracker's output at K against K = 1.

    python -m bench.detect_quality --input CLIP [--frames 60] [--every 1,2,3] [--json]

Decodes the first N frames, runs the detector on every frame once (batches of 8, as the
pipeline does), then feeds the tracker as ``process_range`` does for each K: the detections of
frames ``i % K == 0`` and of the last frame; the frames between two of them get ``None`` (their
faces come from the tracker's interpolation) unless the faces of the two differ, when they are
searched around the faces that changed, as the pipeline does (``--refine frames``: their
whole-frame detections; ``none``: interpolated). Each K's final faces (gap-filled, landmarks
smoothed) are matched per frame to the K = 1 faces (greedy by box IoU >= 0.5) and reported as:

- faces, faces_per_frame; recall (reference faces matched) and precision (faces matched);
- tracks_found: share of reference tracks (>= 3 frames) with >= 90 % of their frames matched;
- iou_mean / iou_p5 / iou_min of matched boxes, and the same on interpolated frames only;
- lm_nme_mean / lm_nme_p95: landmark error of matched faces over the reference inter-ocular
  distance (what alignment sees), interpolated frames only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def detect_all(clip: Path, frames: int | None, *, min_face: int = 40, max_side: int = 960,
               batch: int = 8) -> tuple[list, dict, list, object, tuple[int, int] | None]:
    """Per-frame detections of the first ``frames`` frames, timing, the frames (at the detector's
    size), the detector and the frames' own (height, width)."""
    from pipeline.faces import FaceDetector
    from pipeline.media import i420_shape, i420_to_rgb, iter_frames, plan

    vplan = plan(clip)
    n = min(frames or vplan.frames, vplan.frames)
    det = FaceDetector(min_face=min_face, max_side=max_side)
    found: list = []
    rgbs: list = []
    t = 0.0
    shape = None
    for _, yuv in iter_frames(vplan, 0, n):
        shape = i420_shape(yuv)
        rgbs.append(i420_to_rgb(yuv, vplan.yuv_matrix, det.size_for(*shape)))  # as the product reads it
        if len(rgbs) % batch == 0:
            t0 = time.perf_counter()
            found += det.detect(rgbs[-batch:], floor=det.track_score, shape=shape)
            t += time.perf_counter() - t0
    if len(found) < len(rgbs):
        t0 = time.perf_counter()
        found += det.detect(rgbs[len(found):], floor=det.track_score, shape=shape)
        t += time.perf_counter() - t0
    return found, {"frames": n, "size": f"{vplan.width}x{vplan.height}",
                   "detect_s_per_frame": round(t / max(1, n), 4)}, rgbs, det, shape


def track(found: list, every: int, refine: str = "regions", search=None,
          size: tuple[int, int] = (0, 0), confirm_score: float = 0.0) -> tuple[list[list], set[int], dict]:
    """The tracker's final faces per frame when only every ``every``-th frame (and the last) is
    detected, as ``process_range`` does. Between two detected frames whose faces differ
    (``track.gap_regions``) ``refine`` "regions" searches the frames in between around the
    faces that appeared or vanished (``search(i, regions)`` in frames of ``size`` (h, w), as
    the pipeline), "frames" takes their whole-frame detections, "none" interpolates.
    ``confirm_score``: the tracker's and the searches' (the detector's min_score, as the
    pipeline; ``found`` holds faces down to its track_score). Returns the faces, the frames
    detected whole or searched, and the search time."""
    from pipeline.track import FaceTracker, gap_regions

    tr = FaceTracker(confirm_score=confirm_score)
    n = len(found)
    prev: int | None = None
    detected: set[int] = set()
    out: list = []
    gap: list[int] = []
    timing = {"searched": 0, "search_s": 0.0}
    for i in range(n):
        if not (i % every == 0 or i == n - 1):
            gap.append(i)
            continue
        faces = [_copy(f) for f in found[i]]
        fill: dict = {}
        if gap and refine != "none":
            regions = gap_regions(None if prev is None else (prev, found[prev]), i, found[i], gap[0],
                                  size[1], size[0], confirm_score)
            if regions and refine == "frames":
                fill = {g: found[g] for g in gap}
            elif regions:
                t0 = time.perf_counter()
                fill = {g: search(g, regions) for g in gap}
                timing["search_s"] += time.perf_counter() - t0
                timing["searched"] += len(gap)
        for g in gap:
            tr.add(g, [_copy(f) for f in fill[g]] if g in fill else None)
            detected.update([g] if g in fill else [])
        tr.add(i, faces)
        detected.add(i)
        gap = []
        prev = i
        out += tr.pop_ready()
    out += tr.pop_ready(final=True)
    assert [i for i, _ in out] == list(range(n))
    timing["search_s"] = round(timing["search_s"], 3)
    return [fs for _, fs in out], detected, timing


def _copy(f):
    from pipeline.faces import Face

    return Face(box=f.box.copy(), landmarks=f.landmarks.copy(), score=f.score)


def _match(ref: list, got: list, min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    from pipeline.track import iou

    pairs = sorted(((iou(a.box, b.box), ri, gi) for ri, a in enumerate(ref) for gi, b in enumerate(got)),
                   reverse=True)
    used_r, used_g, out = set(), set(), []
    for s, ri, gi in pairs:
        if s < min_iou:
            break
        if ri in used_r or gi in used_g:
            continue
        used_r.add(ri)
        used_g.add(gi)
        out.append((ri, gi, s))
    return out


def compare(ref: list[list], got: list[list], detected: set[int]) -> dict:
    """Figures of ``got`` (one K) against ``ref`` (K = 1), frame by frame."""
    n_ref = sum(map(len, ref))
    n_got = sum(map(len, got))
    matched = 0
    ious, ious_interp, nme = [], [], []
    track_frames: dict[int, list[int]] = {}  # reference track -> [frames, matched frames]
    for i, (rf, gf) in enumerate(zip(ref, got)):
        m = _match(rf, gf)
        matched += len(m)
        for f in rf:
            track_frames.setdefault(f.track, [0, 0])[0] += 1
        for ri, gi, s in m:
            track_frames[rf[ri].track][1] += 1
            ious.append(s)
            if i not in detected:
                ious_interp.append(s)
                a, b = rf[ri].landmarks, gf[gi].landmarks
                iod = max(1e-6, float(np.linalg.norm(a[1] - a[0])))
                nme.append(float(np.linalg.norm(a - b, axis=1).mean()) / iod)
    tracks = [v for v in track_frames.values() if v[0] >= 3]
    found = sum(1 for v in tracks if v[1] >= 0.9 * v[0])

    def stat(xs, f, nd=4):
        return round(float(f(xs)), nd) if xs else None

    return {
        "faces": n_got, "faces_per_frame": round(n_got / max(1, len(ref)), 3),
        "recall": round(matched / max(1, n_ref), 4), "precision": round(matched / max(1, n_got), 4),
        "tracks": len(tracks), "tracks_found": round(found / max(1, len(tracks)), 4),
        "iou_mean": stat(ious, np.mean), "iou_p5": stat(ious, lambda x: np.percentile(x, 5)),
        "iou_min": stat(ious, np.min),
        "interpolated_faces": len(ious_interp),
        "iou_interp_mean": stat(ious_interp, np.mean),
        "iou_interp_p5": stat(ious_interp, lambda x: np.percentile(x, 5)),
        "lm_nme_mean": stat(nme, np.mean), "lm_nme_p95": stat(nme, lambda x: np.percentile(x, 95)),
    }


def quality(clip: Path, frames: int | None = 60, every=(1, 2, 3), refine: str = "regions", **kw) -> dict:
    found, info, rgbs, det, shape = detect_all(Path(clip), frames, **kw)

    def search(i: int, regions) -> list:
        return det.detect_regions(rgbs[i], regions, floor=det.track_score, shape=shape)

    ref, _, _ = track(found, 1, confirm_score=det.min_score)
    res = {"input": str(clip), **info, "refine": refine, "ref_faces": sum(map(len, ref)),
           "ref_faces_per_frame": round(sum(map(len, ref)) / max(1, len(ref)), 3), "every": {}}
    for k in every:
        got, detected, timing = track(found, k, refine, search, shape or (0, 0),
                                      det.min_score)
        res["every"][str(k)] = {"detected_frames": len(detected), **timing, **compare(ref, got, detected)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--every", default="1,2,3", help="comma list of K")
    ap.add_argument("--min-face", type=int, default=40)
    ap.add_argument("--detect-side", type=int, default=960)
    ap.add_argument("--refine", choices=("regions", "frames", "none"), default="regions",
                    help="between detected frames whose faces differ: search around the faces "
                         "that changed (the pipeline), detect the whole frames, or interpolate")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = quality(a.input, a.frames, [int(k) for k in a.every.split(",")], a.refine,
                  min_face=a.min_face, max_side=a.detect_side)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            if k != "every":
                print(f"{k:>20}: {v}")
        for k, v in res["every"].items():
            print(f"{'every ' + k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
