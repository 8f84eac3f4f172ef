"""What training a restoration network adds to the loop: its loss, its validation figures and
its model card.

The loss is L1 (weighted up inside the mask for unmask) plus ``ssim_weight`` times (1 - SSIM),
optionally a squared-error and a per-image PSNR term (``loss_fn``); validation is PSNR/SSIM of
the EMA network on the fixed validation pairs; the card (``make_card``) follows the schema of
``models.training.card``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from pytorch_msssim import ssim

from ..nets import ResUNet, read_metadata
from . import data as D
from .batches import EDGE_FROM, JITTER, SOFT
from .degrade import canonical
from .loop import hardware

if TYPE_CHECKING:
    from .train import TrainConfig


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


def validate(net: torch.nn.Module, val: tuple, device: str) -> dict:
    """PSNR/SSIM of the net on the fixed validation pairs (clean, degraded[, masks]); with masks
    also the median sharpness ratio of the painted area (``sharpness``)."""
    clean, bad = val[:2]
    net.eval()
    out = run_net(net, bad, device)
    c, o, b = D.to_tensor(clean), D.to_tensor(out), D.to_tensor(bad)
    scores = {
        "psnr": float(psnr(o, c).mean()),
        "ssim": float(ssim(o * 255, c * 255, data_range=255)),
        "psnr_input": float(psnr(b, c).mean()),
        "ssim_input": float(ssim(b * 255, c * 255, data_range=255)),
    }
    if len(val) > 2 and val[2] is not None:
        ratios = [r for r in map(sharpness_ratio, out, clean, val[2]) if r is not None]
        if ratios:
            scores["sharpness"] = float(np.median(ratios))
    return scores


def sharpness_ratio(out: np.ndarray, clean: np.ndarray, mask: np.ndarray, min_px: int = 200) -> float | None:
    """Laplacian variance of ``out`` over that of ``clean`` on the mask's pixels (eroded by 2 px,
    away from its edge): a blur scores near 0, a faithful texture near 1. None when under
    ``min_px`` pixels are masked."""
    inside = cv2.erode((mask > 127).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inside.sum() < min_px:
        return None

    def var(img: np.ndarray) -> float:
        g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return float(cv2.Laplacian(g, cv2.CV_32F)[inside].var())

    return var(out) / max(var(clean), 1e-6)


# ---------------------------------------------------------------------------------------------
# the model card


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
                    + (f" - {cfg.psnr_weight} * per-image PSNR (dB, up to 40)" if cfg.psnr_weight else "")
                    + (f" + {cfg.adv_weight} * hinge adversarial + {cfg.fm_weight} * feature matching"
                       " (patch discriminator over the painted area, models.training.adversarial;"
                       f" its lr {cfg.d_lr})" if cfg.adv_weight or cfg.fm_weight else ""),
            "ema": cfg.ema,
            "seed": cfg.seed,
            "augment": "horizontal flip, colour jitter, scale jitter 0.95-1.05"
                       + (f"; p={cfg.jitter} alignment jitter of crop, degraded crop and mask together"
                          f" (rotation +-{JITTER['degrees']:g} deg, scale +-{JITTER['scale']:g},"
                          f" shift +-{JITTER['shift']:g} of the crop)" if cfg.jitter else "")
                       + (f"; p={cfg.clean} of faces left {'unmasked' if t == 'unmask' else 'undamaged'} (target = input)" if cfg.clean else "")
                       + (f"; p={cfg.square} of batches cut to the square template crop"
                          if cfg.square and tall else "")
                       + (f"; p={cfg.edge} of faces cut by the photo's bottom edge at a row in"
                          f" [{EDGE_FROM:g} x width, height), reflected below it after masking"
                          if cfg.edge else "")
                       + (f"; p={cfg.soft} of faces softened before masking, target alike (area-down"
                          f" x{SOFT['scale'][0]:g}-{SOFT['scale'][1]:g} then bicubic up; p={SOFT['blur']:g}"
                          f" of those motion-blurred, {SOFT['length'][0]}-{SOFT['length'][1]} px)"
                          if cfg.soft else "")
                       + (f"; p={cfg.small} of faces softened with the mask drawn on them, target alike"
                          f" (the same draws: a small face in a video frame, enlarged to the crop)"
                          if cfg.small else "")
                       + (f"; each face rescaled by a log-uniform factor in [{cfg.scale[0]:g}, {cfg.scale[1]:g}]"
                          " (area down, bicubic up) before its patch is cut and degraded"
                          if cfg.scale else "")
                       + (f"; each batch's crops area-shrunk to a width of {', '.join(map(str, cfg.sizes))} px"
                          " (drawn per batch)" if getattr(cfg, "sizes", ()) else ""),
            "precision": "bf16 autocast forward (CPU)" if cfg.bf16 else "fp32",
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
    "denoise": "one per crop in equal shares: Gaussian sigma 25/255 (clipped, rounded to uint8),"
               " JPEG q20, libx264 CRF 40 (one frame)",
    "enhance": "x4 INTER_AREA down, bicubic up",
    "restore": "x2 INTER_AREA down, bicubic up; Gaussian sigma 10/255; libx264 CRF 32, one frame",
    "unmask": "mask generator, seed 0 per image",
}


def init_info(init: str) -> dict | None:
    """The weights a run started from: their file name and the steps their card counts."""
    if not init:
        return None
    try:
        training = json.loads(read_metadata(init).get("card", "{}")).get("training", {})
    except (OSError, ValueError):
        training = {}
    return {"weights": Path(init).name, "steps": int(training.get("total_steps") or training.get("steps") or 0)}
