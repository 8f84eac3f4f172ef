"""A small age regressor on aligned 64 px face crops: FaceMath's independent judge.

It is trained on the UTKFace training split only (labels from the file names), separately from
the VAE, and is used solely to *measure* whether ``--task age`` moves faces' apparent age
(``python -m models.facemath measure``). It is never used to make an edit.

    python -m models.training.age --minutes 10 --export       # train, write models/weights/age.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .train import hardware
from .train_vae import load_faces, to_tensor

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


class AgeNet(nn.Module):
    """Four strided conv stages with BatchNorm, global average pool, linear -> age and gender."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 192)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for w in widths:
            layers += [nn.Conv2d(ch, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            ch = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch, 2)  # log(1 + age), female logit

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 64, 64) in [0, 1] -> log(1 + age), female logit; each (B,)."""
        out = self.head(self.features(x * 2.0 - 1.0).mean((2, 3)))
        return out[:, 0], out[:, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted age in years, (B,). Trained on log(1 + age): errors on babies and the old
        weigh alike."""
        return torch.expm1(self.outputs(x)[0].clamp(0.0, 5.0))


def save_age(net: AgeNet, path: Path, card: dict) -> None:
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()
               if v.dtype.is_floating_point}
    tmp = path.with_name(path.name + ".partial.tmp")
    save_file(tensors, str(tmp), metadata={"format": "facemend-age", "card": json.dumps(card)})
    tmp.replace(path)


def load_age(path: str | Path = WEIGHTS_DIR / "age.safetensors", device: str = "cpu") -> AgeNet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: age regressor weights missing; train with python -m models.training.age")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    net = AgeNet()
    net.load_state_dict(state, strict=False)  # BatchNorm's num_batches_tracked is not stored
    return net.eval().to(device)


@torch.no_grad()
def _mirrored(fn, faces: np.ndarray, device: str, batch: int) -> np.ndarray:
    """``fn(x)`` over (N, 64, 64, 3) uint8 faces in batches, averaged with their mirrors."""
    out = []
    for i in range(0, len(faces), batch):
        x = to_tensor(faces[i : i + batch]).to(device)
        out.append(((fn(x) + fn(x.flip(3))) / 2).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict(net: AgeNet, faces: np.ndarray, device: str = "cpu", batch: int = 256) -> np.ndarray:
    """Predicted ages of (N, 64, 64, 3) uint8 faces (the mean over the face and its mirror)."""
    return _mirrored(net.eval(), faces, device, batch)


def predict_gender(net: AgeNet, faces: np.ndarray, device: str = "cpu", batch: int = 256) -> np.ndarray:
    """Probability that each face is labelled female (mean over the face and its mirror)."""
    net.eval()
    return _mirrored(lambda x: torch.sigmoid(net.outputs(x)[1]), faces, device, batch)


def train(minutes: float, *, batch: int = 64, lr: float = 2e-3, seed: int = 0, threads: int = 0,
          export: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    faces, items = load_faces("train")
    ages = np.array([it["age"] for it in items], np.float32)
    genders = np.array([it["gender"] for it in items], np.float32)
    val, vitems = load_faces("val")
    vages = np.array([it["age"] for it in vitems], np.float32)
    net = AgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        frac = (time.time() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        net.train()
        idx = rng.integers(0, len(faces), batch)
        xb = faces[idx]
        flip = rng.random(batch) < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
        # small shifts: the regressor should not depend on pixel-exact alignment
        dx, dy = rng.integers(-3, 4, 2)
        xb = np.roll(xb, (int(dy), int(dx)), axis=(1, 2))
        x = to_tensor(xb)
        target = torch.log1p(torch.from_numpy(ages[idx]))
        log_age, logit = net.outputs(x)
        loss = torch.nn.functional.smooth_l1_loss(log_age, target, beta=0.1) + 0.2 * \
            torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(genders[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log.info("step %d loss %.4f (%.0f s)", step, float(loss.detach()), time.time() - t0)
    pred = predict(net, val)
    mae = float(np.abs(pred - vages).mean())
    vgen = np.array([it["gender"] for it in vitems])
    gacc = float(((predict_gender(net, val) > 0.5) == (vgen == 1)).mean())
    card = {
        "model": "age and gender regressor (FaceMath's judge; never used to edit)",
        "weights": "age.safetensors",
        "input": "pipeline-aligned 128 px crop, 2x2 average-pooled to 64 px",
        "params": sum(p.numel() for p in net.parameters()),
        "data": {"train": len(faces), "val": len(val),
                 "source": "UTKFace training split (the VAE's split; validation faces never seen)",
                 "license": "UTKFace is non-commercial research only; these weights inherit that."},
        "training": {"steps": step, "batch": batch, "lr": lr, "loss": "smooth L1 on log(1 + age) + 0.2 * BCE(gender)",
                     "augment": "flip, +-3 px shift", "seconds": round(time.time() - t0, 1),
                     "hardware": hardware("cpu", threads), "torch": torch.__version__},
        "validation": {"n": len(val), "mae_years": round(mae, 2),
                       "median_abs_error_years": round(float(np.median(np.abs(pred - vages))), 2),
                       "gender_accuracy": round(gacc, 4)},
    }
    log.info("judge: %d steps, validation age MAE %.2f years, gender accuracy %.3f", step, mae, gacc)
    if export:
        save_age(net, WEIGHTS_DIR / "age.safetensors", card)
        (WEIGHTS_DIR / "age.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the age regressor that measures FaceMath's age edits.")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--export", action="store_true", help="write models/weights/age.*")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    print(json.dumps(train(a.minutes, batch=a.batch, threads=a.threads, export=a.export), indent=2))


if __name__ == "__main__":
    main()
