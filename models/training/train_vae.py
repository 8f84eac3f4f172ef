"""Train FaceMath's face VAE on aligned UTKFace crops (the restoration models' crop cache).

    python -m models.training.train_vae --minutes 60 --export
    python -m models.training.train --task facemath --minutes 60 --export   # the same

The 128 px cache crops are average-pooled to 64 px, exactly as ``models.facemath`` does at
inference time. Loss: per-pixel MSE + a KL weight annealed linearly from 0 over the first
``anneal`` steps (so the decoder learns to reconstruct before the prior pulls the codes in).
It runs on the training loop every trainer shares (``models.training.loop``). State goes to
runs/facemath/last.pt and is resumed automatically; ``--export`` writes the best
weights (by validation reconstruction PSNR of an EMA of the weights, decoding the mean) to
models/weights/facemath.safetensors with a model card facemath.json. Run
``python -m models.training.facemath attributes`` afterwards: the attribute vectors depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..vae import FaceVAE, VAEConfig, kl_divergence, load_vae, save_vae
from . import data as D
from .loop import Job, fit, hardware

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass
class VAETrainConfig:
    steps: int = 0
    minutes: float = 0.0
    batch: int = 32
    lr: float = 2e-3
    kl_weight: float = 0.004  # weight of KL per pixel-channel relative to the per-pixel MSE
    anneal: int = 2000  # steps of linear KL warm-up
    ema: float = 0.999
    seed: int = 0
    val_count: int = 256
    val_every_min: float = 3.0
    export_every_min: float = 5.0
    ckpt_every_min: float = 2.0
    out: str = ""
    export: bool = False
    export_dir: str = ""
    device: str = "cpu"
    threads: int = 0
    net: dict = field(default_factory=dict)
    init: str = ""  # start from these weights (a facemend-vae safetensors), fresh optimiser


def pool64(crops: np.ndarray, size: int = 64) -> np.ndarray:
    """(N, 128, 128, 3) uint8 -> (N, size, size, 3) uint8 by area averaging."""
    n, h, w, c = crops.shape
    f = h // size
    out = np.empty((n, size, size, c), np.uint8)
    for i in range(0, n, 1024):
        x = np.asarray(crops[i : i + 1024], dtype=np.float32)
        x = x.reshape(-1, size, f, size, f, c).mean((2, 4))
        out[i : i + 1024] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def load_faces(split: str, size: int = 64) -> tuple[np.ndarray, list[dict]]:
    """The cache's ``split`` crops pooled to ``size`` px, and their index entries."""
    crops, items = D.load_cache(split)
    return pool64(crops, size), items


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)


def psnr_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def reconstruction_scores(vae: FaceVAE, faces: np.ndarray, device: str = "cpu", batch: int = 128) -> dict:
    """Mean PSNR (dB) of decode(mu) against uint8-rounded faces, and mean KL (nats)."""
    vae.eval()
    ps, kls = [], []
    for i in range(0, len(faces), batch):
        x = to_tensor(faces[i : i + batch]).to(device)
        mu, logvar = vae.encode(x)
        y = torch.round(vae.decode(mu) * 255) / 255
        ps.append(psnr_batch(y, x).cpu())
        kls.append(kl_divergence(mu, logvar).cpu())
    return {"psnr": round(float(torch.cat(ps).mean()), 3), "kl": round(float(torch.cat(kls).mean()), 1)}


def make_card(cfg: VAETrainConfig, vae: FaceVAE, state: dict, n_train: int) -> dict:
    return {
        "task": "facemath",
        "weights": "facemath.safetensors",
        "format": "safetensors fp16; VAEConfig as JSON in the 'config' metadata key",
        "architecture": "convolutional VAE: strided-conv encoder with residual blocks -> linear"
                        " (mu, logvar); linear -> upsample+conv decoder with residual blocks,"
                        " pixel-shuffle output",
        "config": asdict(vae.config),
        "params": sum(p.numel() for p in vae.parameters()),
        "input": "pipeline-aligned 128 px crop, 2x2 average-pooled to 64 px",
        "data": {
            "source": "UTKFace (../shared/data/faces/utkface), largest MTCNN face aligned to the"
                      " pipeline.align template",
            "train_crops": n_train,
            "split": "validation = sha1(file name) % 1000 < 50 (~5%), never trained on",
            "license": "UTKFace is for non-commercial research only; image copyright stays with"
                       " the owners. These weights inherit that restriction.",
        },
        "training": {
            "steps": state["step"],
            "batch": cfg.batch,
            "lr": cfg.lr,
            "loss": f"MSE + {cfg.kl_weight} * KL / (3*64*64), KL weight annealed over {cfg.anneal} steps",
            "ema": cfg.ema,
            "seed": cfg.seed,
            "augment": "horizontal flip",
            "init": cfg.init or None,
            "train_time_s": round(state["elapsed"], 1),
            "wall_time_s": round(state.get("wall", state["elapsed"]), 1),
            "hardware": hardware(cfg.device, cfg.threads),
            "torch": torch.__version__,
        },
        "validation": {"n": cfg.val_count, "metric": "PSNR of decode(mu), uint8-rounded, 64 px",
                       **state["best_scores"]},
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def train(cfg: VAETrainConfig, train_faces: np.ndarray | None = None,
          val_faces: np.ndarray | None = None) -> dict:
    """Train (or resume) the VAE per ``cfg`` on the shared loop (``loop.fit``); faces default to
    the UTKFace cache, pooled."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = cfg.device
    if train_faces is None:
        train_faces, _ = load_faces("train")
    if val_faces is None:
        val_all, _ = load_faces("val")
        pick = np.linspace(0, len(val_all) - 1, min(cfg.val_count, len(val_all))).astype(int)
        val_faces = val_all[pick]
    cfg.val_count = len(val_faces)
    if cfg.init:
        vae = load_vae(cfg.init, device).train()
        log.info("initialised from %s", cfg.init)
    else:
        vae = FaceVAE(VAEConfig(**cfg.net)).to(device)
    pixels = 3 * vae.config.size * vae.config.size
    rng = np.random.default_rng(cfg.seed)

    def batch() -> torch.Tensor:
        idx = rng.integers(0, len(train_faces), cfg.batch)
        xb = train_faces[np.sort(idx)]
        flip = rng.random(cfg.batch) < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
        return to_tensor(xb).to(device)

    def loss(net: FaceVAE, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        recon, mu, logvar = net(x)
        mse = F.mse_loss(recon, x)
        kl = kl_divergence(mu, logvar).mean()
        beta = cfg.kl_weight * min(1.0, step / max(1, cfg.anneal))
        return mse + beta * kl / pixels, {"mse": mse.detach(), "kl": kl.detach()}

    def describe(state: dict) -> tuple[str, str]:
        change = f"trained {state['step']:,} steps" + (f" from {Path(cfg.init).name}" if cfg.init else "")
        return change, f"validation reconstruction {state['best_scores'].get('psnr', 0.0):.2f} dB"

    job = Job(
        name="facemath", net=vae, batch=batch, loss=loss,
        evaluate=lambda ema: reconstruction_scores(ema, val_faces, device),
        save=lambda n, path, meta: save_vae(n, path, metadata=meta), load=load_vae,
        card=lambda best, state: make_card(cfg, best, state, len(train_faces)),
        describe=describe, rng=rng, metric="psnr",
        log_line=lambda s: f"val recon PSNR {s['psnr']:.2f} dB  KL {s['kl']:.1f}",
        show=lambda m: {"psnr": f"{-10 * math.log10(max(m['mse'], 1e-10)):.2f}", "kl": f"{m['kl']:.0f}"},
    )
    return fit(cfg, job, Path(cfg.out or ROOT / "runs" / "facemath"), Path(cfg.export_dir or WEIGHTS_DIR))


def make_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train FaceMath's face VAE on the UTKFace crop cache.")
    p.add_argument("--steps", type=int, default=0, help="step budget (0: none)")
    p.add_argument("--minutes", type=float, default=0.0, help="training wall-time budget (0: none)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=0.004)
    p.add_argument("--anneal", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-count", type=int, default=256)
    p.add_argument("--val-every", type=float, default=3.0, help="minutes between validations")
    p.add_argument("--out", default="", help="run folder (default runs/facemath)")
    p.add_argument("--export", action="store_true", help="write models/weights/facemath.*")
    p.add_argument("--export-dir", default="")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init", default="", help="start from these VAE weights (fresh optimiser)")
    p.add_argument("--net", default="{}", help='VAEConfig overrides as JSON, e.g. \'{"latent": 128}\'')
    return p


def main(argv: list[str] | None = None) -> None:
    a = make_argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.steps <= 0 and a.minutes <= 0:
        raise SystemExit("give --steps or --minutes (or both)")
    train(VAETrainConfig(steps=a.steps, minutes=a.minutes, batch=a.batch, lr=a.lr, kl_weight=a.kl_weight,
                         anneal=a.anneal, seed=a.seed, val_count=a.val_count, val_every_min=a.val_every,
                         out=a.out, export=a.export, export_dir=a.export_dir, device=a.device,
                         threads=a.threads, net=json.loads(a.net), init=a.init))


if __name__ == "__main__":
    main()
