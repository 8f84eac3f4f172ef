"""int8 plans (models.quantize): what the quantized ONNX file holds, that a plan only applies to
the weights it was measured on, and that OpenVINO running a shipped plan restores real faces as
f32 does (within 0.1 dB). Its speed is measured by ``models.training.quantize`` and
``bench.throughput``."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import models
from models import export
from models.quantize import activation_qparams, load_plan, plan_path, qdq_onnx, weight_qparams
from models.registry import WEIGHTS_DIR

needs_openvino = pytest.mark.skipif(not export.installed("openvino"), reason="openvino not installed")


def _shipped() -> list[str]:
    return [t for t, s in models.TASKS.items() if s.weights and not s.latent and plan_path(WEIGHTS_DIR / s.weights).is_file()]


def _digest(task: str) -> str:
    return export.weights_hash(models.load(task, engine="torch").net)


def test_every_restoration_network_ships_a_plan_for_its_weights():
    """A plan measured on other weights would be ignored (f32): re-measure it with the weights."""
    tasks = [t for t, s in models.TASKS.items() if s.weights and not s.latent and (WEIGHTS_DIR / s.weights).is_file()]
    assert tasks and sorted(_shipped()) == sorted(tasks)
    for t in tasks:
        plan = load_plan(WEIGHTS_DIR / models.TASKS[t].weights, _digest(t))
        assert plan is not None, f"{t}: the int8 plan was measured on other weights"
        v = plan["validation"]
        assert v["delta_db"] >= -v["budget_db"] and v["budget_db"] <= 0.1, (t, v)
        assert plan["share_of_multiply_adds"] > 0.9, (t, plan["share_of_multiply_adds"])


def test_a_plan_for_other_weights_is_ignored(tmp_path):
    w = tmp_path / "denoise.safetensors"
    shutil.copy(WEIGHTS_DIR / "denoise.safetensors", w)
    assert load_plan(w, _digest("denoise")) is None  # no plan beside these weights
    shutil.copy(plan_path(WEIGHTS_DIR / "denoise.safetensors"), plan_path(w))
    assert load_plan(w, _digest("denoise")) is not None
    net = models.load("denoise", engine="torch").net
    with torch.no_grad():
        next(net.parameters())[0, 0, 0, 0] += 0.01  # other weights: another hash
    assert load_plan(w, export.weights_hash(net)) is None


def test_quantization_parameters():
    s, z = activation_qparams(-1.0, 3.0)
    assert z == np.uint8(64) and abs(float(s) - 4.0 / 255) < 1e-7  # zero is exactly representable
    s, z = activation_qparams(0.5, 2.0)  # a range that misses zero is widened to it
    assert z == 0 and abs(float(s) - 2.0 / 255) < 1e-7
    w = np.random.default_rng(0).normal(size=(8, 4, 3, 3)).astype(np.float32)
    w[3] = 0.0
    q, scale = weight_qparams(w)
    assert q.dtype == np.int8 and scale.shape == (8,) and np.abs(q).max() == 127
    back = q * scale[:, None, None, None]
    assert np.all(np.abs(back - w) <= scale[:, None, None, None] / 2 + 1e-7)
    assert np.all(q[3] == 0)


def test_qdq_file_quantizes_exactly_the_planned_convolutions(tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    monkeypatch.setenv("FACEMEND_CACHE", str(tmp_path))
    net = models.load("denoise", engine="torch").net
    src = export.export_onnx(net, "denoise", torch.zeros(1, 3, 64, 64))
    plan = load_plan(WEIGHTS_DIR / "denoise.safetensors", export.weights_hash(net))
    picked = list(plan["convs"])[:3]
    small = {"convs": {k: plan["convs"][k] for k in picked}}
    dst = qdq_onnx(src, small)
    assert dst != src and dst.parent == src.parent and qdq_onnx(src, small) == dst  # written once
    g = onnx.load(str(dst)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert len(convs) == len([n for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"])
    quantized = [n for n in convs if n.input[1].endswith("_dq")]
    assert sorted(n.input[1][:-3] for n in quantized) == sorted(picked)
    for k in picked:
        assert k not in inits and inits[f"{k}_q"].dtype == np.int8  # the float weights are gone
        w = net.state_dict()[k].float().numpy()
        back = inits[f"{k}_q"] * inits[f"{k}_qs"][:, None, None, None]
        assert np.abs(back - w).max() <= inits[f"{k}_qs"].max() / 2 + 1e-6
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) <= len(picked)


@needs_openvino
@pytest.mark.parametrize("task", _shipped())
def test_openvino_int8_restores_real_faces_as_f32_does(task, monkeypatch):
    """The shipped plan through OpenVINO (forced to int8, so on any CPU) against OpenVINO f32, on
    24 aligned validation faces with the task's evaluation degradation."""
    from test_engine import val_crops

    from models.training.data import to_tensor
    from models.training.degrade import degrade_batch

    crops = val_crops()
    bad, _ = degrade_batch(task, crops, seed=0, evaluation=True)
    x = to_tensor(bad)
    out = {}
    for precision in ("f32", "int8"):
        monkeypatch.setenv("FACEMEND_OPENVINO_PRECISION", precision)
        model = models.load(task, engine="openvino")
        assert model.engine == "openvino" and model.precision == precision
        with torch.inference_mode():
            y = torch.cat([model(x[i : i + 8], mirror=False) for i in range(0, len(x), 8)])
        out[precision] = np.rint(y.permute(0, 2, 3, 1).numpy() * 255.0)
    db = {p: float(np.mean([10 * np.log10(255.0**2 / np.mean((o[i] - crops[i]) ** 2)) for i in range(len(o))]))
          for p, o in out.items()}
    assert abs(db["int8"] - db["f32"]) <= 0.1, (task, db)
    diff = np.mean((out["int8"] - out["f32"]) ** 2)
    assert 10 * np.log10(255.0**2 / diff) > 42, (task, diff)  # a level or so apart, not another picture


@needs_openvino
def test_an_int8_plan_that_cannot_compile_leaves_the_network_in_openvino_f32(monkeypatch, caplog):
    import logging

    import models.quantize as Q

    def broken(src, plan):
        raise RuntimeError("no int8 kernels here")

    monkeypatch.setenv("FACEMEND_OPENVINO_PRECISION", "int8")
    monkeypatch.setattr(Q, "qdq_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="models.export"):
        model = models.load("denoise", engine="openvino")
    assert model.engine == "openvino" and model.precision == "f32"
    assert "int8 plan" in caplog.text and "no int8 kernels here" in caplog.text
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)

