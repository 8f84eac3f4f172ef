"""Train a restoration network on aligned UTKFace crops with on-the-fly degradations.

    python -m models.training.train --task denoise --minutes 90 --export
    python -m models.training.train --task unmask --steps 20000 --threads 1 --export

Runs on CPU or CUDA (AMP and channels_last there). State goes to runs/<task>/last.pt (a
checkpoint, resumed automatically); ``--export`` writes the best weights so far (by validation
PSNR of an EMA of the weights) to models/weights/<task>.safetensors with a model card
<task>.json, periodically during training and at the end, so a killed run still leaves the best
weights it had.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_msssim import ssim

from . import data as D
from .degrade import apply_mask, canonical, degrade, degrade_batch
from ..nets import NetConfig, ResUNet, grow_net, load_net, save_net

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

# Per-task network and patch settings. Denoise and enhance are local: trained on 64x64 patches.
# Unmask must see the whole lower face: trained on full crops, one level deeper, and its stem
# unshuffles by 4 (the filled-in region is smooth anyway), which makes a step ~3x cheaper.
PRESETS: dict[str, dict] = {
    "denoise": {"net": NetConfig(widths=(32, 64, 128), enc_blocks=(2, 2, 4), dec_blocks=(2, 2)),
                "patch": 64, "batch": 16},
    "enhance": {"net": NetConfig(widths=(32, 64, 128), enc_blocks=(2, 2, 4), dec_blocks=(2, 2)),
                "patch": 64, "batch": 16},
    "restore": {"net": NetConfig(widths=(32, 64, 128), enc_blocks=(2, 2, 4), dec_blocks=(2, 2)),
                "patch": 64, "batch": 16},
    "unmask": {"net": NetConfig(unshuffle=4, widths=(32, 64, 128, 192), enc_blocks=(2, 2, 2, 3),
                                dec_blocks=(1, 2, 2)),
               "patch": 128, "batch": 8},
}


@dataclass
class TrainConfig:
    task: str = "denoise"
    steps: int = 0  # stop after this many steps (0: no step limit)
    minutes: float = 0.0  # stop after this much training wall time (0: no time limit)
    batch: int = 0  # 0: the task preset
    patch: int = 0  # 0: the task preset (64 for local tasks, 128 = full crop for unmask)
    lr: float = 1e-3
    ssim_weight: float = 0.2  # loss = L1 + ssim_weight * (1 - SSIM)
    mask_weight: float = 4.0  # unmask: extra L1 weight inside the mask
    ema: float = 0.999
    seed: int = 0
    val_count: int = 128  # validation crops (fixed evaluation degradation)
    val_every_min: float = 3.0
    export_every_min: float = 5.0
    ckpt_every_min: float = 2.0
    out: str = ""  # run folder; default runs/<task>
    export: bool = False
    export_dir: str = ""  # default models/weights
    device: str = "cpu"
    threads: int = 0  # torch threads (0: torch default)
    net: dict = field(default_factory=dict)  # NetConfig overrides
    init: str = ""  # start from these weights (safetensors) instead of random
    jitter: float = 0.0  # probability of an alignment jitter per sample (see jitter_alignment)
    crops: str = ""  # crop cache folder or pack (.npz); default the UTKFace cache
    clean: float = 0.0  # unmask: share of samples left without a mask (target = input)
    occluders: float = 0.0  # unmask: share of masks drawn as lower-face occluders (draw_occluder)
    square: float = 0.0  # crops taller than wide: share of batches cut to the square template crop
    l2_weight: float = 0.0  # + l2_weight * squared error (weighted like the L1 term)
    psnr_weight: float = 0.0  # - psnr_weight * each image's PSNR (dB), batch mean: the metric itself
    edge: float = 0.0  # unmask: share of samples whose photo ends inside the crop (photo_edge)


# ---------------------------------------------------------------------------------------------
# data


class Batches:
    """Random training batches: augmented crops, a random patch, degraded on the fly."""

    def __init__(self, task: str, crops: np.ndarray, patch: int, batch: int, seed: int,
                 jitter: float = 0.0, clean: float = 0.0, occluders: float = 0.0,
                 square: float = 0.0, edge: float = 0.0) -> None:
        self.task, self.crops, self.patch, self.batch = task, crops, patch, batch
        self.jitter, self.clean, self.occluders, self.square = jitter, clean, occluders, square
        self.edge = edge
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        clean, bad, masks = [], [], []
        height, size = self.crops.shape[1:3]
        if self.square and height > size and self.rng.random() < self.square:
            height = size  # this batch sees the square crop only (a batch has one shape)
        for _ in range(self.batch):
            crop = np.asarray(self.crops[self.rng.integers(len(self.crops))])[:height]
            crop = D.augment(crop, self.rng)
            if self.patch < size:  # offsets on the 8-pixel JPEG/x4 grid
                y, x = self.rng.integers(0, (np.array([height, size]) - self.patch) // 8 + 1) * 8
                crop = np.ascontiguousarray(crop[y : y + self.patch, x : x + self.patch])
            if self.occluders and self.task == "unmask" and self.rng.random() < self.occluders:
                d = apply_mask(crop, self.rng, occluder=True)
            else:
                d = degrade(self.task, crop, self.rng)
            image, mask = d.image, d.mask
            if self.clean and mask is not None and self.rng.random() < self.clean:
                image, mask = crop, np.zeros_like(mask)  # a face without a mask stays as it is
            if self.jitter and self.rng.random() < self.jitter:
                crop, image, mask = jitter_alignment(crop, image, mask, self.rng)
            if self.edge and self.rng.random() < self.edge:
                crop, image, mask = photo_edge(crop, image, mask, self.rng)
            clean.append(crop)
            bad.append(image)
            masks.append(mask)
        m = np.stack(masks) if masks[0] is not None else None
        return np.stack(clean), np.stack(bad), m


JITTER = {"degrees": 10.0, "scale": 0.1, "shift": 0.05}  # uniform +-; shift as a crop fraction


def jitter_alignment(
    clean: np.ndarray, bad: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One random similarity transform applied to the clean crop, its degraded copy and the mask
    alike: the face *and what degrades it* move together off the template, as they do at work
    when landmarks are off (MTCNN's landmarks on a masked face miss by 0.2-0.3 eye distances).
    Unmask trains with it so the network finds a mask that is not where the template puts it.
    A taller crop turns about the centre of its square template crop, as a square one does."""
    height, size = clean.shape[:2]
    angle = rng.uniform(-JITTER["degrees"], JITTER["degrees"])
    scale = 1.0 + rng.uniform(-JITTER["scale"], JITTER["scale"])
    dx, dy = rng.uniform(-JITTER["shift"], JITTER["shift"], size=2) * size
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += (dx, dy)

    def warp(img: np.ndarray) -> np.ndarray:  # reflected borders, as the crop cache has them
        return cv2.warpAffine(img, m, (size, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT101)

    return warp(clean), warp(bad), None if mask is None else warp(mask)


EDGE_FROM = 0.75  # photo_edge: the photo's last row lies in [EDGE_FROM * width, height)


def photo_edge(
    clean: np.ndarray, bad: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The crop of a face at the photo's bottom edge, as the product makes it: the photo ends at a
    random row under the mouth and ``warp_face`` fills the crop below it by reflection
    (BORDER_REFLECT101). The mask is on the photo, so it is reflected too: under the chin the
    network sees the mask again, mirrored, where training crops (masked after cropping) never
    showed it. Close-cropped portraits and ID photos are like this, and so are the data README's
    whole UTKFace photos: the photo's last row falls at crop rows 123-141 of 160 for 90 % of them.
    The rows from ``r`` down are OpenCV's reflection of those above, in the clean crop, the
    masked crop and the mask alike."""
    height, size = clean.shape[:2]
    r = int(rng.integers(int(EDGE_FROM * size), height))

    def cut(a: np.ndarray) -> np.ndarray:
        return cv2.copyMakeBorder(a[:r], 0, height - r, 0, 0, cv2.BORDER_REFLECT_101)

    return cut(clean), cut(bad), None if mask is None else cut(mask)


# ---------------------------------------------------------------------------------------------
# loss and metrics


def loss_fn(out: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor | None, cfg: TrainConfig) -> torch.Tensor:
    """L1 (weighted up inside the mask for unmask) + ssim_weight * (1 - SSIM), plus l2_weight *
    the squared error weighted alike when asked (PSNR's own loss; L1 alone favours the median),
    minus psnr_weight * the batch's mean per-image PSNR in dB (up to 40) when asked (the scores
    are means of per-image PSNR, which weighs an image's error by 1 / its MSE; the squared
    error does not)."""
    err = (out - clean).abs()  # (B, 3, H, W)
    w = 1.0 + cfg.mask_weight * mask if mask is not None else None  # (B, 1, H, W)

    def mean(e: torch.Tensor) -> torch.Tensor:
        return e.mean() if w is None else (e * w).mean() / w.mean()

    s = ssim(out.float().clamp(0, 1), clean.float(), data_range=1.0, win_size=7)
    loss = mean(err) + cfg.ssim_weight * (1.0 - s)
    if cfg.l2_weight:
        loss = loss + cfg.l2_weight * mean(err * err)
    if cfg.psnr_weight:
        # per image, on the [0, 1] scale; floored at 40 dB, or a face left unmasked (its target
        # its input, its error tiny) would weigh a hundred times more than a masked one
        mse = (err * err).flatten(1).mean(1).clamp_min(1e-4)
        loss = loss + cfg.psnr_weight * (10.0 * torch.log10(mse)).mean()
    return loss


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [0, 1] tensors on the 0-255 scale after rounding to uint8 levels."""
    a = (a.clamp(0, 1) * 255).round()
    b = (b.clamp(0, 1) * 255).round()
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def run_net(net: torch.nn.Module, images: np.ndarray, device: str, batch: int = 32) -> np.ndarray:
    """``net`` over uint8 (N, H, W, 3) images in batches -> uint8 (N, H, W, 3)."""
    outs = []
    for i in range(0, len(images), batch):
        x = D.to_tensor(images[i : i + batch]).to(device)
        outs.append(D.to_uint8(net(x).clamp(0, 1)))
    return np.concatenate(outs) if outs else images.copy()


def validate(net: torch.nn.Module, val: tuple[np.ndarray, np.ndarray], device: str) -> dict:
    """PSNR/SSIM of the net on the fixed validation pairs (clean, degraded)."""
    clean, bad = val
    net.eval()
    out = run_net(net, bad, device)
    c, o, b = D.to_tensor(clean), D.to_tensor(out), D.to_tensor(bad)
    return {
        "psnr": float(psnr(o, c).mean()),
        "ssim": float(ssim(o * 255, c * 255, data_range=255)),
        "psnr_input": float(psnr(b, c).mean()),
        "ssim_input": float(ssim(b * 255, c * 255, data_range=255)),
    }


# ---------------------------------------------------------------------------------------------
# training


def lr_at(cfg, step: int, elapsed: float) -> float:
    """Linear warm-up over 200 steps, then cosine decay to 2% over the step or time budget."""
    warm = min(1.0, (step + 1) / 200)
    fracs = []
    if cfg.steps:
        fracs.append(step / cfg.steps)
    if cfg.minutes:
        fracs.append(elapsed / (cfg.minutes * 60))
    frac = min(1.0, max(fracs)) if fracs else 0.0
    return cfg.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, step: int, decay: float) -> None:
    """Move ``ema``'s weights toward ``net``'s; the decay ramps up over the first steps."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pn in zip(ema.parameters(), net.parameters()):
        pe.lerp_(pn.detach(), 1 - d)


def make_card(cfg: TrainConfig, net: ResUNet, state: dict, n_train: int, scores: dict,
              crop: tuple[int, int] = (D.CROP_SIZE, D.CROP_SIZE)) -> dict:
    """The model card written beside exported weights; ``crop``: the crops' (height, width)."""
    t = canonical(cfg.task)
    tall = crop[0] != crop[1]
    wh = f"{crop[1]}x{crop[0]}"
    shape = wh + (f" (the {crop[1]} px template square and {crop[0] - crop[1]} rows below it)"
                  if tall else "")
    return {
        "task": t,
        "weights": f"{t}.safetensors",
        "format": "safetensors fp16; ResUNet config as JSON in the 'config' metadata key",
        "architecture": "residual U-Net (pixel-unshuffle stem, strided-conv encoder, pixel-shuffle"
                        " decoder, additive skips, residual output)",
        "config": {k: v for k, v in asdict(net.config).items() if k != "extra"},
        "params": net.num_params(),
        "multiple": net.multiple,
        "data": {
            "source": "UTKFace (../shared/data/faces/utkface), largest MTCNN face aligned to the"
                      f" pipeline.align template at {shape}, shrunk with an area filter before"
                      " the warp (pipeline.align.warp_face)",
            "train_crops": n_train,
            **({"pack": f"{Path(cfg.crops).name} (a subset of the cache as 4:4:4 JPEGs)"}
               if cfg.crops.endswith(".npz") else {}),
            "split": "validation = sha1(file name) % 1000 < 50 (~5%)",
            "license": "UTKFace is for non-commercial research only; image copyright stays with"
                       " the owners. These weights inherit that restriction.",
        },
        "training": {
            "steps": state["step"],
            "batch": cfg.batch,
            "patch": cfg.patch,
            "train_time_s": round(state["elapsed"], 1),  # excluding validation passes
            "wall_time_s": round(state.get("wall", state["elapsed"]), 1),  # including them
            "lr": cfg.lr,
            "loss": f"L1{' (x' + str(1 + cfg.mask_weight) + ' inside the mask)' if t == 'unmask' else ''}"
                    f" + {cfg.ssim_weight} * (1 - SSIM)"
                    + (f" + {cfg.l2_weight} * squared error (weighted alike)" if cfg.l2_weight else "")
                    + (f" - {cfg.psnr_weight} * per-image PSNR (dB, up to 40)" if cfg.psnr_weight else ""),
            "ema": cfg.ema,
            "seed": cfg.seed,
            "augment": "horizontal flip, colour jitter, scale jitter 0.95-1.05"
                       + (f"; p={cfg.jitter} alignment jitter of crop, degraded crop and mask together"
                          f" (rotation +-{JITTER['degrees']:g} deg, scale +-{JITTER['scale']:g},"
                          f" shift +-{JITTER['shift']:g} of the crop)" if cfg.jitter else "")
                       + (f"; p={cfg.clean} of faces left unmasked (target = input)" if cfg.clean else "")
                       + (f"; p={cfg.square} of batches cut to the square template crop"
                          if cfg.square and tall else "")
                       + (f"; p={cfg.edge} of faces cut by the photo's bottom edge at a row in"
                          f" [{EDGE_FROM:g} x width, height), reflected below it after masking"
                          if cfg.edge else ""),
            "occluders": (f"p={cfg.occluders} of masks drawn as lower-face occluders (flat-coloured"
                          " polygons over mouth and chin, top from the nose tip to the lips)"
                          if cfg.occluders and t == "unmask" else None),
            "degradation": DEGRADATION_NOTES[t],
            "init": init_info(cfg.init),
            "total_steps": state["step"] + (init_info(cfg.init) or {"steps": 0})["steps"],
            "hardware": hardware(cfg.device, cfg.threads),
            "torch": torch.__version__,
        },
        "validation": {"n": cfg.val_count, "crop": wh, "degradation": EVAL_NOTES[t], **scores},
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


DEGRADATION_NOTES = {
    "denoise": "p=0.45 Gaussian sigma U[0,50]/255 (p=0.25 chroma noise, p=0.25 JPEG q30-95);"
               " else p=0.5 Gaussian sigma U[0,15]/255 then JPEG q10-60 at any grid offset"
               " (p=0.2) or libx264 CRF 30-45 / MPEG-2 / MPEG-4 q6-31 (p=0.35)",
    "enhance": "p=0.25 Gaussian blur, p=0.15 motion blur; down x4 (p=0.4) or xU[1,4] INTER_AREA,"
               " bicubic up; p=0.25 JPEG q30-95",
    "restore": "in order, each drawn alone: p=0.3 Gaussian blur sigma U[0.4,2], p=0.1 motion blur;"
               " p=0.55 down x2 (p=0.3) or xU[1,4] and up; p=0.45 Gaussian sigma U[0,35]/255 or"
               " p=0.15 Poisson peak U[20,200]; p=0.2 chroma noise; p=0.5 video encoder (libx264"
               " CRF 24-45, MPEG-2, MPEG-4) or p=0.25 JPEG q10-80 at any grid offset",
    "unmask": "synthetic surgical/cloth/N95 masks with straps over nose and mouth"
              " (and lower-face occluders when 'occluders' says so)",
}
EVAL_NOTES = {
    "denoise": "Gaussian sigma 25/255, clipped and rounded to uint8",
    "enhance": "x4 INTER_AREA down, bicubic up",
    "restore": "x2 INTER_AREA down, bicubic up; Gaussian sigma 10/255; libx264 CRF 32, one frame",
    "unmask": "mask generator, seed 0 per image",
}


def init_info(init: str) -> dict | None:
    """The weights a run started from: their file name and the steps their card counts."""
    if not init:
        return None
    from ..nets import read_metadata

    try:
        training = json.loads(read_metadata(init).get("card", "{}")).get("training", {})
    except (OSError, ValueError):
        training = {}
    return {"weights": Path(init).name, "steps": int(training.get("total_steps") or training.get("steps") or 0)}


def hardware(device: str, threads: int) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {threads or torch.get_num_threads()} thread(s), {os.cpu_count()} cores"


def train(
    cfg: TrainConfig,
    train_crops: np.ndarray | None = None,
    val_crops: np.ndarray | None = None,
) -> dict:
    """Train (or resume) per ``cfg``; returns the final state summary. Crops default to the
    UTKFace cache (train split / first ``val_count`` of the val split)."""
    task = canonical(cfg.task)
    preset = PRESETS[task]
    cfg.batch = cfg.batch or preset["batch"]
    cfg.patch = cfg.patch or preset["patch"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = cfg.device
    cuda = device.startswith("cuda")
    out = Path(cfg.out or ROOT / "runs" / task)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(cfg.export_dir or WEIGHTS_DIR)

    source = Path(cfg.crops) if cfg.crops else D.CACHE_DIR
    if train_crops is None or val_crops is None:  # read once (a pack is decoded on loading)
        all_crops, items = D.load_cache("all", source, mmap=True)
    if train_crops is None:
        train_idx = [i for i, it in enumerate(items) if not it["val"]]
        train_crops = all_crops[train_idx] if len(train_idx) < 2000 else _Subset(all_crops, train_idx)
    if val_crops is None:  # an evenly spaced subset of the validation split
        val_idx = [i for i, it in enumerate(items) if it["val"]]
        pick = np.linspace(0, len(val_idx) - 1, min(cfg.val_count, len(val_idx))).astype(int)
        val_crops = all_crops[[val_idx[k] for k in pick]]
    val_crops = np.ascontiguousarray(val_crops[: cfg.val_count])
    cfg.val_count = len(val_crops)
    val_bad, _ = degrade_batch(task, val_crops, seed=0, evaluation=True)
    val = (val_crops, val_bad)

    ckpt = out / "last.pt"
    if cfg.init:  # fine-tune from shipped weights: their config wins (--net may only add blocks)
        net = (grow_net(cfg.init, cfg.net) if cfg.net else load_net(cfg.init)).to(device).train()
        if not ckpt.is_file():
            log.info("initialised from %s%s", cfg.init, f", grown to {cfg.net}" if cfg.net else "")
    else:
        netcfg = copy.deepcopy(preset["net"])
        for k, v in cfg.net.items():
            setattr(netcfg, k, v)
        netcfg.__post_init__()
        net = ResUNet(netcfg).to(device)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    state = {"step": 0, "elapsed": 0.0, "best": -1.0, "best_scores": {}, "history": []}
    batches = Batches(task, train_crops, cfg.patch, cfg.batch, cfg.seed, cfg.jitter, cfg.clean,
                      cfg.occluders, cfg.square, cfg.edge)

    if ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)  # our own checkpoint
        net.load_state_dict(saved["net"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        batches.rng.bit_generator.state = saved["rng"]
        log.info("resumed %s at step %d (%.0f s trained)", ckpt, state["step"], state["elapsed"])

    def save_ckpt() -> None:
        tmp = ckpt.with_name("last.partial.pt")
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "state": state, "rng": batches.rng.bit_generator.state,
                    "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)

    def export() -> None:
        best = load_net(out / "best.safetensors")
        card = make_card(cfg, best, state, len(train_crops), state["best_scores"],
                         tuple(train_crops.shape[1:3]))
        save_net(best, export_dir / f"{task}.safetensors", metadata={"task": task, "card": card})
        (export_dir / f"{task}.json").write_text(json.dumps(card, indent=2) + "\n")
        log.info("exported %s (val PSNR %.2f dB)", export_dir / f"{task}.safetensors", state["best"])

    def evaluate_now() -> None:
        scores = validate(ema, val, device)
        scores.update(step=state["step"], elapsed=round(state["elapsed"], 1))
        state["history"].append(scores)
        log.info("step %d  val PSNR %.2f dB (input %.2f)  SSIM %.4f", state["step"],
                 scores["psnr"], scores["psnr_input"], scores["ssim"])
        if scores["psnr"] > state["best"]:
            state["best"] = scores["psnr"]
            state["best_scores"] = {k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in scores.items()}
            save_net(ema, out / "best.safetensors", metadata={"task": task, "step": state["step"]})

    def done() -> bool:
        return bool((cfg.steps and state["step"] >= cfg.steps)
                    or (cfg.minutes and state["elapsed"] >= cfg.minutes * 60))

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps or None, initial=state["step"], desc=task, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 60.0, file=sys.stderr)
    last_val = last_export = last_ckpt = state["elapsed"]
    loss_avg = None
    t_prev = time.time()
    t_wall = time.time() - state.get("wall", 0.0)
    while not done():
        state["wall"] = time.time() - t_wall
        net.train()
        clean_np, bad_np, mask_np = batches.next()
        clean = D.to_tensor(clean_np).to(device, non_blocking=True)
        bad = D.to_tensor(bad_np).to(device, non_blocking=True)
        mask = None
        if mask_np is not None:
            mask = torch.from_numpy(mask_np).float().div_(255).unsqueeze(1).to(device)
        if cuda:
            clean = clean.contiguous(memory_format=torch.channels_last)
            bad = bad.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, state["step"], state["elapsed"])
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            pred = net(bad)
        loss = loss_fn(pred.float(), clean, mask, cfg)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, net, state["step"], cfg.ema)
        state["step"] += 1
        now = time.time()
        state["elapsed"] += now - t_prev
        t_prev = now
        lv = float(loss.detach())
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", val=f"{state['best']:.2f}", refresh=False)
        if state["elapsed"] - last_val >= cfg.val_every_min * 60:
            evaluate_now()
            last_val = state["elapsed"]
            t_prev = time.time()  # validation time is not training time
        if cfg.export and state["best"] > 0 and state["elapsed"] - last_export >= cfg.export_every_min * 60:
            export()
            last_export = state["elapsed"]
        if state["elapsed"] - last_ckpt >= cfg.ckpt_every_min * 60:
            save_ckpt()
            last_ckpt = state["elapsed"]
    bar.close()
    evaluate_now()
    state["wall"] = time.time() - t_wall
    save_ckpt()
    if cfg.export:
        export()
    log.info("done: %d steps, %.0f s, best val PSNR %.2f dB", state["step"], state["elapsed"],
             state["best"])
    return state


class _Subset:
    """Rows ``idx`` of a (memory-mapped) array, read lazily."""

    def __init__(self, arr: np.ndarray, idx: list[int]) -> None:
        self.arr, self.idx = arr, np.asarray(idx)
        self.shape = (len(idx),) + arr.shape[1:]

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arr[self.idx[i]]


def make_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.training.train", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m models.training.train --task denoise --minutes 90 --threads 1 --export\n"
               "  python -m models.training.train --task enhance --steps 200 --device cuda",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, help="denoise, enhance (deblur), restore or unmask")
    p.add_argument("--steps", type=int, default=0, help="step budget (0: none)")
    p.add_argument("--minutes", type=float, default=0.0, help="training wall-time budget (0: none)")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--patch", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-count", type=int, default=128)
    p.add_argument("--val-every", type=float, default=3.0, help="minutes between validations")
    p.add_argument("--export-every", type=float, default=5.0, help="minutes between exports")
    p.add_argument("--out", default="", help="run folder (default runs/<task>)")
    p.add_argument("--export", action="store_true", help="write models/weights/<task>.*")
    p.add_argument("--export-dir", default="")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init", default="", help="start from these weights (e.g. models/weights/denoise.safetensors)")
    p.add_argument("--crops", default="", help="crop cache folder or a pack from"
                   " 'python -m models.training.data pack' (default: cache/crops)")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="probability of an alignment jitter per training sample (unmask: use 0.5"
                        " so the net copes with the off landmarks of masked faces)")
    p.add_argument("--clean", type=float, default=0.0,
                   help="unmask: share of training faces left without a mask, so the net learns"
                        " to leave unmasked faces alone (e.g. 0.15)")
    p.add_argument("--occluders", type=float, default=0.0,
                   help="unmask: share of masks drawn as lower-face occluders, flat-coloured"
                        " polygons over mouth and chin (models.training.degrade.draw_occluder; e.g. 0.35)")
    p.add_argument("--square", type=float, default=0.0,
                   help="with crops taller than wide (--crops cache/crops160): this share of batches"
                        " is cut to the square template crop, so the net learns both shapes (e.g. 0.5)")
    p.add_argument("--edge", type=float, default=0.0,
                   help="unmask: share of training faces cut by the photo's bottom edge, the crop"
                        " filled below it by reflection after the mask is drawn (e.g. 0.5)")
    p.add_argument("--l2", type=float, default=0.0,
                   help="add this weight times the squared error to the loss (e.g. 10)")
    p.add_argument("--psnr", type=float, default=0.0,
                   help="subtract this weight times each image's PSNR in dB from the loss (e.g. 0.02)")
    p.add_argument("--net", default="{}", help='NetConfig overrides as JSON, e.g. \'{"widths": [32, 64, 128]}\'; with --init only more blocks, e.g. \'{"enc_blocks": [2, 2, 2, 6]}\' (the new ones start as the identity)')
    return p


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    i = argv.index("--task") if "--task" in argv else -1
    if 0 <= i < len(argv) - 1 and argv[i + 1] == "facemath":  # the VAE has its own trainer
        from .train_vae import main as train_vae

        return train_vae(argv[:i] + argv[i + 2 :])
    a = make_argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.steps <= 0 and a.minutes <= 0:
        raise SystemExit("give --steps or --minutes (or both)")
    for flag in ("jitter", "clean", "occluders", "square", "edge"):
        if not 0.0 <= getattr(a, flag) <= 1.0:
            raise SystemExit(f"--{flag} {getattr(a, flag)}: a share of samples, from 0 to 1")
    cfg = TrainConfig(
        task=a.task, steps=a.steps, minutes=a.minutes, batch=a.batch, patch=a.patch, lr=a.lr,
        seed=a.seed, val_count=a.val_count, val_every_min=a.val_every,
        export_every_min=a.export_every, out=a.out, export=a.export, export_dir=a.export_dir,
        device=a.device, threads=a.threads, net=json.loads(a.net), init=a.init, jitter=a.jitter,
        crops=a.crops, clean=a.clean, occluders=a.occluders, l2_weight=a.l2, square=a.square,
        psnr_weight=a.psnr,
        edge=a.edge,
    )
    try:
        train(cfg)
    except FileNotFoundError as e:  # no crop cache or pack: one line, not a traceback
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
