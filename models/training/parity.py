"""Parity of the inference engines: each engine's restorations against torch fp32's.

    python -m models.training.parity --check     # validation crops through every installed engine (JSON)

The crops are degraded with each task's fixed evaluation degradation and restored by the
shipped network in torch and in each engine ``models.export`` can run; the figures say how far
an engine's output is from torch's and what that does to the score against the clean crop.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .. import load
from ..export import installed
from ..tasks import TASKS
from .data import to_tensor
from .degrade import degrade_batch
from .evaluate import crops_from


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-crop PSNR (dB, range 255) of (N, H, W, 3) arrays (equal crops: 148 dB, the MSE floor)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def parity(task: str, crops: np.ndarray, engines, *, batch: int = 16, seed: int = 0) -> dict:
    """Each engine's restorations of ``crops`` (clean uint8 (N, H, W, 3), degraded with the
    task's fixed evaluation degradation) against torch fp32's: per engine, the engine that
    really ran and its precision (f32, or bf16: OpenVINO on a bf16 CPU), the mean PSNR of its uint8 output to the clean crops (as the product writes
    it), the difference to torch's (dB), and the mean PSNR of its float output to torch's."""
    bad, _masks = degrade_batch(task, crops, seed=seed, evaluation=True)
    outs = {}
    for e in ["torch", *[e for e in engines if e != "torch"]]:
        model = load(task, "cpu", engine=e)
        with torch.inference_mode():
            y = torch.cat([model(to_tensor(bad[i : i + batch])) for i in range(0, len(bad), batch)])
        outs[e] = (model.engine, model.precision, y.permute(0, 2, 3, 1).numpy() * 255.0)
    ref = outs["torch"][2]
    ref_db = float(_psnr(np.rint(ref), crops).mean())
    result = {}
    for e, (ran, precision, y) in outs.items():
        db = float(_psnr(np.rint(y), crops).mean())
        result[e] = {"engine": ran, "precision": precision, "psnr": round(db, 4), "delta_db": round(db - ref_db, 4),
                     "psnr_to_torch": round(float(_psnr(y, ref).mean()), 2),
                     "max_abs_to_torch": round(float(np.abs(y - ref).max()), 5)}
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m models.training.parity --check``: parity of the engines on validation crops (JSON)."""
    p = argparse.ArgumentParser(prog="python -m models.training.parity", description=main.__doc__)
    p.add_argument("--check", action="store_true", help="restore validation crops with each engine")
    p.add_argument("--n", type=int, default=300, help="validation crops (default 300)")
    p.add_argument("--tasks", default=",".join(t for t, s in TASKS.items() if s.weights and not s.latent))
    p.add_argument("--engines", default="onnxruntime,openvino")
    a = p.parse_args(argv)
    if not a.check:
        p.error("nothing to do: pass --check")
    crops, source = crops_from(None, a.n)
    out = {"n": int(len(crops)), "source": source, "tasks": {}}
    for task in filter(None, a.tasks.split(",")):
        try:
            t = time.perf_counter()
            out["tasks"][task] = parity(task, crops, [e for e in a.engines.split(",") if installed(e)])
            out["tasks"][task]["seconds"] = round(time.perf_counter() - t, 1)
        except FileNotFoundError as e:  # a task whose weights are not shipped (yet)
            out["tasks"][task] = {"skipped": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
