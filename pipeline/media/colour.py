"""I420 planes, the clip's Y'CbCr matrix, and RGB changes written back into I420 frames."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import av
import cv2
import numpy as np


def i420_shape(yuv: np.ndarray) -> tuple[int, int]:
    """(height, width) of the picture an I420 array holds (its rows: luma, then both chroma planes)."""
    return yuv.shape[0] * 2 // 3, yuv.shape[1]


def i420_planes(yuv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of an I420 array's Y (H, W), U and V (H/2, W/2) planes. The chroma planes are
    packed one after the other, not row by row of the array: where H is not a multiple of 4 a
    chroma plane ends in the middle of one of the array's rows."""
    H, W = i420_shape(yuv)
    flat = yuv.reshape(-1)  # a view: the planes below write through to ``yuv``
    n, q = H * W, H * W // 4
    return yuv[:H], flat[n : n + q].reshape(H // 2, W // 2), flat[n + q : n + 2 * q].reshape(H // 2, W // 2)


@dataclass(frozen=True)
class YuvMatrix:
    """How a clip's Y'CbCr maps to RGB: the matrix coefficients (Kr, Kb) and the range.

    A BT.709 clip decoded with BT.601's matrix (what OpenCV's I420 conversions use) gives the
    network and the detector faces off in hue and saturation; the delta written back with the
    same wrong matrix round-trips, so the clip stays consistent, but what the network saw was
    not what a player shows. ``VideoPlan.yuv_matrix`` picks the one the clip declares."""

    name: str
    kr: float
    kb: float
    full_range: bool = False

    @functools.cache  # per face and per frame: computed once per matrix, read-only
    def rgb_to_yuv(self) -> np.ndarray:
        """(3, 3) float32: RGB 0..255 -> Y, Cb, Cr offsets from (16 or 0, 128, 128)."""
        kr, kb = self.kr, self.kb
        kg = 1.0 - kr - kb
        ys, cs = (255.0, 255.0) if self.full_range else (219.0, 224.0)
        m = np.array([[kr, kg, kb],
                      [-kr / (2 * (1 - kb)), -kg / (2 * (1 - kb)), 0.5],
                      [0.5, -kg / (2 * (1 - kr)), -kb / (2 * (1 - kr))]], np.float64)
        m *= np.array([[ys], [cs], [cs]]) / 255.0
        return _read_only(m.astype(np.float32))

    @functools.cache
    def yuv_to_rgb(self) -> np.ndarray:
        """(3, 4) float32 for ``cv2.transform``: Y, Cb, Cr 0..255 -> RGB 0..255."""
        inv = np.linalg.inv(self.rgb_to_yuv().astype(np.float64))
        offset = np.array([0.0 if self.full_range else 16.0, 128.0, 128.0])
        return _read_only(np.hstack([inv, -(inv @ offset)[:, None]]).astype(np.float32))


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


BT601 = YuvMatrix("bt601", 0.299, 0.114)
BT709 = YuvMatrix("bt709", 0.2126, 0.0722)
BT2020 = YuvMatrix("bt2020", 0.2627, 0.0593)
SMPTE240M = YuvMatrix("smpte240m", 0.212, 0.087)
FCC = YuvMatrix("fcc", 0.30, 0.11)
# AVColorSpace codes -> matrix (2 unspecified and 0 RGB/unknown: guessed from the frame height)
_COLORSPACES = {1: BT709, 4: FCC, 5: BT601, 6: BT601, 7: SMPTE240M, 9: BT2020, 10: BT2020}


def yuv_matrix(color: dict, height: int) -> YuvMatrix:
    """The matrix and range of a clip with colour description ``color`` (``VideoPlan.color``).
    An unspecified matrix is BT.709 from 720 rows up and BT.601 below, as players assume;
    ``color_range`` 2 (JPEG) is full range (yuvj and other converted sources keep theirs:
    ``to_i420``)."""
    m = _COLORSPACES.get(int(color.get("colorspace", 2)), BT709 if height >= 720 else BT601)
    full = int(color.get("color_range", 0)) == 2
    return m if not full else YuvMatrix(m.name + "-full", m.kr, m.kb, True)


def i420_to_rgb(yuv: np.ndarray, matrix: YuvMatrix = BT601, size: tuple[int, int] | None = None) -> np.ndarray:
    """An I420 frame as RGB uint8 (H, W, 3), chroma repeated over each 2x2 block. ``size``
    (width, height), smaller than the frame: the frame area-averaged to that size, converted
    from planes averaged to it in float and rounded once (what the detector looks at: a 1080p
    frame at 960x540 is its chroma planes and its luma averaged 2x2, about two thirds of the
    cost of converting it whole and shrinking the RGB; the same up to rounding and to where
    clipping to 0..255 falls, the conversion being linear)."""
    if size is not None and tuple(size) != i420_shape(yuv)[::-1]:
        y, u, v = i420_planes(yuv)
        ys = cv2.resize(y.astype(np.float32), size, interpolation=cv2.INTER_AREA)
        uv = cv2.merge([u, v]).astype(np.float32)
        if uv.shape[:2] != ys.shape[:2]:
            up = size[0] > uv.shape[1] or size[1] > uv.shape[0]
            uv = cv2.resize(uv, size, interpolation=cv2.INTER_LINEAR if up else cv2.INTER_AREA)
        rgb = cv2.transform(cv2.merge([ys, uv]), matrix.yuv_to_rgb())
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if matrix == BT601:  # OpenCV's own conversion (the same matrix, limited range)
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)
    y, u, v = i420_planes(yuv)
    uv = cv2.resize(cv2.merge([u, v]), y.shape[::-1], interpolation=cv2.INTER_NEAREST)
    # merged whole: splitting uv into its two channels first costs two strided copies (1080p:
    # 9.1 -> 7.0 ms a frame, the same bytes)
    return cv2.transform(cv2.merge([y, uv]), matrix.yuv_to_rgb())


class RgbView:
    """An I420 frame read as RGB one rectangle at a time: ``shape`` is the RGB frame's and
    ``view[y0:y1, x0:x1]`` (optionally ``, :3``) converts those pixels only, to the values
    ``i420_to_rgb`` gives them in the whole frame. A local network reads a window about each
    head: a few percent of a 1080p frame, whose whole conversion took an eighth of a video job's
    restore loop. ``np.asarray(view)`` converts the whole frame."""

    ndim, dtype = 3, np.dtype(np.uint8)

    def __init__(self, yuv: np.ndarray, matrix: YuvMatrix = BT601) -> None:
        self.yuv, self.matrix = yuv, matrix
        self.shape = (*i420_shape(yuv), 3)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple) or len(key) < 2 or not all(isinstance(k, slice) for k in key[:2]):
            raise TypeError("RgbView takes [rows, columns(, channels)] slices")
        H, W = self.shape[:2]
        (y0, y1, sy), (x0, x1, sx) = key[0].indices(H), key[1].indices(W)
        if sy != 1 or sx != 1:
            raise TypeError("RgbView takes slices without a step")
        y1, x1 = max(y0, y1), max(x0, x1)
        # whole chroma blocks: the rectangle grown to even edges (I420 frames have even sides)
        ey0, ex0, ey1, ex1 = y0 - y0 % 2, x0 - x0 % 2, min(H, y1 + y1 % 2), min(W, x1 + x1 % 2)
        if ey1 <= ey0 or ex1 <= ex0:
            rgb = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        else:
            Y, U, V = i420_planes(self.yuv)
            cy, cx = slice(ey0 // 2, ey1 // 2), slice(ex0 // 2, ex1 // 2)
            part = np.concatenate([Y[ey0:ey1, ex0:ex1].ravel(), U[cy, cx].ravel(), V[cy, cx].ravel()])
            rgb = i420_to_rgb(part.reshape((ey1 - ey0) * 3 // 2, ex1 - ex0), self.matrix)
            rgb = rgb[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0]
        return rgb[(slice(None), slice(None), *key[2:])] if len(key) > 2 else rgb

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rgb = i420_to_rgb(self.yuv, self.matrix)
        return rgb if dtype is None else rgb.astype(dtype)


def add_rgb_delta(yuv: np.ndarray, rect: tuple[int, int, int, int], delta: np.ndarray,
                  matrix: YuvMatrix = BT601) -> None:
    """Add an RGB delta (h, w, 3 float32) over ``rect`` (x0, y0, x1, y1) to an I420 frame in place,
    through the clip's ``matrix`` (the one its RGB was read with).

    Luma gets the delta at full resolution; chroma gets it averaged over 2x2 blocks. Pixels and
    chroma blocks where the delta is zero are left bit-exact.
    """
    H, W = i420_shape(yuv)
    x0, y0, x1, y1 = rect
    # grow the rectangle to even coordinates so chroma blocks are whole
    ex0, ey0 = x0 - x0 % 2, y0 - y0 % 2
    ex1, ey1 = min(W, x1 + x1 % 2), min(H, y1 + y1 % 2)
    d = np.zeros((ey1 - ey0, ex1 - ex0, 3), np.float32)
    d[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0] = delta
    dyuv = cv2.transform(d, matrix.rgb_to_yuv())  # (h, w, 3); numpy's matmul on 3 channels is 7x slower
    Y, cu, cv_ = i420_planes(yuv)
    region = Y[ey0:ey1, ex0:ex1]
    dy = dyuv[..., 0]
    touched = dy != 0
    region[touched] = np.clip(np.rint(region[touched] + dy[touched]), 0, 255).astype(np.uint8)
    hh, ww = (ey1 - ey0) // 2, (ex1 - ex0) // 2
    if hh == 0 or ww == 0:
        return
    # the mean of each 2x2 block (area resizing by exactly 2 is that mean, ~9x numpy's reshape-mean)
    duv = cv2.resize(np.ascontiguousarray(dyuv[: hh * 2, : ww * 2, 1:]), (ww, hh), interpolation=cv2.INTER_AREA)
    cy0, cx0 = ey0 // 2, ex0 // 2
    for plane, dc in ((cu, duv[..., 0]), (cv_, duv[..., 1])):
        reg = plane[cy0 : cy0 + hh, cx0 : cx0 + ww]
        t = dc != 0
        reg[t] = np.clip(np.rint(reg[t] + dc[t]), 0, 255).astype(np.uint8)


def source_range(frame: av.VideoFrame) -> int:
    """The frame's colour range code: 2 (JPEG, full) when it says so or its pixel format is a
    full-range yuvj one, else its own tag (1 limited, 0 unspecified, which players read as
    limited)."""
    code = int(frame.color_range)
    return 2 if code == 2 or frame.format.name.startswith("yuvj") else code
