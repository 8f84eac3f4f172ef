"""Evaluate a task's shipped network against the degraded input and a classical baseline.

    python -m models.training.evaluate --task denoise                 # validation split of the crop cache
    python -m models.training.evaluate --task unmask --data DIR --limit 100 --json
    python -m models.training.evaluate --task enhance --whole    # the dataset's framing: whole photo at 128
    python -m models.training.evaluate --task unmask --whole     # masks on whole photos, full pipeline
    python -m models.training.evaluate --task unmask --whole --mask reference   # the dataset's reference polygon

Faces are aligned to 128x128 crops exactly as at inference (FaceDetector + pipeline.align), then
degraded by the task's fixed evaluation degradation (``models.training.degrade.degrade_eval``, seed 0 per
image, so every run gives the same numbers). PSNR (RGB, whole crop, data range 255) is the mean
over crops of per-crop PSNR; SSIM is pytorch_msssim.ssim (11x11 Gaussian window, sigma 1.5)
averaged over crops.

``--whole`` scores whole photos resized to 128x128, the framing of ../shared/data/README.md's
reference figures. Denoise and enhance are local, so their network runs on the resized photo
directly. Unmask's network needs an aligned face, so there each mask is drawn in the aligned
crop of the face found on the clean photo and warped onto the photo, and the product's own path
runs on the masked photo: detection (``FaceDetector.MASKED``, on the masked face), alignment,
the network, and the blended paste-back of a replacing task. A face the detector misses counts
with its masked input. ``--mask reference`` instead covers each photo with the dataset reference's
"lower-face polygon filled with a flat colour", reconstructed (``REFERENCE_POLYGON``): a fixed
polygon over mouth and chin, 20 % of the photo, filled with RGB (150, 170, 190). On the first 300
validation faces it gives 17.6 dB for the filled photo and 22.9 for Telea, where the README says
17.5 and 23.0.

Baselines: denoise = cv2.fastNlMeansDenoisingColored(h=15, hColor=15); enhance = bicubic (the
degraded input itself); unmask = cv2.inpaint Telea (radius 3) given the true mask.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from . import data as D
from .degrade import canonical, degrade_batch

log = logging.getLogger(__name__)

SEED = 0
NLM = {"h": 15, "hColor": 15, "templateWindowSize": 7, "searchWindowSize": 21}
BASELINES = {"denoise": "nlm", "enhance": "bicubic", "restore": "nlm", "unmask": "telea"}


def scores(out: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Mean per-crop PSNR (dB, data range 255) and mean SSIM of uint8 (N, H, W, 3) arrays."""
    a = torch.from_numpy(out).permute(0, 3, 1, 2).double()
    b = torch.from_numpy(clean).permute(0, 3, 1, 2).double()
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    p = 10 * torch.log10(255.0**2 / mse)
    from pytorch_msssim import ssim  # here: a GPU image without it still runs parity and the CUDA tests

    s = ssim(a.float(), b.float(), data_range=255, size_average=False)
    return {"psnr": round(float(p.mean()), 3), "ssim": round(float(s.mean()), 4)}


def baseline(task: str, bad: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
    """The classical answer to ``task`` for each degraded crop."""
    if task in ("denoise", "restore"):
        return np.stack([cv2.fastNlMeansDenoisingColored(im, None, NLM["h"], NLM["hColor"],
                                                         NLM["templateWindowSize"],
                                                         NLM["searchWindowSize"]) for im in bad])
    if task == "enhance":
        return bad.copy()
    return np.stack([cv2.inpaint(im, m, 3, cv2.INPAINT_TELEA) for im, m in zip(bad, masks)])


def run_model(model: torch.nn.Module, images: np.ndarray, device: str = "cpu", batch: int = 32) -> np.ndarray:
    """``model`` over uint8 (N, H, W, 3) crops -> uint8 crops (rounded)."""
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = D.to_tensor(images[i : i + batch]).to(device)
            dtype = next(model.parameters()).dtype
            outs.append(D.to_uint8(model(x.to(dtype)).float()))
    return np.concatenate(outs)


def evaluate(
    task: str, crops: np.ndarray, *, model: torch.nn.Module | None = None, device: str = "cpu",
    seed: int = SEED,
) -> dict:
    """Scores of the degraded input, the baseline and the model on clean uint8 crops."""
    from .. import load

    task = canonical(task)
    bad, masks = degrade_batch(task, crops, seed=seed, evaluation=True)
    model = model if model is not None else load(task, device=device)
    out = run_model(model, bad, device)
    base = baseline(task, bad, masks)
    result = {
        "task": task,
        "n": int(len(crops)),
        "size": int(crops.shape[1]),
        "seed": seed,
        "input": scores(bad, crops),
        "baseline": {"name": BASELINES[task], **scores(base, crops)},
        "model": scores(out, crops),
    }
    if masks is not None:  # inside the mask alone: where the work is
        inside = masks > 0
        def masked_psnr(x: np.ndarray) -> float:
            err = (x.astype(np.float64) - crops) ** 2
            mse = np.array([e[m].mean() for e, m in zip(err, inside)])
            return round(float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))), 3)
        result["mask_psnr"] = {"input": masked_psnr(bad), "baseline": masked_psnr(base),
                               "model": masked_psnr(out)}
    return result


def whole_photos(data: Path | None, limit: int | None) -> tuple[np.ndarray, str]:
    """Whole photos resized to 128x128 (INTER_AREA), no detection or alignment: the framing of
    the reference figures in ../shared/data/README.md (UTKFace photos are already centred)."""
    if data is None:
        paths = [p for p in D.list_images(D.UTKFACE_DIR) if D.is_val(p.name)]
        source = f"validation split of {D.UTKFACE_DIR}, whole photos resized"
    else:
        paths, source = D.list_images(data), f"{data}, whole photos resized"
    ims = [im for im in (D.read_rgb(p) for p in paths[:limit]) if im is not None]
    if not ims:
        raise SystemExit(f"{source.split(',')[0]}: no readable photos")
    size = D.CROP_SIZE
    crops = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in ims])
    return crops, source


def mask_photo(photo: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator,
               size: int = D.CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``photo`` (H, W, 3 uint8) with a synthetic face mask over the face at ``landmarks``: the
    mask is drawn in the face's aligned crop, as in training, and warped onto the photo. A face
    smaller than the crop gets the mask area-filtered down to its size first, as a camera
    integrates over each pixel: warped straight down, a thin strap would come out dashed and a
    fine weave as moire. Returns (masked photo, alpha (H, W) float32)."""
    from pipeline import align

    from .degrade import draw_mask

    m = align.estimate_transform(landmarks, size)  # photo -> aligned crop
    colour, alpha = draw_mask(size, rng)
    k = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # crop pixels per photo pixel
    if k > 1.0:
        small = max(1, round(size / k))
        colour = cv2.resize(colour, (small, small), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(alpha, (small, small), interpolation=cv2.INTER_AREA)
        m = np.diag([small / size, small / size]) @ m  # photo -> the shrunken crop
    h, w = photo.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # sample the crop at m(photo pixel)
    alpha = cv2.warpAffine(alpha, m, (w, h), flags=flags, borderValue=0)
    colour = cv2.warpAffine(colour, m, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    masked = np.clip(np.rint(photo * (1 - alpha[..., None]) + colour * alpha[..., None]), 0, 255)
    return masked.astype(np.uint8), alpha


# The dataset's unmask reference (../shared/data/README.md), reconstructed: its figures (flat fill 17.5 dB, Telea 23.0)
# are reproduced within 0.1 dB by this polygon and colour on UTKFace photos resized to 128x128.
REFERENCE_POLYGON = np.array([[24, 80], [104, 80], [108, 100], [84, 124], [44, 124], [20, 100]])
REFERENCE_COLOUR = (150, 170, 190)


def reference_mask_photo(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``photo`` (a whole photo resized to 128x128) covered by ``REFERENCE_POLYGON`` in
    ``REFERENCE_COLOUR``. Returns (masked photo, alpha (H, W) float32 0/1)."""
    h, w = photo.shape[:2]
    scale = np.array([w, h]) / D.CROP_SIZE
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(REFERENCE_POLYGON * scale).astype(np.int32)], 255)
    masked = photo.copy()
    masked[m > 0] = REFERENCE_COLOUR
    return masked, (m > 0).astype(np.float32)


def whole_unmask(data: Path | None, limit: int | None, *, model: torch.nn.Module | None = None,
                 device: str = "cpu", seed: int = SEED, mask: str = "generator") -> dict:
    """Unmask scored on whole photos at 128x128 (see the module docstring). mask: "generator"
    (the training generator's masks, seeded per photo) or "reference" (``reference_mask_photo``)."""
    if mask not in ("generator", "reference"):
        raise ValueError(f"mask must be 'generator' or 'reference', not {mask!r}")
    from pipeline import align
    from pipeline.faces import FaceDetector
    from pipeline.restore import FaceRestorer

    from .. import load

    model = model if model is not None else load("unmask", device=device)
    if not hasattr(model, "spec"):  # a bare network: run it as the product does
        from ..registry import Restorer
        from ..tasks import TASKS

        model = Restorer(TASKS[canonical("unmask")], model)
    crops, source = whole_photos(data, None)
    detector = FaceDetector(device=device, min_face=24)  # clean photos: where the face is
    masked_detector = FaceDetector(device=device, min_face=24, **FaceDetector.MASKED)  # as the product
    restorer = FaceRestorer(model, device=device)
    size = D.CROP_SIZE
    clean, bad, masks, outs = [], [], [], []
    found = 0
    for i, img in enumerate(crops):
        if limit and len(clean) >= limit:
            break
        faces = detector.detect([img])[0]  # one look: the set of photos stays the same
        if not faces:  # as for aligned crops: a photo without a detectable face is skipped
            continue
        if mask == "reference":
            masked, alpha = reference_mask_photo(img)
        else:
            masked, alpha = mask_photo(img, faces[0].landmarks, np.random.default_rng([seed, i]))
        out = masked.copy()
        seen = masked_detector.detect_image(masked)
        found += bool(seen)
        for rect, d in restorer.deltas([masked], [seen])[0]:
            align.add_delta(out, rect, np.ascontiguousarray(d))
        clean.append(img)
        bad.append(masked)
        masks.append(np.where(alpha > 0.02, 255, 0).astype(np.uint8))
        outs.append(out)
    if not clean:
        raise SystemExit(f"{source}: no faces found")
    clean_a, bad_a, masks_a, out_a = map(np.stack, (clean, bad, masks, outs))
    base = baseline("unmask", bad_a, masks_a)
    return {
        "task": "unmask", "n": len(clean), "size": size, "seed": seed, "framing": "whole",
        "mask": "reference polygon" if mask == "reference" else "generator",
        "detected_masked": found,
        "input": scores(bad_a, clean_a),
        "baseline": {"name": BASELINES["unmask"], **scores(base, clean_a)},
        "model": scores(out_a, clean_a),
        "data": source,
    }


def crops_from(data: Path | None, limit: int | None) -> tuple[np.ndarray, str]:
    """Clean crops to evaluate on and a description of where they came from."""
    if data is None:
        try:
            crops, _ = D.load_cache("val")
            source = f"validation split of {D.CACHE_DIR}"
        except FileNotFoundError:
            paths = [p for p in D.list_images(D.UTKFACE_DIR) if D.is_val(p.name)]
            if limit:
                paths = paths[: int(limit * 1.1) + 5]
            crops, _ = D.make_crops(paths)
            source = f"validation split of {D.UTKFACE_DIR} (no cache)"
    else:
        paths = D.list_images(data)
        if limit:
            paths = paths[: int(limit * 1.2) + 5]  # a few photos may hold no detectable face
        crops, _ = D.make_crops(paths)
        source = str(data)
    if limit:
        crops = crops[:limit]
    if len(crops) == 0:
        raise SystemExit(f"{source}: no faces found")
    return crops, source


def make_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.training.evaluate", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m models.training.evaluate --task denoise --json\n"
               "  python -m models.training.evaluate --task unmask --data ../shared/data/scenes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help="denoise, enhance (deblur) or unmask")
    p.add_argument("--data", type=Path, default=None,
                   help="folder of face photos (default: validation split of the crop cache)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N crops")
    p.add_argument("--weights", type=Path, default=None,
                   help="a .safetensors file instead of the shipped weights")
    p.add_argument("--whole", action="store_true",
                   help="resize whole photos to 128x128 instead of detecting and aligning faces"
                        " (the framing of the dataset's reference figures)")
    p.add_argument("--mask", choices=("generator", "reference"), default="generator",
                   help="unmask --whole: the training generator's masks (default) or the dataset"
                        " reference's flat lower-face polygon, reconstructed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> None:
    a = make_argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    model = None
    if a.weights is not None:
        from ..nets import load_net
        from ..registry import Restorer
        from ..tasks import resolve

        # run as the product runs the task's network (unmask: with its mirror self-ensemble)
        model = Restorer(resolve(a.task), load_net(a.weights, device=a.device)).eval()
    if a.data is not None and not a.data.is_dir():
        raise SystemExit(f"{a.data}: no such folder of face photos")
    if a.mask != "generator" and not (a.whole and canonical(a.task) == "unmask"):
        raise SystemExit("--mask reference goes with --task unmask --whole")
    if a.whole and canonical(a.task) == "unmask":
        r = whole_unmask(a.data, a.limit, model=model, device=a.device, mask=a.mask)
        source = r["data"]
    else:
        crops, source = whole_photos(a.data, a.limit) if a.whole else crops_from(a.data, a.limit)
        r = evaluate(a.task, crops, model=model, device=a.device)
        r["data"] = source
    if a.json:
        print(json.dumps(r))
        return
    what = "whole photos" if r.get("framing") == "whole" else "crops"
    print(f"{r['task']}: {r['n']} {what} {r['size']}x{r['size']} from {source}")
    for name in ("input", "baseline", "model"):
        label = f"baseline ({r['baseline']['name']})" if name == "baseline" else name
        print(f"  {label:<20} PSNR {r[name]['psnr']:6.2f} dB   SSIM {r[name]['ssim']:.4f}")
    if "mask_psnr" in r:
        m = r["mask_psnr"]
        print(f"  inside the mask: input {m['input']:.2f}, baseline {m['baseline']:.2f}, "
              f"model {m['model']:.2f} dB")
    if "detected_masked" in r:
        print(f"  faces found on the masked photos: {r['detected_masked']} of {r['n']}")


if __name__ == "__main__":
    sys.exit(main())
