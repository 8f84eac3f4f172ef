"""A small age regressor on aligned 64 px face crops: FaceMath's independent judge.

It is trained on the UTKFace training split only (labels from the file names), separately from
the VAE, and is used solely to *measure* whether ``--task age`` moves faces' apparent age
(``python -m models.training.facemath measure``). It is never used to make an edit.

    python -m models.training.age --minutes 10 --export   # train, write models/weights/age.*

It trains on the loop every trainer shares (``models.training.loop``), without EMA; state goes
to runs/age/last.pt and is resumed automatically; the best weights are those with the lowest
validation age error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .loop import Job, fit, hardware
from .train_vae import load_faces, to_tensor

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
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


@dataclass
class AgeTrainConfig:
    """The judge's run on the shared loop: cosine learning rate to zero over the time budget, no
    warm-up, no EMA (BatchNorm's statistics belong to the network itself)."""

    minutes: float = 10.0
    steps: int = 0
    batch: int = 64
    lr: float = 2e-3
    ema: float = 0.0
    seed: int = 0
    threads: int = 0
    val_every_min: float = 3.0
    export_every_min: float = 5.0
    ckpt_every_min: float = 2.0
    export: bool = False
    out: str = ""  # run folder; default runs/age
    export_dir: str = ""  # default models/weights


def train(minutes: float, *, batch: int = 64, lr: float = 2e-3, seed: int = 0, threads: int = 0,
          export: bool = False, out: str = "", export_dir: str = "") -> dict:
    """Train (or resume, from runs/age/last.pt) the judge for ``minutes`` of training time on the
    training split; returns the card of its best weights (lowest validation age error)."""
    cfg = AgeTrainConfig(minutes=minutes, batch=batch, lr=lr, seed=seed, threads=threads,
                         export=export, out=out, export_dir=export_dir)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    faces, items = load_faces("train")
    ages = np.array([it["age"] for it in items], np.float32)
    genders = np.array([it["gender"] for it in items], np.float32)
    val, vitems = load_faces("val")
    vages = np.array([it["age"] for it in vitems], np.float32)
    vgen = np.array([it["gender"] for it in vitems])

    def next_batch() -> tuple:
        idx = rng.integers(0, len(faces), batch)
        xb = faces[idx]
        flip = rng.random(batch) < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
        # small shifts: the regressor should not depend on pixel-exact alignment
        dx, dy = rng.integers(-3, 4, 2)
        xb = np.roll(xb, (int(dy), int(dx)), axis=(1, 2))
        return to_tensor(xb), torch.log1p(torch.from_numpy(ages[idx])), torch.from_numpy(genders[idx])

    def loss(net: AgeNet, b: tuple, step: int) -> tuple[torch.Tensor, dict]:
        x, target, female = b
        log_age, logit = net.outputs(x)
        value = torch.nn.functional.smooth_l1_loss(log_age, target, beta=0.1) + 0.2 * \
            torch.nn.functional.binary_cross_entropy_with_logits(logit, female)
        return value, {"loss": value.detach()}

    def evaluate(net: AgeNet) -> dict:
        pred = predict(net, val)
        return {"mae_years": float(np.abs(pred - vages).mean()),
                "median_abs_error_years": float(np.median(np.abs(pred - vages))),
                "gender_accuracy": float(((predict_gender(net, val) > 0.5) == (vgen == 1)).mean())}

    def card(best: AgeNet, state: dict) -> dict:
        s = state["best_scores"]
        return {
            "model": "age and gender regressor (FaceMath's judge; never used to edit)",
            "weights": "age.safetensors",
            "input": "pipeline-aligned 128 px crop, 2x2 average-pooled to 64 px",
            "params": sum(p.numel() for p in best.parameters()),
            "data": {"train": len(faces), "val": len(val),
                     "source": "UTKFace training split (the VAE's split; validation faces never seen)",
                     "license": "UTKFace is non-commercial research only; these weights inherit that."},
            "training": {"steps": state["step"], "batch": batch, "lr": lr,
                         "loss": "smooth L1 on log(1 + age) + 0.2 * BCE(gender)",
                         "augment": "flip, +-3 px shift", "seconds": round(state["elapsed"], 1),
                         "hardware": hardware("cpu", threads), "torch": torch.__version__},
            "validation": {"n": len(val), "mae_years": round(s["mae_years"], 2),
                           "median_abs_error_years": round(s["median_abs_error_years"], 2),
                           "gender_accuracy": round(s["gender_accuracy"], 4)},
        }

    job = Job(
        name="age", net=AgeNet(), batch=next_batch, loss=loss, evaluate=evaluate,
        save=lambda n, path, meta: save_age(n, path, meta.get("card", {})), load=load_age, card=card,
        describe=lambda state: (f"trained {state['step']:,} steps",
                                f"validation MAE {state['best_scores']['mae_years']:.1f} years"),
        rng=rng, metric="mae_years", lower_is_better=True, clip=None, weight_decay=1e-4,
        warmup=0, lr_floor=0.0,
        log_line=lambda s: f"val age MAE {s['mae_years']:.2f} years, gender accuracy {s['gender_accuracy']:.3f}",
    )
    state = fit(cfg, job, Path(out or ROOT / "runs" / "age"), Path(export_dir or WEIGHTS_DIR))
    result = card(load_age(Path(out or ROOT / "runs" / "age") / "best.safetensors"), state)
    log.info("judge: %d steps, validation age MAE %.2f years, gender accuracy %.3f", state["step"],
             result["validation"]["mae_years"], result["validation"]["gender_accuracy"])
    return result


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
