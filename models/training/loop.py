"""The one training loop of every trainer: the restoration networks (``train``), FaceMath's VAE
(``train_vae``) and the age judge (``age``).

A trainer hands ``fit`` a ``Job``: its network, a batch function, a loss, an evaluation of the
weights on fixed validation data, and how to save, load and describe them. The loop does the
rest, the same way for all of them:

- AdamW; the learning rate of ``lr_at``: a linear warm-up, then cosine decay to a floor over the
  step or training-time budget, whichever ends first;
- an exponential moving average of the weights (``ema``; 0: none, the network itself is
  validated and exported, as a network with BatchNorm statistics needs);
- budgets: ``steps`` and ``minutes`` of training time (validation passes do not count);
- validation every ``val_every_min`` training minutes and at the end, keeping the best weights
  by ``Job.metric`` in ``<out>/best.safetensors``;
- a checkpoint ``<out>/last.pt`` (network, EMA, optimiser, loop state, the batch generator's
  state, the config, and ``Job.extra``'s state: a discriminator and its optimiser) every
  ``ckpt_every_min`` and at the end, resumed automatically;
- with ``snapshots``: every validation's EMA weights in ``<out>/snapshots/step<N>.safetensors``,
  for runs whose best weights one figure cannot pick (an adversarial term trades PSNR for
  texture);
- with ``export``: the best weights and their model card as ``<export_dir>/<name>.safetensors``
  and ``<name>.json``, periodically and at the end, so a killed run still leaves its best
  weights. The card file adds the weights' sha256 and one ``history`` entry for the run
  (``card.write_card_file``);
- a progress bar and log lines.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .card import read_card_history, write_card_file

log = logging.getLogger(__name__)


def lr_at(cfg, step: int, elapsed: float, warmup: int = 200, floor: float = 0.02) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` times ``cfg.lr`` over
    the step or time budget (``cfg.steps``, ``cfg.minutes``)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    fracs = []
    if cfg.steps:
        fracs.append(step / cfg.steps)
    if cfg.minutes:
        fracs.append(elapsed / (cfg.minutes * 60))
    frac = min(1.0, max(fracs)) if fracs else 0.0
    return cfg.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, step: int, decay: float) -> None:
    """Move ``ema``'s weights toward ``net``'s; the decay ramps up over the first steps."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pn in zip(ema.parameters(), net.parameters()):
        pe.lerp_(pn.detach(), 1 - d)


def cpuinfo(field: str) -> str:
    """The first ``field`` line's value in /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def hardware(device: str, threads: int) -> str:
    """What trained: the GPU's name, or the CPU's model, threads and cores."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = cpuinfo("model name") or platform.processor() or platform.machine()
    return f"CPU {cpu}, {threads or torch.get_num_threads()} thread(s), {os.cpu_count()} cores"


@dataclass
class Job:
    """What a trainer hands the loop.

    ``loss(net, batch, step)`` returns the loss to minimise and figures to show (floats; the
    progress bar shows their running means, through ``show`` when given). ``evaluate(net)`` scores the
    weights on the trainer's validation data (a dict holding ``metric``). ``save(net, path,
    metadata)`` writes weights with header metadata (the exported ones get ``card``);
    ``load(path)`` reads them back. ``card(net, state)`` is the model card of the best weights;
    ``describe(state)`` is the (change, score) of the run's history entry in the card file.
    ``rng`` is the generator the batches draw from (its state is checkpointed)."""

    name: str
    net: nn.Module
    batch: Callable[[], Any]
    loss: Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict]]
    evaluate: Callable[[nn.Module], dict]
    save: Callable[[nn.Module, Path, dict], Any]
    load: Callable[[Path], nn.Module]
    card: Callable[[nn.Module, dict], dict]
    describe: Callable[[dict], tuple[str, Any]]
    rng: np.random.Generator
    metric: str = "psnr"
    lower_is_better: bool = False
    log_line: Callable[[dict], str] | None = None  # a validation's log line
    show: Callable[[dict], dict] | None = None  # running means -> the progress bar's figures
    amp: bool = False  # scale the loss for fp16 autocast (the trainer autocasts its forward)
    clip: float | None = 1.0  # gradient norm clipping
    weight_decay: float = 0.0
    warmup: int = 200  # lr_at's warm-up steps
    lr_floor: float = 0.02  # lr_at's floor, a fraction of the peak
    extra: dict[str, Any] = field(default_factory=dict)  # more state to checkpoint (state_dict())


def fit(cfg, job: Job, out: Path, export_dir: Path) -> dict:
    """Train (or resume) ``job`` per ``cfg`` (``steps``, ``minutes``, ``lr``, ``ema``,
    ``val_every_min``, ``export_every_min``, ``ckpt_every_min``, ``export``); returns the loop
    state: step, elapsed (training seconds), wall, best, best_scores, history."""
    out.mkdir(parents=True, exist_ok=True)
    net = job.net
    if cfg.ema:
        ema = copy.deepcopy(net).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
    else:
        ema = net  # validated and exported as it is
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=job.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=job.amp)
    state = {"step": 0, "elapsed": 0.0, "best": -1.0, "best_scores": {}, "history": []}

    ckpt = out / "last.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location=next(net.parameters()).device, weights_only=False)  # our own
        net.load_state_dict(saved["net"])
        if ema is not net:
            ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        job.rng.bit_generator.state = saved["rng"]
        for k, v in job.extra.items():
            v.load_state_dict(saved["extra"][k])
        log.info("resumed %s at step %d (%.0f s trained)", ckpt, state["step"], state["elapsed"])
    if cfg.export and "card_history" not in state:  # the history of the weights this run replaces
        state["card_history"] = read_card_history(export_dir / f"{job.name}.json")

    def save_ckpt() -> None:
        tmp = ckpt.with_name("last.partial.pt")
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "state": state, "rng": job.rng.bit_generator.state,
                    "extra": {k: v.state_dict() for k, v in job.extra.items()},
                    "config": asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))}, tmp)
        tmp.replace(ckpt)

    def export() -> None:
        best = job.load(out / "best.safetensors")
        card = job.card(best, state)
        path = export_dir / f"{job.name}.safetensors"
        export_dir.mkdir(parents=True, exist_ok=True)
        job.save(best, path, {"card": card})
        change, score = job.describe(state)
        write_card_file(path, card, state["card_history"], change, score)
        log.info("exported %s (validation %s %.4g)", path, job.metric, state["best"])

    def evaluate_now() -> None:
        scores = job.evaluate(ema)
        scores.update(step=state["step"], elapsed=round(state["elapsed"], 1))
        state["history"].append(scores)
        if getattr(cfg, "snapshots", False):
            job.save(ema, out / "snapshots" / f"step{state['step']}.safetensors", {"step": state["step"]})
        log.info("step %d  %s", state["step"], job.log_line(scores) if job.log_line
                 else f"validation {job.metric} {scores[job.metric]:.4g}")
        value = scores[job.metric]
        if not state["best_scores"] or (value < state["best"] if job.lower_is_better else value > state["best"]):
            state["best"] = value
            state["best_scores"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
            job.save(ema, out / "best.safetensors", {"step": state["step"]})

    def done() -> bool:
        return bool((cfg.steps and state["step"] >= cfg.steps)
                    or (cfg.minutes and state["elapsed"] >= cfg.minutes * 60))

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps or None, initial=state["step"], desc=job.name, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 60.0, file=sys.stderr)
    last_val = last_export = last_ckpt = state["elapsed"]
    means: dict[str, float] = {}
    t_prev = time.time()
    t_wall = time.time() - state.get("wall", 0.0)
    while not done():
        state["wall"] = time.time() - t_wall
        net.train()
        batch = job.batch()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, state["step"], state["elapsed"], job.warmup, job.lr_floor)
        loss, figures = job.loss(net, batch, state["step"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if job.clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), job.clip)
        scaler.step(opt)
        scaler.update()
        if ema is not net:
            ema_update(ema, net, state["step"], cfg.ema)
        state["step"] += 1
        now = time.time()
        state["elapsed"] += now - t_prev
        t_prev = now
        for k, v in figures.items():
            v = float(v)
            means[k] = v if k not in means else 0.98 * means[k] + 0.02 * v
        shown = job.show(means) if job.show else {k: f"{v:.4f}" for k, v in means.items()}
        bar.update(1)
        bar.set_postfix(**shown, val=f"{state['best']:.2f}", refresh=False)
        if state["elapsed"] - last_val >= cfg.val_every_min * 60:
            evaluate_now()
            last_val = state["elapsed"]
            t_prev = time.time()  # validation time is not training time
        if cfg.export and state["best_scores"] and state["elapsed"] - last_export >= cfg.export_every_min * 60:
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
    log.info("done: %d steps, %.0f s, best validation %s %.4g", state["step"], state["elapsed"],
             job.metric, state["best"])
    return state
