"""Measure a network's int8 plan (``models.quantize``): which convolutions may run in int8.

    python -m models.training.quantize --task denoise [--budget 0.05] [--write]

Calibration: the input range of every convolution over validation faces degraded as in training
(``--cal`` faces). Each convolution is then quantized alone and the task's evaluation
degradation restored on other validation faces (``--n``) by OpenVINO; the convolutions are taken
cheapest first (the loss per multiply-add), each kept only while the whole plan stays within
``--budget`` dB of f32 on those faces. Prints JSON; ``--write`` saves the plan as
``models/weights/<task>.int8.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..export import export_onnx, weights_hash
from ..nets import load_net
from ..quantize import plan_path, qdq_onnx
from ..registry import WEIGHTS_DIR
from ..tasks import resolve
from .data import to_tensor
from .degrade import degrade_batch
from .evaluate import crops_from
from .loop import cpuinfo


def conv_ranges(net: torch.nn.Module, batches) -> tuple[dict, dict]:
    """Per convolution (its weight's name): the (min, max) of its input over ``batches`` and its
    multiply-adds per input pixel."""
    ranges, macs, hooks = {}, {}, []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            key = f"{name}.weight"

            def hook(mod, inp, out, key=key):
                x = inp[0]
                lo, hi = float(x.min()), float(x.max())
                a, b = ranges.get(key, (lo, hi))
                ranges[key] = (min(a, lo), max(b, hi))
                per_px = out.shape[2] * out.shape[3] / (inp[0].shape[2] * inp[0].shape[3])
                macs[key] = mod.weight[0].numel() * out.shape[1] * per_px
            hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        for x in batches:
            net(x)
    for h in hooks:
        h.remove()
    return ranges, macs


class Judge:
    """PSNR of OpenVINO's restorations of fixed degraded faces, for any plan."""

    def __init__(self, onnx_path: Path, bad: np.ndarray, clean: np.ndarray, tmp: Path) -> None:
        self.src = tmp / onnx_path.name
        shutil.copy(onnx_path, self.src)
        self.x = to_tensor(bad).numpy()
        self.clean = clean.astype(np.float64)

    def compile(self, path: Path):
        import openvino as ov

        c = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        r = c.create_infer_request()
        return lambda x: np.array(r.infer({0: x})[c.outputs[0]])

    def psnr(self, plan: dict | None) -> float:
        run = self.compile(qdq_onnx(self.src, plan) if plan else self.src)
        y = np.concatenate([run(self.x[i : i + 10]) for i in range(0, len(self.x), 10)])
        y = np.rint(np.clip(y, 0, 1) * 255.0).transpose(0, 2, 3, 1)
        mse = ((y - self.clean) ** 2).reshape(len(y), -1).mean(1)
        return float((10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))).mean())

    def ms_per_face(self, plan: dict | None, batch: int = 8, seconds: float = 3.0) -> float:
        run = self.compile(qdq_onnx(self.src, plan) if plan else self.src)
        x = self.x[:batch]
        run(x)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            run(x)
            n += 1
        return (time.perf_counter() - t) / n / batch * 1000.0


def cpu_name() -> str:
    """The CPU's model name and its widest vector units, from /proc/cpuinfo where there is one."""
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    flags = set(cpuinfo("flags").split())
    if not flags:
        return name
    units = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags][:1]
    return f"{name}, {units[0] if units else 'no AVX2'}"


def measure(task: str, n: int, cal: int, budget: float, seed: int = 0) -> dict:
    spec = resolve(task)
    wpath = WEIGHTS_DIR / spec.weights
    net = load_net(wpath, device="cpu").float().eval()
    crops, source = crops_from(None, n + cal)
    val, calib = crops[:n], crops[n : n + cal]
    bad_cal, _ = degrade_batch(task, calib, seed=seed + 1)
    bad_val, _ = degrade_batch(task, val, seed=seed, evaluation=True)
    x_cal = to_tensor(bad_cal)
    ranges, macs = conv_ranges(net, [x_cal[i : i + 16] for i in range(0, len(x_cal), 16)])
    onnx_path = export_onnx(net, spec.name, torch.zeros(1, 3, spec.size, spec.size))
    digest = weights_hash(net)
    plan_of = lambda keys: {"weights_hash": digest, "convs": {k: list(ranges[k]) for k in keys}}  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="facemend-int8-") as tmp:
        judge = Judge(onnx_path, bad_val, val, Path(tmp))
        f32 = judge.psnr(None)
        alone = {k: f32 - judge.psnr(plan_of([k])) for k in ranges}
        total = sum(macs.values())
        order = sorted(ranges, key=lambda k: max(alone[k], 0.0) / macs[k] - macs[k] / total * 1e-9)
        chosen, score = [], f32
        for k in order:
            got = judge.psnr(plan_of([*chosen, k]))
            if f32 - got <= budget:
                chosen, score = [*chosen, k], got
        plan = plan_of(chosen)
        speed = {"f32": round(judge.ms_per_face(None), 2), "int8": round(judge.ms_per_face(plan), 2)}
    plan.update({
        "task": spec.name,
        "share_of_multiply_adds": round(sum(macs[k] for k in chosen) / total, 3),
        "calibration": {"faces": int(len(calib)), "degradation": "training (degrade_batch)", "seed": seed + 1,
                        "source": source.replace(str(Path.cwd()) + "/", "")},
        "validation": {"faces": int(len(val)), "degradation": "evaluation", "f32_db": round(f32, 3),
                       "int8_db": round(score, 3), "delta_db": round(score - f32, 3), "budget_db": budget},
        "ms_per_face_openvino": {**speed, "batch": 8, "size": spec.size, "cpu": cpu_name(),
                                 "threads": torch.get_num_threads()},
        "each_alone_db": {k: round(-v, 3) for k, v in alone.items()},
    })
    return plan


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.training.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--n", type=int, default=100, help="validation faces judged (default 100)")
    p.add_argument("--cal", type=int, default=96, help="calibration faces (default 96)")
    p.add_argument("--budget", type=float, default=0.05, help="dB the plan may lose against f32 (default 0.05)")
    p.add_argument("--write", action="store_true", help="save models/weights/<task>.int8.json")
    a = p.parse_args(argv)
    plan = measure(a.task, a.n, a.cal, a.budget)
    if a.write:
        plan_path(WEIGHTS_DIR / resolve(a.task).weights).write_text(json.dumps(plan, indent=1) + "\n")
    print(json.dumps({k: v for k, v in plan.items() if k not in ("convs", "each_alone_db")}))


if __name__ == "__main__":
    main()
