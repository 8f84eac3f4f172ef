"""Train a restoration network on aligned UTKFace crops with on-the-fly degradations.

    python -m models.training.train --task denoise --minutes 90 --export
    python -m models.training.train --task unmask --steps 20000 --threads 1 --export

Runs on CPU or CUDA (AMP and channels_last there), on the training loop every trainer shares
(``models.training.loop``): batches from ``batches``, the loss, validation and model card from
``restoration``. State goes to runs/<task>/last.pt (a checkpoint, resumed automatically);
``--export`` writes the best weights so far (by validation
PSNR of an EMA of the weights) to models/weights/<task>.safetensors with a model card
<task>.json, periodically during training and at the end, so a killed run still leaves the best
weights it had.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..nets import NetConfig, ResUNet, grow_net, load_net, save_net
from . import data as D
from .adversarial import PatchDiscriminator, d_loss, g_loss
from .batches import Batches, Subset
from .degrade import canonical, degrade_batch
from .loop import Job, fit
from .restoration import init_info, loss_fn, make_card, validate

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
    clean: float = 0.0  # share of samples left undamaged (unmask: without a mask; target = input)
    occluders: float = 0.0  # unmask: share of masks drawn as lower-face occluders (draw_occluder)
    square: float = 0.0  # crops taller than wide: share of batches cut to the square template crop
    l2_weight: float = 0.0  # + l2_weight * squared error (weighted like the L1 term)
    psnr_weight: float = 0.0  # - psnr_weight * each image's PSNR (dB), batch mean: the metric itself
    edge: float = 0.0  # unmask: share of samples whose photo ends inside the crop (photo_edge)
    soft: float = 0.0  # unmask: share of faces softened before the mask is drawn (batches.soften)
    small: float = 0.0  # unmask: share of faces softened with the mask drawn on them (batches.soften_together)
    scale: tuple = ()  # (lo, hi): each face rescaled by a log-uniform factor first (batches.rescale)
    sizes: tuple = ()  # each batch's crops area-shrunk to one of these widths (a larger crop cache)
    bf16: bool = False  # CPU: the forward pass in bfloat16 autocast (AVX-512 BF16 / AMX)
    adv_weight: float = 0.0  # unmask: + adv_weight * the hinge adversarial term (adversarial.py)
    fm_weight: float = 0.0  # unmask: + fm_weight * discriminator feature matching
    d_lr: float = 2e-4  # the discriminator's learning rate
    snapshots: bool = False  # keep the EMA weights of every validation (<out>/snapshots/)


def train(
    cfg: TrainConfig,
    train_crops: np.ndarray | None = None,
    val_crops: np.ndarray | None = None,
) -> dict:
    """Train (or resume) per ``cfg`` on the shared loop (``loop.fit``); returns the final state
    summary. Crops default to the UTKFace cache (train split / first ``val_count`` of the val
    split)."""
    task = canonical(cfg.task)
    if (cfg.adv_weight or cfg.fm_weight) and task != "unmask":
        raise SystemExit("--adv and --fm weigh the painted area: unmask only")
    preset = PRESETS[task]
    cfg.batch = cfg.batch or preset["batch"]
    cfg.patch = cfg.patch or preset["patch"]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = cfg.device
    cuda = device.startswith("cuda")
    out = Path(cfg.out or ROOT / "runs" / task)

    source = Path(cfg.crops) if cfg.crops else D.CACHE_DIR
    if train_crops is None or val_crops is None:  # read once (a pack is decoded on loading)
        all_crops, items = D.load_cache("all", source, mmap=True)
    if train_crops is None:
        train_idx = [i for i, it in enumerate(items) if not it["val"]]
        train_crops = all_crops[train_idx] if len(train_idx) < 2000 else Subset(all_crops, train_idx)
    if val_crops is None:  # an evenly spaced subset of the validation split
        val_idx = [i for i, it in enumerate(items) if it["val"]]
        pick = np.linspace(0, len(val_idx) - 1, min(cfg.val_count, len(val_idx))).astype(int)
        val_crops = all_crops[[val_idx[k] for k in pick]]
    val_crops = np.ascontiguousarray(val_crops[: cfg.val_count])
    cfg.val_count = len(val_crops)
    val_bad, val_masks = degrade_batch(task, val_crops, seed=0, evaluation=True)
    val = (val_crops, val_bad, val_masks)

    if cfg.init:  # fine-tune from shipped weights: their config wins (--net may only add blocks)
        net = (grow_net(cfg.init, cfg.net) if cfg.net else load_net(cfg.init)).to(device).train()
        if not (out / "last.pt").is_file():
            log.info("initialised from %s%s", cfg.init, f", grown to {cfg.net}" if cfg.net else "")
    else:
        netcfg = copy.deepcopy(preset["net"])
        for k, v in cfg.net.items():
            setattr(netcfg, k, v)
        netcfg.__post_init__()
        net = ResUNet(netcfg).to(device)
    batches = Batches(task, train_crops, cfg.patch, cfg.batch, cfg.seed, cfg.jitter, cfg.clean,
                      cfg.occluders, cfg.square, cfg.edge, cfg.soft, tuple(cfg.scale) or None, cfg.small,
                      tuple(cfg.sizes))

    def batch() -> tuple:
        clean_np, bad_np, mask_np = batches.next()
        clean = D.to_tensor(clean_np).to(device, non_blocking=True)
        bad = D.to_tensor(bad_np).to(device, non_blocking=True)
        mask = None
        if mask_np is not None:
            mask = torch.from_numpy(mask_np).float().div_(255).unsqueeze(1).to(device)
        if cuda:
            clean = clean.contiguous(memory_format=torch.channels_last)
            bad = bad.contiguous(memory_format=torch.channels_last)
        return clean, bad, mask

    disc = opt_d = None
    if cfg.adv_weight or cfg.fm_weight:
        disc = PatchDiscriminator().to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.99), weight_decay=0.0)

    def loss(net: torch.nn.Module, b: tuple, step: int) -> tuple[torch.Tensor, dict]:
        clean, bad, mask = b
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.bfloat16,
                            enabled=cuda or cfg.bf16):
            pred = net(bad)
        pred = pred.float()
        value = loss_fn(pred, clean, mask, cfg)
        figures = {"loss": value.detach()}
        if disc is not None:
            shown = pred.clamp(0, 1)
            disc.requires_grad_(True)
            ld = d_loss(disc, clean, shown, mask)
            opt_d.zero_grad(set_to_none=True)
            ld.backward()
            opt_d.step()
            disc.requires_grad_(False)
            adv, fm = g_loss(disc, clean, shown, mask)
            value = value + cfg.adv_weight * adv + cfg.fm_weight * fm
            figures.update(d=ld.detach(), adv=adv.detach(), fm=fm.detach())
        return value, figures

    def card(best: torch.nn.Module, state: dict) -> dict:
        return make_card(cfg, best, state, len(train_crops), state["best_scores"], tuple(train_crops.shape[1:3]))

    def describe(state: dict) -> tuple[str, str]:
        init = init_info(cfg.init)
        change = f"trained {state['step']:,} steps" + (f" from {init['weights']}" if init else "")
        return change, f"validation {state['best_scores'].get('psnr', 0.0):.2f} dB"

    job = Job(
        name=task, net=net.to(memory_format=torch.channels_last) if cuda else net, batch=batch, loss=loss,
        evaluate=lambda ema: validate(ema, val, device),
        extra={"disc": disc, "opt_d": opt_d} if disc is not None else {},
        save=lambda n, path, meta: save_net(n, path, metadata={"task": task, **meta}),
        load=load_net, card=card, describe=describe, rng=batches.rng, metric="psnr", amp=cuda,
        log_line=lambda s: f"val PSNR {s['psnr']:.2f} dB (input {s['psnr_input']:.2f})  SSIM {s['ssim']:.4f}",
    )
    return fit(cfg, job, out, Path(cfg.export_dir or WEIGHTS_DIR))


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
                   help="share of training faces left undamaged (unmask: without a mask), so the net"
                        " learns to leave such faces alone (e.g. 0.15)")
    p.add_argument("--occluders", type=float, default=0.0,
                   help="unmask: share of masks drawn as lower-face occluders, flat-coloured"
                        " polygons over mouth and chin (models.training.degrade.draw_occluder; e.g. 0.35)")
    p.add_argument("--square", type=float, default=0.0,
                   help="with crops taller than wide (--crops cache/crops160): this share of batches"
                        " is cut to the square template crop, so the net learns both shapes (e.g. 0.5)")
    p.add_argument("--edge", type=float, default=0.0,
                   help="unmask: share of training faces cut by the photo's bottom edge, the crop"
                        " filled below it by reflection after the mask is drawn (e.g. 0.5)")
    p.add_argument("--soft", type=float, default=0.0,
                   help="unmask: share of training faces softened as small or moving faces in video"
                        " are (down-up x1.5-4, half of them motion-blurred) before the mask is drawn,"
                        " the target softened alike (e.g. 0.5)")
    p.add_argument("--small", type=float, default=0.0,
                   help="unmask: share of training faces softened together with the mask drawn on"
                        " them, as a small face in a video frame is enlarged to the crop with its mask"
                        " (the same draws as --soft; e.g. 0.5)")
    p.add_argument("--scale", default="",
                   help="LO,HI: each training face rescaled by a factor drawn log-uniformly in [LO, HI]"
                        " before its patch is cut and degraded, as video shows faces at any size"
                        " (local tasks; e.g. 0.5,2)")
    p.add_argument("--sizes", default="",
                   help="W,W,...: each batch's crops area-shrunk to one of these widths, multiples of"
                        " 32 (a cache of larger crops, --crops cache/crops256x320: unmask at the"
                        " resolution of a larger face; e.g. 128,192,256)")
    p.add_argument("--bf16", action="store_true",
                   help="CPU: the forward pass in bfloat16 autocast (about 1.8x on a CPU with AMX)")
    p.add_argument("--l2", type=float, default=0.0,
                   help="add this weight times the squared error to the loss (e.g. 10)")
    p.add_argument("--psnr", type=float, default=0.0,
                   help="subtract this weight times each image's PSNR in dB from the loss (e.g. 0.02)")
    p.add_argument("--adv", type=float, default=0.0,
                   help="unmask: add this weight times a patch discriminator's hinge adversarial"
                        " term over the painted area, for texture instead of a blur (e.g. 0.01)")
    p.add_argument("--fm", type=float, default=0.0,
                   help="unmask: add this weight times the discriminator's feature matching (e.g. 1)")
    p.add_argument("--d-lr", type=float, default=2e-4, help="the discriminator's learning rate")
    p.add_argument("--snapshots", action="store_true",
                   help="keep the EMA weights of every validation in <out>/snapshots/ (with --adv,"
                        " PSNR alone does not pick the best)")
    p.add_argument("--net", default="{}", help='NetConfig overrides as JSON, e.g. \'{"widths": [32, 64, 128]}\'; with --init only more blocks, e.g. \'{"enc_blocks": [2, 2, 2, 6]}\' (the new ones start as the identity)')
    return p


def _scale(text: str) -> tuple:
    if not text:
        return ()
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--scale {text}: two factors, LO,HI (e.g. 0.5,2)") from None
    if not 0 < lo <= hi:
        raise SystemExit(f"--scale {text}: factors must be positive and LO <= HI")
    return (lo, hi)


def _sizes(text: str) -> tuple:
    try:
        sizes = tuple(int(v) for v in text.split(",")) if text else ()
    except ValueError:
        raise SystemExit(f"--sizes {text}: widths in pixels, W,W,... (e.g. 128,192,256)") from None
    if any(w < 32 or w % 32 for w in sizes):
        raise SystemExit(f"--sizes {text}: each a multiple of 32 (the networks' largest stride)")
    return sizes


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
    for flag in ("jitter", "clean", "occluders", "square", "edge", "soft", "small"):
        if not 0.0 <= getattr(a, flag) <= 1.0:
            raise SystemExit(f"--{flag} {getattr(a, flag)}: a share of samples, from 0 to 1")
    cfg = TrainConfig(
        task=a.task, steps=a.steps, minutes=a.minutes, batch=a.batch, patch=a.patch, lr=a.lr,
        seed=a.seed, val_count=a.val_count, val_every_min=a.val_every,
        export_every_min=a.export_every, out=a.out, export=a.export, export_dir=a.export_dir,
        device=a.device, threads=a.threads, net=json.loads(a.net), init=a.init, jitter=a.jitter,
        crops=a.crops, clean=a.clean, occluders=a.occluders, l2_weight=a.l2, square=a.square,
        psnr_weight=a.psnr, edge=a.edge, soft=a.soft, adv_weight=a.adv, fm_weight=a.fm, d_lr=a.d_lr,
        snapshots=a.snapshots, scale=_scale(a.scale), bf16=a.bf16, small=a.small,
        sizes=_sizes(a.sizes),
    )
    try:
        train(cfg)
    except FileNotFoundError as e:  # no crop cache or pack: one line, not a traceback
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
