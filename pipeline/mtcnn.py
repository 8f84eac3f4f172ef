"""MTCNN detection over a batch of frames, with facenet-pytorch's networks and weights.

facenet-pytorch's ``detect_face`` cuts every candidate box out of the frame and resizes it with
its own ``interpolate`` call before the second and third stages: thousands of tiny calls per
batch, which took ~3 s per 960x540 frame on two CPU cores. Here the same three networks run on
the same pyramid, but the candidate crops of a whole batch are cut and resized in one
``roi_align`` call per stage (``mtcnn_nets.crops``). Thresholds, NMS and box regression follow
facenet-pytorch (``mtcnn_nets``), so the faces found are the same up to resampling.
The three networks run in the inference engine asked for (``models.export``: torch, ONNX
Runtime or OpenVINO; ``auto`` by default).

The second and third stages see as many candidates as the pyramid found: a different number on
every call. An inference engine keeps memory for its largest input and plans anew for every new
shape, so its memory grew with the clip's length. They run instead in calls of at most
``STAGE_CHUNK`` candidates, the last one padded to a multiple of ``STAGE_STEP`` (of
``STAGE_SMALL`` up to ``STAGE_STEP``, as a search around one face finds a few): fifteen shapes at
most over a whole clip, and memory bounded by the chunk. Each candidate's result depends on
its own crop alone, so the faces found are the same.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import interpolate

from .mtcnn_nets import ONet, PNet, RNet, batched_nms, batched_nms_min, bbreg, crops, generate_boxes, pad, rerec


class FastMTCNN(torch.nn.Module):
    """``detect(batch)`` -> per image (boxes (N, 4), probs (N,), points (N, 5, 2)) numpy arrays."""

    STAGE_CHUNK = 512  # R- and O-Net candidates per call
    STAGE_STEP = 64  # a shorter call is padded to a multiple of this many candidates...
    STAGE_SMALL = 8  # ... or, up to STAGE_STEP, of this many (O-Net: 64 crops cost 13x 8 crops)

    def __init__(self, *, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 device: str | torch.device = "cpu", engine: str | None = None) -> None:
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet().load(), RNet().load(), ONet().load()  # facenet-pytorch's
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        self.device = torch.device(device)
        self.to(self.device).eval()
        # channels-last runs the three networks' convolutions and max-pools about twice as fast
        # on CPU (oneDNN); the results are the same up to float rounding
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        from models.export import MTCNN_CPU_ORDER, engine_of, runner

        # (P, R, O) callables: an engine's runner, or the torch module (a tuple: not submodules)
        self.runs = tuple(runner(net, name, engine, self.device, torch.zeros(1, 3, size, size),
                                 MTCNN_CPU_ORDER) or net
                          for net, name, size in ((self.pnet, "mtcnn-pnet", 12), (self.rnet, "mtcnn-rnet", 24),
                                                  (self.onet, "mtcnn-onet", 48)))
        self.engine = engine_of(None if self.runs[0] is self.pnet else self.runs[0])
        if self.engine != "torch":  # the engines take plain NCHW arrays
            self.memory_format = torch.contiguous_format

    def _crops(self, imgs: torch.Tensor, boxes: torch.Tensor, inds: torch.Tensor, size: int) -> torch.Tensor:
        h, w = imgs.shape[2:4]
        y, ey, x, ex = pad(boxes, w, h)  # 1-based inclusive, clipped to the frame (as facenet)
        out = crops(imgs, np.stack([inds.cpu().numpy(), x - 1, y - 1, ex, ey], 1), size)
        return ((out - 127.5) * 0.0078125).contiguous(memory_format=self.memory_format)

    def _stage(self, k: int, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Network ``k`` (1: R-Net, 2: O-Net) on the candidates' crops, in calls of at most
        ``STAGE_CHUNK``, each padded with blank crops to a multiple of ``STAGE_STEP``."""
        outs = []
        for s in range(0, len(crops), self.STAGE_CHUNK):
            part = crops[s : s + self.STAGE_CHUNK]
            n = len(part)
            step = self.STAGE_SMALL if n <= self.STAGE_STEP else self.STAGE_STEP
            want = min(self.STAGE_CHUNK, -(-n // step) * step)
            if want > n:
                part = torch.cat([part, part.new_zeros((want - n, *part.shape[1:]))])
            ys = self.runs[k](part.contiguous(memory_format=self.memory_format))
            outs.append([y[:n] for y in ys])
        return tuple(torch.cat(ys) for ys in zip(*outs))

    @torch.inference_mode()
    def detect(self, batch: np.ndarray):
        # (B, 3, H, W), contiguous: area resizing and roi_align run ~1.7x as fast as on the
        # channels-last strides the permuted (B, H, W, 3) frames have
        if self.device.type == "cpu":  # transposed in uint8 first: half the time of a float permute
            imgs = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
        else:
            imgs = torch.as_tensor(batch, device=self.device).permute(0, 3, 1, 2).float().contiguous()
        n, _, h, w = imgs.shape
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales = []
        s = m
        while minl >= 12:
            scales.append(s)
            s *= self.factor
            minl *= self.factor
        if not scales:  # the frame is smaller than the smallest face asked for: none can be in it
            return [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
                    for _ in range(n)]

        boxes, image_inds = [], []
        for scale in scales:
            im = interpolate(imgs, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, probs = self.runs[0](((im - 127.5) * 0.0078125).contiguous(memory_format=self.memory_format))
            b, ii = generate_boxes(reg, probs[:, 1], scale, self.thresholds[0])
            pick = batched_nms(b[:, :4], b[:, 4], ii, 0.5)
            boxes.append(b[pick])
            image_inds.append(ii[pick])
        boxes = torch.cat(boxes)
        image_inds = torch.cat(image_inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[pick], image_inds[pick]
        regw = boxes[:, 2] - boxes[:, 0]
        regh = boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                             boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                             boxes[:, 4]]).permute(1, 0)
        boxes = rerec(boxes)

        if len(boxes):
            reg, prob = self._stage(1, self._crops(imgs, boxes, image_inds, 24))
            score = prob[:, 1]
            ok = score > self.thresholds[1]
            boxes = torch.cat((boxes[ok, :4], score[ok].unsqueeze(1)), dim=1)
            image_inds, mv = image_inds[ok], reg[ok]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
            boxes = rerec(bbreg(boxes, mv))

        points = torch.zeros(0, 5, 2, device=self.device)
        if len(boxes):
            reg, lm, prob = self._stage(2, self._crops(imgs, boxes, image_inds, 48))
            score = prob[:, 1]
            ok = score > self.thresholds[2]
            lm, mv = lm[ok], reg[ok]
            boxes = torch.cat((boxes[ok, :4], score[ok].unsqueeze(1)), dim=1)
            image_inds = image_inds[ok]
            w_i = (boxes[:, 2] - boxes[:, 0] + 1).unsqueeze(1)
            h_i = (boxes[:, 3] - boxes[:, 1] + 1).unsqueeze(1)
            px = w_i * lm[:, :5] + boxes[:, 0:1] - 1
            py = h_i * lm[:, 5:10] + boxes[:, 1:2] - 1
            points = torch.stack((px, py), dim=2)  # (N, 5, 2)
            boxes = bbreg(boxes, mv)
            pick = batched_nms_min(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

        boxes = boxes.cpu().numpy()
        points = points.cpu().numpy()
        image_inds = image_inds.cpu().numpy()
        return [(boxes[image_inds == i, :4], boxes[image_inds == i, 4], points[image_inds == i])
                for i in range(n)]
