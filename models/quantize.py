"""int8 plans: which of a network's convolutions run in int8 on a CPU without native bf16.

A plan, ``models/weights/<task>.int8.json``, names the convolutions (by their weight's name in the
network's state dict) that lose least by running in int8, each with the range of its input
measured on calibration faces (``python -m models.training.quantize``), and the hash of the
weights it was measured on (``models.export.weights_hash``). ``qdq_onnx`` writes the network's
ONNX file (``models.export``) with those convolutions quantized the way ONNX Runtime's static
quantizer does it (QDQ format): int8 weights per output channel, symmetric; uint8 activations
per tensor, from the measured range; biases, additions and the other convolutions stay float. OpenVINO runs the quantized
convolutions with its int8 kernels. The other convolutions stay float because they are the ones
whose rounding shows in the output (those reading the residual stream at full resolution).

A plan whose hash does not match the shipped weights is ignored (the weights changed after it
was measured): the network runs in f32.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

PLAN_VERSION = 1  # part of the quantized file's name: bump when qdq_onnx changes


def plan_path(weights: Path) -> Path:
    """Where the plan of the network in ``weights`` (``<task>.safetensors``) is shipped."""
    return weights.with_name(weights.name.split(".")[0] + ".int8.json")


def load_plan(weights: Path, digest: str) -> dict | None:
    """The int8 plan shipped beside ``weights`` if there is one and it was measured on the
    network whose ``models.export.weights_hash`` is ``digest`` (its tensors, not the file: a
    rewritten model card in the file's header leaves the plan valid), else None."""
    path = plan_path(weights)
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if plan.get("weights_hash") != digest or not plan.get("convs"):
        return None
    return plan


def plan_key(plan: dict) -> str:
    """A short hash of what in the plan changes the quantized file."""
    body = json.dumps({"v": PLAN_VERSION, "convs": plan["convs"]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point covering [lo, hi] (and 0, which must be exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zero = int(np.clip(np.rint(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def weight_qparams(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and per-output-channel scales (symmetric, zero point 0)."""
    peak = np.abs(w.reshape(len(w), -1)).max(1).astype(np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
    return q, scale


def qdq_onnx(src: Path, plan: dict) -> Path:
    """``src`` (a float ONNX file) with the plan's convolutions quantized, written once beside it
    (under a temporary name, then renamed) and reused."""
    dst = src.with_name(f"{src.stem}-int8-{plan_key(plan)}.onnx")
    if dst.is_file():
        return dst
    import onnx  # not imported when the file is there (0.7 s of a job's start)
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ranges = plan["convs"]
    nodes, done, used = [], {}, set()
    for node in g.node:
        w = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
        if w in ranges and w in inits:
            x, rng = node.input[0], tuple(ranges[w])
            if x not in done:  # one Q/DQ pair per activation, shared by the convs reading it
                s, z = activation_qparams(*rng)
                g.initializer.extend([numpy_helper.from_array(np.array(s), f"{x}_qs"),
                                      numpy_helper.from_array(np.array(z), f"{x}_qz")])
                nodes += [helper.make_node("QuantizeLinear", [x, f"{x}_qs", f"{x}_qz"], [f"{x}_q"]),
                          helper.make_node("DequantizeLinear", [f"{x}_q", f"{x}_qs", f"{x}_qz"], [f"{x}_dq"])]
                done[x] = rng
            elif done[x] != rng:
                raise ValueError(f"{w}: its input has two ranges in the plan")
            q, scale = weight_qparams(numpy_helper.to_array(inits[w]))
            g.initializer.extend([numpy_helper.from_array(q, f"{w}_q"), numpy_helper.from_array(scale, f"{w}_qs"),
                                  numpy_helper.from_array(np.zeros(len(q), np.int8), f"{w}_qz")])
            nodes.append(helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_qs", f"{w}_qz"], [f"{w}_dq"], axis=0))
            node.input[0], node.input[1] = f"{x}_dq", f"{w}_dq"
            used.add(w)
        nodes.append(node)
    if not used:
        raise ValueError(f"{src.name}: none of the plan's convolutions is in the network")
    del g.node[:]
    g.node.extend(nodes)
    keep = [t for t in g.initializer if t.name not in used]  # the float weights now quantized
    del g.initializer[:]
    g.initializer.extend(keep)
    from .export import write_atomically

    write_atomically(dst, lambda tmp: onnx.save(model, tmp))
    return dst
