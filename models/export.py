"""Inference engines for the small convolutional networks: PyTorch, ONNX Runtime or OpenVINO.

``runner(module, name, engine, device, sample)`` gives a callable that computes what
``module(x)`` does (torch tensors in, torch tensors out), run by the chosen engine; ``None`` means
"call the module itself" (torch). The restoration networks (``models.registry.load``) and
MTCNN's three networks (``pipeline.mtcnn``) go through it.

Engines, by name (``--engine``, ``FACEMEND_ENGINE``):
- ``torch``: the PyTorch module as it is (on CUDA: fp16, the pipeline's GPU path);
- ``onnxruntime``: the module exported to ONNX (fp32) and run by ONNX Runtime;
- ``openvino``: the same ONNX file compiled by OpenVINO: the restoration networks in bf16 on a
  CPU that computes bf16 natively (AVX-512 BF16, AMX); on other x86-64 CPUs with the
  convolutions their int8 plan names in int8 (``models.quantize``) and the rest in f32; MTCNN
  in f32 everywhere (a detector thresholds its scores: it stays exact).
  ``FACEMEND_OPENVINO_PRECISION=f32`` keeps every network in f32, ``int8`` takes the int8 plans
  on a bf16 CPU too;
- ``auto``: on CUDA torch; on CPU the first installed of ``cpu_order()`` (restoration networks:
  OpenVINO first where it runs them in bf16 or int8 (x86-64), ONNX Runtime first elsewhere) or
  ``MTCNN_CPU_ORDER`` (fastest first, as measured by ``bench.throughput --engine``), else torch.

The ONNX file is exported once per network and weights, with dynamic batch, height and width,
and cached under ``cache_dir()`` (``$FACEMEND_CACHE/onnx``, default ``~/.cache/facemend/onnx``)
as ``NAME-SHA256.onnx``, the hash taken over the weights: new weights give a new file. It is
written under a temporary name and renamed, so concurrent workers never read a half-written
file. Nothing is downloaded. An engine that is not installed, or whose export or load fails,
falls back to torch with one warning.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
# CPU engines, fastest first (bench.throughput --engine all, networks_ms_per_face, 2 busy
# cores): the denoise U-Net ran 2.2-3.8x as fast in ONNX Runtime as in torch (128 px crops at
# batch 1: 70 against 263 ms per face; batch 16: 46 against 103), as fast as in OpenVINO at the
# pipeline's batches and faster at batch 1 (97 ms); MTCNN on 960x540 frames took 271 ms a frame
# in OpenVINO, 394 in ONNX Runtime, 492 in torch. Both are dependencies; where OpenVINO cannot
# load, ONNX Runtime runs MTCNN too
CPU_ORDER = ("onnxruntime", "openvino")
# On a CPU with native bf16 (AMD Zen 4, Intel Sapphire Rapids and later) OpenVINO runs the
# restoration networks in bf16 about 2.3x as fast as ONNX Runtime fp32 (denoise, 2 cores: 5.7
# against 14.0 ms per 128 px face at batch 16, 34 against 80 ms per 320x256 head at batch 1),
# within 0.01 dB of torch fp32 on validation crops (models.training.parity)
BF16_CPU_ORDER = ("openvino", "onnxruntime")
# Elsewhere (AVX2, AVX-512 without bf16) OpenVINO runs each restoration network's int8 plan
# (models.quantize): denoise on a 2-core AVX2 AMD EPYC, 128 px faces at batch 8, 7.5 against
# 13.3 ms a face in f32 (ONNX Runtime f32: 11 % slower than OpenVINO f32 there), within 0.05 dB
# of f32 on validation faces (models.training.quantize)
INT8_CPU_ORDER = ("openvino", "onnxruntime")
MTCNN_CPU_ORDER = ("openvino", "onnxruntime")
EXPORT_VERSION = "1"  # part of the cache key: bump when the export itself changes
OPSET = 17

_warned: set[str] = set()


def requested(engine: str | None = None) -> str:
    """The engine asked for: ``engine``, else ``$FACEMEND_ENGINE``, else ``auto``."""
    name = (engine or os.environ.get("FACEMEND_ENGINE") or "auto").strip().lower()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    return name


def installed(name: str) -> bool:
    """True when the engine's Python package (and the ``onnx`` exporter it needs) is importable."""
    if name == "torch":
        return True
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[name]
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec("onnx") is not None


PRECISIONS = ("auto", "f32", "bf16", "int8")


def openvino_precision() -> str:
    """``$FACEMEND_OPENVINO_PRECISION``: ``auto`` (the restoration networks in bf16 where the CPU
    has it, else in their int8 plans), ``f32``, ``bf16`` or ``int8`` (the plans on any CPU)."""
    name = (os.environ.get("FACEMEND_OPENVINO_PRECISION") or "auto").strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"FACEMEND_OPENVINO_PRECISION={name!r}: choose one of {', '.join(PRECISIONS)}")
    return name


_cpu_caps: tuple[str, ...] | None = None


def _openvino_caps() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES for this CPU, asked once; none without OpenVINO."""
    global _cpu_caps
    if _cpu_caps is None:
        _cpu_caps = ()
        if installed("openvino"):
            try:
                import openvino as ov

                _cpu_caps = tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            except Exception as e:  # noqa: BLE001 - a broken install: as if it had none
                log.debug("openvino capabilities: %s", e)
    return _cpu_caps


def bf16_cpu() -> bool:
    """True when OpenVINO is installed and says this CPU computes bf16 natively."""
    return "BF16" in _openvino_caps()


def int8_cpu() -> bool:
    """True on an x86-64 CPU where OpenVINO is installed and says it computes int8 (AVX2 and
    later: where the int8 plans were measured; elsewhere they are used only when asked for)."""
    return platform.machine().lower() in ("x86_64", "amd64") and "INT8" in _openvino_caps()


def cpu_order() -> tuple[str, ...]:
    """The restoration networks' CPU engines, fastest first, on this machine."""
    asked = openvino_precision()
    if asked == "f32":
        return CPU_ORDER
    if bf16_cpu() and asked != "int8":
        return BF16_CPU_ORDER
    return INT8_CPU_ORDER if int8_cpu() or asked == "int8" else CPU_ORDER


def resolve(engine: str | None, device: str | torch.device = "cpu", order=None) -> str:
    """The engine that will run on ``device``: ``auto`` made concrete (see the module doc) as
    the first installed engine of ``order`` (default ``cpu_order()``) on CPU, torch on CUDA."""
    name = requested(engine)
    if name == "auto":
        if torch.device(device).type == "cuda":
            return "torch"
        return next((e for e in (order or cpu_order()) if installed(e)), "torch")
    return name


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def cache_dir() -> Path:
    """Where exported ONNX files are kept: ``$FACEMEND_CACHE/onnx``, else the user cache."""
    root = os.environ.get("FACEMEND_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "facemend" / "onnx"


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's class, tensor names, shapes and fp32 values."""
    h = hashlib.sha256(f"{EXPORT_VERSION}:{OPSET}:{type(module).__qualname__}".encode())
    for k, v in module.state_dict().items():
        t = v.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def export_onnx(module: torch.nn.Module, name: str, sample: torch.Tensor) -> Path:
    """The module's ONNX file in ``cache_dir()``, exported now if it is not there yet. ``sample``:
    an input of the right rank and channels (batch, height and width are made dynamic)."""
    module = module.float().to(memory_format=torch.contiguous_format).eval()
    path = cache_dir() / f"{name}-{weights_hash(module)}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        outputs = module(sample)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    out_names = [f"y{i}" for i in range(n_out)]
    axes = {"x": {0: "batch", 2: "height", 3: "width"}}
    for o, y in zip(out_names, outputs if n_out > 1 else [outputs]):
        axes[o] = {0: "batch"} | ({2: f"{o}_height", 3: f"{o}_width"} if y.ndim == 4 else {})
    def save(tmp: str) -> None:
        import warnings

        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (sample.float().contiguous(),), tmp, input_names=["x"],
                              output_names=out_names, dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
    write_atomically(path, save)
    return path


def write_atomically(path: Path, save) -> None:
    """``save(tmp)`` writes the file under a temporary name beside ``path``, then it is renamed:
    concurrent workers never read a half-written file, and a failed write leaves nothing."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _threads() -> int:
    return max(1, torch.get_num_threads())


class OrtRunner:
    """An ONNX file run by ONNX Runtime (fp32); called like the module it was exported from."""

    engine = "onnxruntime"
    precision = "f32"

    def __init__(self, path: Path, device: torch.device, bf16: bool = False, int8=None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _threads()  # as torch's (FACEMEND_TORCH_THREADS)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting between calls: decode and encode threads share the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.device = device
        self.n_out = len(self.session.get_outputs())
        # The pipeline runs each network at many shapes (P-Net's pyramid, bucketed head windows,
        # batches padded to 64), and the CPU arena keeps the largest allocations of each: shrinking
        # it after every run took walking_1080p's peak RSS from 2.57 to 2.07 GB at the same speed
        # (turning the arena off: 1.73 GB, detection 20 % slower)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, x: torch.Tensor):
        dtype = x.dtype
        ys = self.session.run(None, {"x": _numpy(x)}, self.run_options)
        ys = [torch.from_numpy(y).to(self.device, dtype) for y in ys]
        return ys[0] if self.n_out == 1 else tuple(ys)

    def __deepcopy__(self, memo):  # sessions are shared, not copied (they are thread-safe)
        return self


class OpenVinoRunner(OrtRunner):
    """An ONNX file compiled by OpenVINO for the CPU: in bf16 when ``bf16`` (the network's
    outputs tolerate it), the CPU has it and ``openvino_precision()`` allows it; else with its
    int8 plan (``int8``: a callable giving the plan or None) where one is shipped and allowed;
    else f32."""

    engine = "openvino"

    def __init__(self, path: Path, device: torch.device, bf16: bool = False, int8=None) -> None:  # noqa: D107
        if device.type != "cpu":
            raise RuntimeError("the openvino engine runs on CPU only")
        import openvino as ov

        core = ov.Core()
        asked = openvino_precision()
        self.precision = "bf16" if (asked == "bf16" or (asked == "auto" and bf16)) and bf16_cpu() else "f32"
        options = {"INFERENCE_NUM_THREADS": _threads(), "PERFORMANCE_HINT": "LATENCY"}
        use_int8 = asked == "int8" or (asked == "auto" and int8_cpu())
        plan = int8() if int8 is not None and self.precision == "f32" and use_int8 else None
        self.compiled = None
        if plan:
            try:
                from .quantize import qdq_onnx

                self.compiled = core.compile_model(str(qdq_onnx(path, plan)), "CPU",
                                                   {**options, "INFERENCE_PRECISION_HINT": "f32"})
                self.precision = "int8"
            except Exception as e:  # noqa: BLE001 - the f32 network still runs
                warn_once(f"openvino could not run {path.stem}'s int8 plan ({type(e).__name__}: {e}): running it in f32")
        if self.compiled is None:
            self.compiled = core.compile_model(str(path), "CPU", {**options, "INFERENCE_PRECISION_HINT": self.precision})
        self.request = self.compiled.create_infer_request()
        self.device = device
        self.n_out = len(self.compiled.outputs)

    def __call__(self, x: torch.Tensor):
        dtype = x.dtype
        res = self.request.infer({0: _numpy(x)}, share_inputs=True)
        ys = [torch.from_numpy(np.array(res[o])).to(self.device, dtype) for o in self.compiled.outputs]
        return ys[0] if self.n_out == 1 else tuple(ys)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).contiguous().numpy())


RUNNERS = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}


def runner(module: torch.nn.Module, name: str, engine: str | None, device: str | torch.device,
           sample: torch.Tensor, order=None, bf16: bool = False, int8=None):
    """A callable running ``module`` with ``engine`` on ``device`` (see the module doc), or None
    when torch runs it (asked for, ``auto``'s choice from ``order``, or the fallback after one
    warning). bf16: the network may run in bf16 where the engine and CPU can (its parity with
    fp32 is tested: the restoration networks); int8: a callable giving its int8 plan
    (``models.quantize``) or None, used by OpenVINO where bf16 is not."""
    device = torch.device(device)
    choice = resolve(engine, device, order)
    if choice == "torch":
        return None
    if not installed(choice):
        warn_once(f"engine {choice!r} is not installed (pip install 'facemend[{choice}]' or "
                  f"{choice} and onnx): running the networks in torch")
        return None
    try:
        import copy

        path = export_onnx(copy.deepcopy(module).to("cpu"), name, sample.to("cpu", torch.float32))
        return RUNNERS[choice](path, device, bf16=bf16, int8=int8)
    except Exception as e:  # noqa: BLE001 - any failure of an optional engine: torch still works
        warn_once(f"engine {choice!r} could not run {name} ({type(e).__name__}: {e}): "
                  "running it in torch")
        return None


def engine_of(run) -> str:
    """The engine a ``runner`` result runs with."""
    return "torch" if run is None else run.engine


def precision_of(run) -> str:
    """The precision a ``runner`` result computes in on CPU: f32, bf16 or int8."""
    return "f32" if run is None else run.precision
