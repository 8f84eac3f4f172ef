"""Inference speed of the shipped networks: faces per second at batch 1 and batch 32.

    python -m models.training.speed [--threads N] [--device cpu] [--size 128]

Prints one JSON object: per task, parameter count, weight file size, the crop the product runs
it on (unmask: ``size`` wide and 32 rows taller, for the chin) and faces/s on that crop.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .. import TASKS, load
from ..registry import WEIGHTS_DIR


@torch.inference_mode()
def faces_per_second(model: torch.nn.Module, batch: int, size: int, device: str,
                     seconds: float = 3.0, height: int | None = None) -> float:
    """Median-free simple throughput: warm up twice, then run for about ``seconds``."""
    dtype = next(model.parameters()).dtype
    x = torch.rand(batch, 3, height or size, size, device=device, dtype=dtype)
    for _ in range(2):
        model(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        model(x)
        n += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.training.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {"device": a.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "size": a.size, "torch": torch.__version__, "tasks": {}}
    for name, spec in TASKS.items():
        if spec.weights is None or name == "morph":  # morph runs the age/gender VAE
            continue
        model = load(name, device=a.device)
        height = a.size + spec.rows_below
        result["tasks"][name] = {
            "crop": f"{a.size}x{height}",
            "params": sum(p.numel() for p in model.parameters()),
            "file_bytes": (WEIGHTS_DIR / spec.weights).stat().st_size,
            "multiple": model.multiple,
            **{f"faces_per_s_batch{b}": round(faces_per_second(model, b, a.size, a.device, a.seconds,
                                                               height), 1) for b in (1, 32)},
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
