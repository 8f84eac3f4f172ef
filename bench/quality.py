"""The product's quality as a user gets it: degrade real clips and photos, run the CLI, score the file.

    python -m bench.quality [--quick] [--json] [--tasks denoise,enhance] [--sources closeup,scenes]
        [--degradations clean,noise20] [--frames N] [--crf 0] [--out DIR] [--sheets DIR] [--strength S]

For each source (``SOURCES``: real clips and photos from ``../shared/data``) the clean frames are
decoded as the pipeline decodes them, faces are found on them (the product's detector and
settings), and each case (``CASES``: a task and a seeded degradation) is run:
1. the degraded frames are stored losslessly (a clip: H.264 at CRF 0 in the clip's own YUV
   matrix and timing; photos: PNG in a folder);
2. ``cli.main(["submit", ...])`` restores them, the same code path as ``cli.py submit`` (the
   embedded job), and the output file is decoded again;
3. the output is scored against the clean frames over each face's head (forehead to chin,
   cheek to cheek: the detector's box grown by ``quality_score.HEAD``): PSNR and SSIM; PSNR
   outside the heads against the degraded input (a plain re-encode leaves those pixels as they
   were); flicker, the mean absolute frame-to-frame change inside the heads, as a ratio to the
   clean clip's (``bench.quality_score``).
Beside the output, on the same heads: the degraded input; the classical filter a user could run
instead (OpenCV's non-local means, unsharp mask, Telea given the mask); and the network alone on
an axis-aligned crop of each head at the frame's own resolution (nothing resampled, no
paste-back; restoration tasks only). The degradations, filters and the network alone live in
``bench.quality_inputs``.

Prints one table; ``--json`` prints one object. ``--quick`` is a cut small enough for a test.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .quality_inputs import (STRAP, ceiling, classical, degrade, read_clip, read_photo, read_rgb_clip, write_clip,
                             write_photo)
from .quality_score import head_box, mask_psnr, score, sharpness_ratio, write_areas

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Source:
    name: str
    path: str  # under DATA; a folder of photos or a clip
    frames: int  # clips: frames used (the first N)
    quick_frames: int = 0


SOURCES = (
    Source("walking", "videos/walking_1080p.mp4", 8),
    Source("closeup", "videos/closeup_pexels.mp4", 12, 6),
    Source("selfie", "videos/selfie_mp3audio.mp4", 12),
    Source("scenes", "scenes", 0),
)
SCENE_PHOTOS = ("facenetpt_multiface.jpg", "facerec_obama_partial_face.jpg", "facerec_two_people.jpg",
                "pyfeat_multi_face.jpg", "pyfeat_single_face.jpg")
# boxes (x0, y0, x1, y1) the detector takes for faces on a clean photo that are none: not scored
# (a face restorer that rightly leaves them alone on the degraded photo would score as the input)
NOT_FACES = {"facerec_obama_partial_face.jpg": ((359, 993, 413, 1053),)}  # a dark desk chair, 0.95


@dataclass(frozen=True)
class Case:
    task: str
    degradation: str  # see ``quality_inputs.degrade``
    classical: str  # see ``quality_inputs.classical``


CASES = (
    Case("denoise", "noise10", "nlmeans"),
    Case("denoise", "noise20", "nlmeans"),
    Case("denoise", "noise30", "nlmeans"),
    Case("denoise", "jpeg20", "nlmeans"),
    Case("denoise", "h264crf40", "nlmeans"),
    Case("enhance", "down2", "unsharp"),
    Case("enhance", "down4", "unsharp"),
    Case("enhance", "blur2", "unsharp"),
    Case("denoise", "mix", "nlmeans"),
    Case("enhance", "mix", "unsharp"),
    Case("restore", "mix", "nlmeans"),
    Case("restore", "noise20", "nlmeans"),
    Case("restore", "jpeg20", "nlmeans"),
    Case("restore", "h264crf40", "nlmeans"),
    Case("restore", "down4", "unsharp"),
    Case("restore", "blur2", "unsharp"),
    Case("unmask", "mask", "telea"),
    Case("identity", "noise20", "none"),
    # an undamaged face: how much of its own texture a task takes away (the input scores 99)
    Case("denoise", "clean", "none"),
    Case("enhance", "clean", "none"),
    Case("restore", "clean", "none"),
)
STRENGTH_TASKS = ("denoise", "enhance", "restore")  # the tasks ``--strength`` applies to
QUICK = {("closeup", "denoise", "noise20"), ("closeup", "enhance", "down4"), ("closeup", "unmask", "mask"),
         ("closeup", "identity", "noise20"), ("closeup", "restore", "mix"), ("closeup", "denoise", "mix"),
         ("scenes", "unmask", "mask")}


# ---------------------------------------------------------------------------------------------
# running the product


def submit(path: Path, out: Path, task: str, crf: int, strength: float = 1.0) -> None:
    """``cli.py submit`` in this process, embedded (no broker); ``--strength`` where it is not 1
    and the task takes it (denoise, enhance, restore)."""
    sys.path.insert(0, str(ROOT))
    import cli

    args = ["submit", str(path), "--task", task, "-o", str(out), "--overwrite", "-q", "--crf", str(crf)]
    if strength != 1.0 and task in STRENGTH_TASKS:
        args += ["--strength", str(strength)]
    with _no_broker(), contextlib.redirect_stdout(sys.stderr):  # stdout is the bench's
        rc = cli.main(args)
    if rc != 0:
        raise SystemExit(f"cli {' '.join(args)} exited {rc}")


@contextlib.contextmanager
def _no_broker():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in ("FACEMEND_BROKER", "CELERY_BROKER_URL")}
    try:
        yield
    finally:
        os.environ.update(saved)


def load_source(src: Source, quick: bool, frames: int | None):
    """(kind, clean frames, faces per frame, heads per frame, writer, reader) for a source."""
    from pipeline.faces import FaceDetector
    from pipeline.track import iou

    det = FaceDetector()
    path = DATA / src.path
    if path.is_dir():
        names = SCENE_PHOTOS[:1] if quick else SCENE_PHOTOS
        clean = [read_photo(path / n) for n in names]
        faces = [[f for f in det.detect_image(img) if not any(iou(f.box, b) > 0.5 for b in NOT_FACES.get(n, ()))]
                 for n, img in zip(names, clean)]
        kind = "photos"
        ctx = names
    else:
        n = frames or (src.quick_frames if quick else src.frames)
        vplan, clean, yuvs = read_clip(path, n)
        faces = det.detect(clean)
        kind = "clip"
        ctx = (vplan, yuvs)
    heads = [[head_box(f, img.shape) for f in fs] for img, fs in zip(clean, faces)]
    return kind, clean, faces, heads, ctx


def run_case(src: Source, case: Case, kind: str, clean, faces, heads, ctx, work: Path, crf: int,
             sheets: Path | None = None, strength: float = 1.0) -> dict:
    bad, masks = degrade(case.degradation, clean, faces)
    tag = f"{src.name}.{case.task}.{case.degradation}"
    t0 = time.perf_counter()
    if kind == "clip":
        vplan, yuvs = ctx
        given_path = work / f"{tag}.in.mp4"
        write_clip(given_path, vplan, yuvs, bad, clean)
        given = read_rgb_clip(given_path, len(clean))
        out_path = work / f"{tag}.out.mp4"
        t0 = time.perf_counter()
        submit(given_path, out_path, case.task, crf, strength)
        seconds = time.perf_counter() - t0
        out = read_rgb_clip(out_path, len(clean))
        if len(out) != len(clean):
            raise SystemExit(f"{out_path}: {len(out)} frames, expected {len(clean)}")
    else:
        folder = work / f"{tag}.in"
        folder.mkdir(parents=True, exist_ok=True)
        for name, b in zip(ctx, bad):
            write_photo(folder / (Path(name).stem + ".png"), b)
        given = [read_photo(folder / (Path(name).stem + ".png")) for name in ctx]
        out_dir = work / f"{tag}.out"
        t0 = time.perf_counter()
        submit(folder, out_dir, case.task, crf, strength)
        seconds = time.perf_counter() - t0
        out = [read_photo(out_dir / (Path(name).stem + ".png")) for name in ctx]
    video = kind == "clip"
    row = {
        "source": src.name, "task": case.task, "degradation": case.degradation,
        "frames": len(clean), "seconds": round(seconds, 1),
        "clean": {"flicker": 1.0} if video else {},
        "input": score(given, clean, heads, video=video),
        "classical": {"name": case.classical,
                      **score(classical(case.classical, case.degradation, given, heads, masks), clean, heads,
                              video=video)},
        "facemend": score(out, clean, heads, given, video=video, areas=write_areas(case.task, clean, faces)),
    }
    ceil = ceiling(case.task, given, heads)
    row["ceiling"] = score(ceil, clean, heads, video=video) if ceil is not None else None
    if case.task == "identity":
        row["identity_exact"] = all(np.array_equal(a, b) for a, b in zip(out, given))
    if masks is not None:
        telea = classical("telea", "", given, heads, masks)
        versions = (("input", given), ("classical", telea), ("facemend", out))
        row["mask_psnr"] = {k: mask_psnr(v, clean, masks) for k, v in versions}
        row["strap_psnr"] = {k: mask_psnr(v, clean, masks, STRAP) for k, v in versions}
        # the input's own: the mask's texture; the others': what they painted
        row["sharpness"] = {k: sharpness_ratio(v, clean, masks, None if k == "input" else given)
                            for k, v in versions}
    if sheets is not None:
        write_sheet(sheets / f"{tag}.png", clean, given, out, heads, video=video)
    return row


def write_sheet(path: Path, clean, given, out, heads, video: bool = True, size: int = 256) -> None:
    """Rows of (clean, degraded, facemend) head crops at ``size`` px high, each head with as much
    again around it so the feathered edge of the paste is in view. A clip: its last frame's
    heads (its output there has been through every frame before it), four at most, largest
    first. Photos: every photo's heads, 16 at most, two to a row at half the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    triplets = []
    for k in (reversed(range(len(clean))) if video else range(len(clean))):
        for x0, y0, x1, y1 in sorted(heads[k], key=lambda b: -(b[2] - b[0])):
            H, W = clean[k].shape[:2]
            mx, my = (x1 - x0) // 4, (y1 - y0) // 4
            x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(W, x1 + mx), min(H, y1 + my)
            tiles = []
            h = size if video else size // 2
            for im in (clean[k], given[k], out[k]):
                crop = im[y0:y1, x0:x1]
                w = max(1, round(crop.shape[1] * h / crop.shape[0]))
                flag = cv2.INTER_NEAREST if crop.shape[0] < h else cv2.INTER_AREA
                tiles.append(cv2.resize(crop, (w, h), interpolation=flag))
            triplets.append(cv2.copyMakeBorder(np.hstack(tiles), 0, 4, 0, 8, cv2.BORDER_CONSTANT))
        if video and triplets:
            break
    triplets = triplets[: 4 if video else 16]
    if not triplets:
        return
    per = 1 if video else 2
    width = max(t.shape[1] for t in triplets)
    pad = [cv2.copyMakeBorder(t, 0, 0, 0, width - t.shape[1], cv2.BORDER_CONSTANT) for t in triplets]
    pad += [np.zeros_like(pad[0])] * (-len(pad) % per)
    write_photo(path, np.vstack([np.hstack(pad[i : i + per]) for i in range(0, len(pad), per)]))


def run(quick: bool = False, tasks: list[str] | None = None, sources: list[str] | None = None,
        frames: int | None = None, crf: int = 0, out: Path | None = None, sheets: Path | None = None,
        degradations: list[str] | None = None, strength: float = 1.0) -> dict:
    import torch

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="facemend-quality-") as tmp:
        work = Path(out) if out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for src in SOURCES:
            if sources and src.name not in sources:
                continue
            cases = [c for c in CASES if (not tasks or c.task in tasks)
                     and (not degradations or c.degradation in degradations)
                     and (not quick or (src.name, c.task, c.degradation) in QUICK)]
            if not cases:
                continue
            loaded = load_source(src, quick, frames)
            for case in cases:
                rows.append(run_case(src, case, *loaded, work, crf, sheets, strength))
                logging.getLogger(__name__).info("%s", rows[-1])
    return {"rows": rows, "pooled": pooled(rows), "quick": quick, "crf": crf, "strength": strength,
            "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}


UNMASK_FIGURES = ("mask_psnr", "strap_psnr", "sharpness")  # run_case's {column: value} figures


def pooled(rows: list[dict]) -> list[dict]:
    """One row per task and degradation over every source: each column's face PSNR averaged over
    all the faces it scored (the per-face mean, as within a source), flicker over the clips, and
    unmask's figures (``UNMASK_FIGURES``) weighted by the faces alike."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        p = out.setdefault((r["task"], r["degradation"]), {"task": r["task"], "degradation": r["degradation"],
                                                            "sources": [], "_sum": {}})
        p["sources"].append(r["source"])

        def add(where: tuple[str, str], value, n: int) -> None:
            if value is not None and value == value and n:  # NaN: nothing to pool
                s, k = p["_sum"].get(where, (0.0, 0))
                p["_sum"][where] = (s + value * n, k + n)

        for col in ("input", "classical", "facemend", "ceiling"):
            c = r.get(col) or {}
            for key in ("psnr", "flicker"):
                add((col, key), c.get(key), c.get("faces") or r["facemend"]["faces"] or 0)
        for key in UNMASK_FIGURES:
            for col, v in (r.get(key) or {}).items():
                add((key, col), v, r["facemend"]["faces"] or 0)
        p["classical_filter"] = r["classical"]["name"]
    for p in out.values():
        sums = p.pop("_sum")
        means = {where: round(s / k, 3 if "flicker" in where or "sharpness" in where else 2)
                 for where, (s, k) in sums.items()}
        for col in ("input", "classical", "facemend", "ceiling"):
            p[col] = {key: means[(col, key)] for key in ("psnr", "flicker") if (col, key) in means}
        for key in UNMASK_FIGURES:
            got = {col: v for (name, col), v in means.items() if name == key}
            if got:
                p[key] = got
        p["faces"] = sums.get(("facemend", "psnr"), (0, 0))[1]
    return list(out.values())


def table(result: dict) -> str:
    head = ("source", "task", "degradation", "faces", "input", "classical", "facemend", "ceiling",
            "ssim", "outside", "flicker")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        f = r["facemend"]
        ceil = r["ceiling"]["psnr"] if r["ceiling"] else None
        cl = r["classical"]
        lines.append(" | ".join(str(x) for x in (
            r["source"], r["task"], r["degradation"], f["faces"], r["input"]["psnr"],
            f"{cl['psnr']} ({cl['name']})" if cl["name"] != "none" else "-", f["psnr"],
            ceil if ceil is not None else "-", f["ssim"], f.get("outside_psnr"),
            f"{f['flicker']} (input {r['input']['flicker']})" if "flicker" in f else "-")))
        if "mask_psnr" in r:
            m = r["mask_psnr"]
            lines[-1] += f"  [inside the mask: input {m['input']}, Telea {m['classical']}, facemend {m['facemend']}]"
            for key, what in (("strap_psnr", "on the straps"), ("sharpness", "sharpness ratio")):
                v = r.get(key)
                if v:
                    lines[-1] += f" [{what}: input {v['input']}, Telea {v['classical']}, facemend {v['facemend']}]"
    for p in result.get("pooled", []):
        if len(p["sources"]) > 1:
            f, fl = p["facemend"], p["facemend"].get("flicker")
            lines.append(" | ".join(str(x) for x in (
                "all", p["task"], p["degradation"], p["faces"], p["input"].get("psnr"),
                p["classical"].get("psnr", "-"), f.get("psnr"), p["ceiling"].get("psnr", "-"), "", "",
                f"{fl} (input {p['input'].get('flicker')})" if fl is not None else "-")))
            for key, what in zip(UNMASK_FIGURES, ("inside the mask", "on the straps", "sharpness ratio")):
                if key in p:
                    v = p[key]
                    lines[-1] += (f" [{what}: input {v.get('input')}, Telea {v.get('classical')},"
                                  f" facemend {v.get('facemend')}]")
    return "\n".join(lines)


def make_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small cut (one clip, six cases) for tests")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tasks", help="comma-separated tasks (default: all)")
    p.add_argument("--sources", help=f"comma-separated sources: {', '.join(s.name for s in SOURCES)}")
    p.add_argument("--degradations", help="comma-separated degradations (default: all)")
    p.add_argument("--frames", type=int, help="frames per clip (default: each source's)")
    p.add_argument("--crf", type=int, default=0, help="the output's CRF (default 0: lossless)")
    p.add_argument("--out", type=Path, help="keep the degraded inputs and outputs in this folder")
    p.add_argument("--sheets", type=Path, help="write a before/after sheet per row into this folder")
    p.add_argument("--strength", type=float, default=1.0,
                   help=f"the CLI's --strength for {', '.join(STRENGTH_TASKS)} (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_argument_parser().parse_args(argv)
    split = lambda s: s.split(",") if s else None  # noqa: E731
    result = run(args.quick, split(args.tasks), split(args.sources), args.frames, args.crf, args.out,
                 args.sheets, split(args.degradations), args.strength)
    result["command"] = "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
