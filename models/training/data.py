"""Training and evaluation data: aligned 128x128 face crops built from folders of photos.

Crops are made exactly as at inference time: ``pipeline.faces.FaceDetector`` (MTCNN, batched)
finds the largest face, ``pipeline.align`` warps it to the template crop. The UTKFace crops are
built once and cached as ``crops.npy`` (N, 128, 128, 3) uint8 plus ``index.json`` (file names and
labels); the train/validation split is a hash of the file name, so it never changes.

    python -m models.training.data                      # build the UTKFace cache under cache/crops
    python -m models.training.data pack                 # cache/crops.pack.npz, <= 28 MiB, for a GPU

A *pack* is a subset of the cache small enough to copy to a GPU machine beside the repository
(28 MiB by default): the 128 validation crops training scores on,
plus a seeded uniform sample of the training split, as many crops as fit (about 4,300 in 28
MiB), each a 4:4:4 JPEG at quality 90 (42 dB from the cached crop, well above the 33 dB the
networks restore to) in one ``.npz`` (no pickles). ``load_cache(split, PACK)`` and
``python -m models.training.train --crops PACK`` read it like the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT.parent / "shared" / "data"
UTKFACE_DIR = DATA_DIR / "faces" / "utkface"
CACHE_DIR = ROOT / "cache" / "crops"
CROP_SIZE = 128
VAL_PER_MILLE = 50  # ~5% of names hash into the validation split
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def cache_dir(height: int = CROP_SIZE) -> Path:
    """Where ``python -m models.training.data`` caches crops ``height`` rows tall: cache/crops for the
    square template crop, cache/crops160 for unmask's 128 x 160 crop."""
    return CACHE_DIR if height == CROP_SIZE else CACHE_DIR.parent / f"crops{height}"


@dataclass(frozen=True)
class Labels:
    """UTKFace labels parsed from ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``."""

    age: int
    gender: int  # 0 male, 1 female
    race: int  # 0..4 White, Black, Asian, Indian, Others


def parse_utkface_name(name: str) -> Labels | None:
    """Labels from a UTKFace file name, None when the name is malformed."""
    parts = name.split("_")
    if len(parts) != 4 or not name.endswith(".jpg.chip.jpg"):
        return None
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not (0 <= age <= 120 and gender in (0, 1) and 0 <= race <= 4):
        return None
    return Labels(age, gender, race)


def is_val(name: str) -> bool:
    """True when ``name`` belongs to the validation split (a stable hash of the file name)."""
    digest = hashlib.sha1(Path(name).name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < VAL_PER_MILLE


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of face photos")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def read_rgb(path: Path) -> np.ndarray | None:
    """An RGB uint8 image, or None when OpenCV cannot read it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def make_crops(
    paths: list[Path],
    *,
    size: int = CROP_SIZE,
    height: int | None = None,
    batch: int = 64,
    detector=None,
    progress=None,
) -> tuple[np.ndarray, list[int]]:
    """Aligned crops of the largest face in each photo: (crops (M, height, size, 3), kept
    indices). ``height`` (default ``size``) adds rows below the square template crop, as the
    product's unmask crop has them (``pipeline.align.warp_face``).

    Photos are grouped by shape so each MTCNN batch holds frames of equal size. ``progress`` is
    called with the number of photos done.
    """
    from pipeline.align import estimate_transform, warp_face
    from pipeline.faces import FaceDetector

    height = height or size
    detector = detector or FaceDetector(min_face=40, batch_size=batch)
    crops: dict[int, np.ndarray] = {}
    pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}
    done = 0

    def flush(key: tuple) -> None:
        nonlocal done
        items = pending.pop(key, [])
        if not items:
            return
        found = detector.detect([im for _, im in items])
        for (i, im), faces in zip(items, found):
            if faces:
                matrix = estimate_transform(faces[0].landmarks, size)
                crops[i] = warp_face(im, matrix, size, height)
        done += len(items)
        if progress is not None:
            progress(done)

    for i, path in enumerate(paths):
        im = read_rgb(path)
        if im is None:
            log.warning("%s: unreadable image, skipped", path)
            done += 1
            continue
        pending.setdefault(im.shape, []).append((i, im))
        if len(pending[im.shape]) >= batch:
            flush(im.shape)
    for key in list(pending):
        flush(key)
    kept = sorted(crops)
    arr = np.stack([crops[i] for i in kept]) if kept else np.zeros((0, height, size, 3), np.uint8)
    return arr, kept


def build_cache(
    src: Path = UTKFACE_DIR, out: Path = CACHE_DIR, *, limit: int | None = None,
    height: int | None = None, size: int = CROP_SIZE,
) -> Path:
    """Build ``out/crops.npy`` and ``out/index.json`` from the UTKFace folder ``src``: crops of
    the ``size`` px template square; with ``height``, that tall (the square and rows below it)."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in Path(src).iterdir() if parse_utkface_name(p.name))
    if limit:
        names = names[:limit]
    paths = [Path(src) / n for n in names]
    t0 = time.time()

    def progress(done: int) -> None:
        rate = done / max(time.time() - t0, 1e-6)
        log.info("crops: %d/%d photos (%.1f/s, eta %.0f s)", done, len(paths), rate,
                 (len(paths) - done) / max(rate, 1e-6))

    crops, kept = make_crops(paths, size=size, height=height, progress=progress)
    index = []
    for i in kept:
        lab = parse_utkface_name(names[i])
        index.append({"file": names[i], "age": lab.age, "gender": lab.gender, "race": lab.race,
                      "val": is_val(names[i])})
    tmp = out / "crops.partial.npy"
    np.save(tmp, crops)
    tmp.rename(out / "crops.npy")
    meta = {"source": str(src), "size": size, "height": int(crops.shape[1]), "photos": len(paths),
            "crops": len(kept), "seconds": round(time.time() - t0, 1), "items": index}
    (out / "index.json").write_text(json.dumps(meta))
    log.info("crops: %d faces from %d photos in %.0f s -> %s", len(kept), len(paths),
             time.time() - t0, out)
    return out


def load_cache(
    split: str, cache: Path = CACHE_DIR, *, mmap: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """Crops and index entries of ``split`` ("train", "val" or "all") from the cache folder, or
    from a pack (a ``.npz`` file from ``pack_crops``).

    mmap=True with split "all" returns the memory-mapped array itself (no copy)."""
    if Path(cache).suffix == ".npz":
        crops, items = load_pack(Path(cache))
    else:
        npy, idx = Path(cache) / "crops.npy", Path(cache) / "index.json"
        if not npy.is_file() or not idx.is_file():
            raise FileNotFoundError(f"{cache}: crop cache missing; build it with python -m models.training.data")
        crops = np.load(npy, mmap_mode="r")
        items = json.loads(idx.read_text())["items"]
    if split == "all":
        if mmap:
            return crops, items
        sel = list(range(len(items)))
    elif split in ("train", "val"):
        want = split == "val"
        sel = [i for i, it in enumerate(items) if it["val"] == want]
    else:
        raise ValueError(f"unknown split {split!r}; choose train, val or all")
    return np.ascontiguousarray(crops[sel]), [items[i] for i in sel]


PACK_QUALITY = 90


def _jpeg(crop: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality,
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def pack_crops(crops: np.ndarray, items: list[dict], out: Path, *, max_mib: float = 28.0,
               val_count: int = 128, quality: int = PACK_QUALITY) -> dict:
    """Write a pack of ``crops`` (N, H, S, 3) uint8 with index ``items`` to ``out`` (.npz): the
    ``val_count`` validation crops training picks (evenly spaced over the validation split),
    then a uniform sample of the training split (seeded), as many crops as fit in ``max_mib``.
    Returns a summary (counts, size)."""
    val = [i for i, it in enumerate(items) if it["val"]]
    train = [i for i, it in enumerate(items) if not it["val"]]
    val = [val[k] for k in np.linspace(0, len(val) - 1, min(val_count, len(val))).astype(int)] if val else []
    budget = max_mib * 2**20 - 64 * 1024  # the .npz headers
    per_item = 208  # its index entry (JSON) and offset, with room to spare
    blobs = [_jpeg(np.asarray(crops[i]), quality) for i in val]
    used = sum(map(len, blobs)) + per_item * len(val)
    if used > budget:
        raise ValueError(f"{out}: {max_mib} MiB holds not even the {len(val)} validation crops")
    # training crops in a fixed random order (a prefix of it is a uniform sample of the split)
    chosen: list[int] = []
    extra: list[bytes] = []
    for k in np.random.default_rng(0).permutation(len(train)):
        b = _jpeg(np.asarray(crops[train[k]]), quality)
        if used + len(b) + per_item > budget:
            break
        used += len(b) + per_item
        chosen.append(train[k])
        extra.append(b)
    order = np.argsort(chosen, kind="stable")
    chosen = [chosen[k] for k in order]
    blobs += [extra[k] for k in order]
    keep = val + chosen
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    data = np.frombuffer(b"".join(blobs), np.uint8)
    meta = {"size": int(crops.shape[2]), "height": int(crops.shape[1]), "quality": quality,
            "items": [items[i] for i in keep], "train": len(chosen), "val": len(val), "of_train": len(train)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.npz")
    index = np.frombuffer(json.dumps(meta).encode(), np.uint8)  # UTF-8 JSON
    np.savez(tmp, jpeg=data, offsets=offsets, index=index)
    tmp.replace(out)
    summary = {k: meta[k] for k in ("train", "val", "of_train", "quality")}
    summary["mib"] = round(out.stat().st_size / 2**20, 2)
    return summary


def load_pack(path: Path) -> tuple[np.ndarray, list[dict]]:
    """All crops (N, H, S, 3) uint8 RGB and index entries of a pack written by ``pack_crops``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such crop pack; make one with python -m models.training.data pack")
    with np.load(path, allow_pickle=False) as z:
        data, offsets, meta = z["jpeg"], z["offsets"], json.loads(z["index"].tobytes().decode())
    size = meta["size"]
    height = meta.get("height", size)
    crops = np.empty((len(offsets) - 1, height, size, 3), np.uint8)
    for k in range(len(crops)):
        img = cv2.imdecode(data[offsets[k] : offsets[k + 1]], cv2.IMREAD_COLOR)
        if img is None or img.shape != (height, size, 3):
            raise ValueError(f"{path}: crop {k} does not decode to {size}x{height}")
        crops[k] = img[..., ::-1]
    return crops, meta["items"]


# ---------------------------------------------------------------------------------------------
# training-time augmentation


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip, small scale jitter (about the centre of the square template crop, also
    in a taller crop) and colour jitter. uint8."""
    out = crop[:, ::-1] if rng.random() < 0.5 else crop
    height, size = out.shape[:2]
    if rng.random() < 0.5:
        s = rng.uniform(0.95, 1.05)
        dx, dy = rng.uniform(-2, 2, size=2)
        c = size / 2
        m = np.array([[s, 0, c - s * c + dx], [0, s, c - s * c + dy]], np.float64)
        out = cv2.warpAffine(np.ascontiguousarray(out), m, (size, height), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT101)
    if rng.random() < 0.8:
        f = out.astype(np.float32)
        gain = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, size=3)  # brightness, tint
        mean = f.mean()
        contrast = rng.uniform(0.85, 1.15)
        f = (f - mean) * contrast + mean
        grey = f.mean(axis=2, keepdims=True)
        sat = rng.uniform(0.8, 1.2)
        f = (grey + (f - grey) * sat) * gain
        out = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 (rounded)."""
    return (x.detach().float().clamp(0, 1) * 255.0).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m models.training.data",
        description="Build the UTKFace aligned-crop cache (default), or pack a subset of it small"
                    " enough to carry to a GPU machine (pack).")
    p.add_argument("command", nargs="?", choices=("build", "pack"), default="build")
    p.add_argument("--src", type=Path, default=UTKFACE_DIR, help="build: the UTKFace folder")
    p.add_argument("--out", type=Path, default=None,
                   help="build: the cache folder (cache/crops); pack: the .npz file to write"
                        " (cache/crops.pack.npz)")
    p.add_argument("--limit", type=int, default=None, help="build: the first N photos only")
    p.add_argument("--height", type=int, default=None,
                   help="build: crops this tall, the square crop and rows below it (the product runs"
                        " unmask on 128 x 160 crops: --height 160, written to cache/crops160)")
    p.add_argument("--size", type=int, default=CROP_SIZE,
                   help="build: the template square's side (the networks' crops are 128 px)")
    p.add_argument("--cache", type=Path, default=CACHE_DIR,
                   help="pack: the cache folder to pack (cache/crops; cache/crops160 for unmask)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--max-mib", type=float, default=28.0,
                   help="pack: size limit (the device tool carries 64 MiB with the repository)")
    p.add_argument("--quality", type=int, default=PACK_QUALITY, help="pack: JPEG quality")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.command == "pack":
        name = "crops" if a.cache == CACHE_DIR else Path(a.cache).name
        out = a.out or CACHE_DIR.parent / f"{name}.pack.npz"
        if out.suffix != ".npz":
            raise SystemExit(f"{out}: a pack is written as .npz")
        try:
            crops, items = load_cache("all", a.cache, mmap=True)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        summary = pack_crops(crops, items, out, max_mib=a.max_mib, quality=a.quality)
        log.info("packed %s -> %s", summary, out)
        return
    if a.size % 32 or (a.height is not None and (a.height < a.size or a.height % 32)):
        given = f"--size {a.size}" + (f" --height {a.height}" if a.height is not None else "")
        raise SystemExit(f"{given}: a crop's sides are multiples of 32 (the"
                         " networks' largest stride) and at least as tall as it is wide")
    out = a.out or (cache_dir(a.height or CROP_SIZE) if a.size == CROP_SIZE
                    else CACHE_DIR.parent / f"crops{a.size}x{a.height or a.size}")
    build_cache(a.src, out, limit=a.limit, height=a.height, size=a.size)


if __name__ == "__main__":
    main()
