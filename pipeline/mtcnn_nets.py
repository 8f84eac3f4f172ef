"""MTCNN's three networks with facenet-pytorch's weights, and the box arithmetic its detector uses.

The networks and helpers follow facenet-pytorch (MIT licence, github.com/timesler/facenet-pytorch)
line for line, and the weights are the ones its package ships (``facenet_pytorch/data``), found
without importing the package: importing it imports torchvision, whose ``ops`` import
``torch._dynamo`` (about 1.7 s of a job's start on two CPU cores). The two torchvision operators
the detector needs, ``nms`` and ``roi_align``, are called from torchvision's compiled library
(``vision_ops``), so the faces found are exactly the package's.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn


def weights_dir() -> Path:
    """facenet-pytorch's ``data`` folder (pnet.pt, rnet.pt, onet.pt), without importing it."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("facenet-pytorch is not installed: it ships MTCNN's weights")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class _Net(nn.Module):
    name = ""

    def load(self) -> "_Net":
        state = torch.load(weights_dir() / f"{self.name}.pt", map_location="cpu", weights_only=True)
        self.load_state_dict(state)
        return self.eval()


class PNet(_Net):
    name = "pnet"

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.softmax4_1 = nn.Conv2d(32, 2, 1), nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(_Net):
    name = "rnet"

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(_Net):
    name = "onet"

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


# --- box arithmetic (facenet-pytorch's detect_face helpers) ---------------------------------

def generate_boxes(reg, probs, scale: float, thresh: float):
    """P-Net's map -> candidate boxes (x1, y1, x2, y2, score, 4 regression values), image index."""
    stride, cellsize = 2, 12
    reg = reg.permute(1, 0, 2, 3)
    mask = probs >= thresh
    mask_inds = mask.nonzero()
    image_inds = mask_inds[:, 0]
    score = probs[mask]
    reg = reg[:, mask].permute(1, 0)
    bb = mask_inds[:, 1:].type(reg.dtype).flip(1)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cellsize - 1 + 1) / scale).floor()
    return torch.cat([q1, q2, score.unsqueeze(1), reg], dim=1), image_inds


def bbreg(boxes, reg):
    if reg.shape[1] == 1:
        reg = torch.reshape(reg, (reg.shape[2], reg.shape[3]))
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    b1, b2 = boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h
    b3, b4 = boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h
    boxes[:, :4] = torch.stack([b1, b2, b3, b4]).permute(1, 0)
    return boxes


def pad(boxes, w: int, h: int):
    """Boxes as 1-based inclusive pixel ranges clipped to the frame: (y, ey, x, ex) int arrays."""
    boxes = boxes.trunc().int().cpu().numpy()
    x, y, ex, ey = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def rerec(boxes):
    """Each box squared on its longer side, about its centre."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.max(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side.repeat(2, 1).permute(1, 0)
    return boxes


@functools.cache  # loaded once; every suppression and crop call reads it
def vision_ops():
    """torchvision's compiled operators (``torch.ops.torchvision``), loaded from its extension
    library without importing the Python package (whose ``ops`` import ``torch._dynamo``: about
    1.7 s of a job's start). Where that library is not found or does not load, the package is
    imported, which registers the same operators."""
    ops = torch.ops.torchvision
    if not hasattr(ops, "nms"):
        spec = importlib.util.find_spec("torchvision")
        places = list(spec.submodule_search_locations or []) if spec else []
        libs = [p for loc in places for p in sorted(Path(loc).glob("_C*")) if p.suffix in (".so", ".pyd", ".dylib")]
        try:
            torch.ops.load_library(str(libs[0]))
        except (IndexError, OSError, RuntimeError):
            import torchvision  # noqa: F401  # registers the same operators
    return ops


def batched_nms(boxes, scores, idxs, threshold: float):
    """torchvision's ``batched_nms``: indices kept by greedy IoU suppression within each image,
    highest score first. As there, over 1,000 boxes each image's are suppressed apart (the work
    grows with the square of the count), else all at once with each image's shifted apart."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    nms = vision_ops().nms
    if boxes.numel() > 4000:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for i in torch.unique(idxs):
            sel = torch.where(idxs == i)[0]
            keep[sel[nms(boxes[sel], scores[sel], float(threshold))]] = True
        kept = torch.where(keep)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    shifted = boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]
    return nms(shifted, scores, float(threshold))


def batched_nms_min(boxes, scores, idxs, threshold: float):
    """facenet-pytorch's last suppression ('Min': overlap over the smaller box's area, +1 areas)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    b = (boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]).cpu().numpy()
    s = scores.cpu().numpy()
    x1, y1, x2, y2 = (b[:, k].copy() for k in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    pick = []
    while order.size > 0:
        i = order[-1]
        pick.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[np.where(w * h / np.minimum(area[i], area[rest]) <= threshold)]
    return torch.as_tensor(np.asarray(pick, np.int64), device=boxes.device)


def crops(imgs: torch.Tensor, rois: np.ndarray, size: int) -> torch.Tensor:
    """torchvision's ``roi_align(imgs, rois, (size, size), 1.0, sampling_ratio=2, aligned=True)``:
    for each roi (image index, x1, y1, x2, y2 in pixel edges) a ``size`` x ``size`` crop whose
    every bin averages 2x2 bilinear samples."""
    r = torch.as_tensor(np.asarray(rois), dtype=imgs.dtype, device=imgs.device)
    parts = torch.get_num_threads() if imgs.device.type == "cpu" and len(r) >= 2 * _CROPS_MIN else 1
    if parts < 2 or _gomp() is None:
        return vision_ops().roi_align(imgs, r, 1.0, size, size, 2, True)
    # torchvision's CPU roi_align runs in one thread: the rois in one share per thread, side by
    # side, this thread cutting the first (each crop depends on its own roi alone: the same result)
    first, *rest = r.tensor_split(min(parts, len(r) // _CROPS_MIN))
    pool, align = _crop_pool(len(rest), os.getpid()), vision_ops().roi_align
    jobs = [pool.submit(align, imgs, s, 1.0, size, size, 2, True) for s in rest]
    return torch.cat([align(imgs, first, 1.0, size, size, 2, True)] + [j.result() for j in jobs])


_CROPS_MIN = 32  # rois per thread, at least: fewer are not worth a hand-over


@functools.cache
def _crop_pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """``threads`` helper threads of process ``pid`` (a forked child gets its own: the
    parent's pool has no threads there), each held to one OpenMP thread. A thread outside
    torch's own that runs a parallel loop gets an OpenMP team of its own, whose threads then
    compete with the main thread's: torch's eager networks ran 1.7x as long after such threads
    had cut one batch (the per-face loop of ``bench.throughput``)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="facemend-crops",
                              initializer=lambda: _gomp().omp_set_num_threads(1))


@functools.cache
def _gomp():
    """GNU OpenMP as torch loaded it (its Linux wheels), or None: the crops are then cut in this
    thread alone, as no helper thread could be held to one OpenMP thread."""
    import ctypes

    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
