"""Five-point face alignment: warp a face to a template crop and paste a restored crop back.

The template is the FFHQ five-point template (512 px: left eye, right eye, nose, left mouth
corner, right mouth corner) zoomed in by ``TEMPLATE_ZOOM`` about a point below its centre, so
that the face fills more of a small crop than FFHQ's hair-and-shoulders framing. Training crops
(``models.training.data``) and inference crops are made by the same ``warp_face`` call.

Paste-back adds the *change* the model made (restored - crop), warped back by the inverse
similarity transform and weighted by a feathered mask, to the original frame. With an identity
model the change is zero and the frame comes back bit-exact; pixels outside the mask are never
touched.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

FFHQ_TEMPLATE_512 = np.array(
    [[192.98, 239.95], [318.90, 240.19], [256.63, 314.02], [201.26, 371.41], [313.09, 371.15]],
    dtype=np.float64,
)
TEMPLATE_ZOOM = 1.4  # > 1 zooms in: eye distance becomes ~0.34 of the crop width
TEMPLATE_CENTRE = np.array([0.5, 0.62])  # zoom about this point: eyes at y~0.41, mouth ~0.77

# Crop sizes used when restoring at a size matched to the face (all multiples of 32).
CROP_SIZES = (128, 192, 256, 384, 512)


def template(size: int) -> np.ndarray:
    """The five template points for a ``size`` x ``size`` crop, shape (5, 2)."""
    unit = FFHQ_TEMPLATE_512 / 512.0
    unit = TEMPLATE_CENTRE + (unit - TEMPLATE_CENTRE) * TEMPLATE_ZOOM
    return unit * size


def estimate_transform(landmarks: np.ndarray, size: int, aspect: float = 1.0) -> np.ndarray:
    """2x3 matrix mapping frame coordinates to a ``size`` crop (landmarks: (5, 2)): a similarity
    on the face as shown. ``aspect``: the frame's pixel aspect ratio (64:45 on a 16:9 PAL DVD,
    4:3 on HDV); where it is not 1 the stored faces are squeezed and x is widened by it first, so
    the crop shows the face in its true shape, as the network saw faces in training."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2) * (aspect, 1.0)
    dst = template(size)
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if matrix is None:  # degenerate points (all equal): fall back to least squares
        matrix = _umeyama(src, dst)
    return matrix * (aspect, 1.0, 1.0)  # frame -> shown (x times aspect) -> crop


def zoomed(landmarks: np.ndarray, zoom: float) -> np.ndarray:
    """``landmarks`` spread by ``zoom`` about their centroid: the crop ``estimate_transform``
    makes of them shows the face ``1 / zoom`` times as large, about the same centre."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if zoom == 1.0:
        return pts
    centre = pts.mean(0)
    return (pts - centre) * zoom + centre


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991), used when RANSAC/LMEDS gives up."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s**2).sum() / len(src)
    if var < 1e-9:
        return np.array([[1.0, 0, dst[0, 0] - src[0, 0]], [0, 1.0, dst[0, 1] - src[0, 1]]])
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    rot = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / var
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def face_scale(landmarks: np.ndarray) -> float:
    """The crop size (px) at which this face would be warped without resampling scale."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_dist = np.linalg.norm(pts[1] - pts[0])
    eye_mouth = np.linalg.norm((pts[3] + pts[4]) / 2 - (pts[0] + pts[1]) / 2)
    t = template(1.0)
    t_eye = np.linalg.norm(t[1] - t[0])
    t_em = np.linalg.norm((t[3] + t[4]) / 2 - (t[0] + t[1]) / 2)
    return float(max(eye_dist / t_eye, eye_mouth / t_em))


def matched_size(landmarks: np.ndarray, base: int = 128, max_size: int = 512) -> int:
    """Smallest crop size in CROP_SIZES (>= base, <= max_size) that holds the face unshrunk."""
    need = face_scale(landmarks)
    for s in CROP_SIZES:
        if s >= base and s >= need:
            return min(s, max_size)
    return max_size


ANTIALIAS_BELOW = 0.9  # warp_face filters when the crop shrinks the face to under this scale


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int, height: int | None = None,
              antialias: bool = True) -> np.ndarray:
    """Aligned ``size`` x ``size`` crop of ``image`` (H, W, C) under ``matrix``; with ``height``,
    a ``size`` wide, ``height`` tall crop: the same template, with ``height - size`` more rows
    below the square one. Pixels the crop takes from outside the image are the image reflected.

    A face larger than the crop is shrunk, and ``cv2.warpAffine`` samples without a low-pass
    filter: a 250 px UTKFace face warped to 128 px (scale 0.49) aliases, its crop differing from
    a filtered one by 31 dB PSNR (26 dB for one face in ten), and the network sees, and training
    taught it, texture that is not on the face. With ``antialias`` the part of the image the crop
    covers is first shrunk to the crop's scale (``cv2.pyrDown`` halvings, then ``cv2.INTER_AREA``),
    then warped at about 1:1; a face enlarged, or shrunk by less than a tenth (``ANTIALIAS_BELOW``),
    is warped directly, as before."""
    height = height or size
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if antialias and scale < ANTIALIAS_BELOW:
        image, matrix = _shrunk_source(image, matrix, size, height, scale)
    return cv2.warpAffine(image, matrix, (size, height), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT101)


def _shrunk_source(image: np.ndarray, matrix: np.ndarray, size: int, height: int,
                   scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``image`` a crop covers, area-averaged to the crop's ``scale``, and the crop's
    matrix on it. The part keeps the image's own edges where it reaches them, so the crop's
    reflection of the image there is the same; elsewhere it runs a margin past what the crop
    samples, so the part's own edges are never reached."""
    h, w = image.shape[:2]
    inv = cv2.invertAffineTransform(matrix)  # crop -> image
    # the part is that of a crop 5/4 as tall as wide (unmask's 128 x 160) or taller, whatever
    # ``height`` is asked for, so such a crop's top rows are exactly the square crop (both are
    # resampled on one grid)
    tall = max(height, size + size // 4)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, tall, 1], [size, tall, 1]], np.float64) @ inv.T
    margin = 4.0 / scale
    x0 = int(max(0, np.floor(corners[:, 0].min() - margin)))
    y0 = int(max(0, np.floor(corners[:, 1].min() - margin)))
    x1 = int(min(w, np.ceil(corners[:, 0].max() + margin)))
    y1 = int(min(h, np.ceil(corners[:, 1].max() + margin)))
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies wholly outside the image
        return image, matrix
    part = image[y0:y1, x0:x1]
    # part pixel -> image pixel; halvings first (cv2.pyrDown: a 5x5 Gaussian, then every other
    # pixel, so pixel u lies at 2u), twice as fast as one large area resize
    to_image = np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])
    while scale <= 0.5 and min(part.shape[:2]) >= 8:
        part = cv2.pyrDown(part)
        to_image = to_image @ np.diag([2.0, 2.0, 1.0])
        scale *= 2.0
    ph, pw = part.shape[:2]
    dw, dh = max(1, round(pw * scale)), max(1, round(ph * scale))
    if (dw, dh) != (pw, ph):
        part = cv2.resize(part, (dw, dh), interpolation=cv2.INTER_AREA)
        sx, sy = dw / pw, dh / ph  # part pixel -> small pixel, per axis
        # a small pixel's centre (u, v) lies at part ((u + 0.5) / sx - 0.5, ...)
        to_image = to_image @ np.array([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1]])
    return part, matrix @ to_image


def outside_frame(matrix: np.ndarray, size: int, height: int, frame_shape: tuple[int, int]) -> np.ndarray:
    """Which pixels of a ``warp_face`` crop (``size`` wide, ``height`` tall) under ``matrix``
    fall outside the frame, where ``warp_face`` fills them by reflection. bool (height, size)."""
    h, w = frame_shape[:2]
    inv = cv2.invertAffineTransform(matrix)  # crop -> frame
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, height - 1, 1], [size - 1, height - 1, 1]]) @ inv.T
    if (corners >= -0.5).all() and (corners[:, 0] <= w - 0.5).all() and (corners[:, 1] <= h - 0.5).all():
        return np.zeros((height, size), bool)  # the usual face: its crop's corners, so all of it, inside
    ys, xs = np.mgrid[0:height, 0:size].astype(np.float64)
    fx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    fy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    return (fx < -0.5) | (fx > w - 0.5) | (fy < -0.5) | (fy > h - 0.5)


@functools.lru_cache(maxsize=16)
def feather_mask(size: int) -> np.ndarray:
    """Soft paste mask for a crop: 1 over the face, falling smoothly to 0 well inside the border.

    An ellipse around the template face (eyes to chin, cheek to cheek), eroded and blurred, so
    the crop's corners (background, other people) are never written back. float32 (size, size).
    """
    t = template(size)
    centre = ((t[0] + t[1]) / 2 + (t[3] + t[4]) / 2) / 2
    eye_dist = np.linalg.norm(t[1] - t[0])
    axes = (int(round(eye_dist * 1.2)), int(round(eye_dist * 1.5)))
    mask = np.zeros((size, size), np.float32)
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), axes, 0, 0, 360, 1.0, -1)
    k = max(3, int(size * 0.06) | 1)
    mask[:k, :] = mask[-k:, :] = 0  # zero borders so erosion and blur fall to 0 at the edges
    mask[:, :k] = mask[:, -k:] = 0
    mask = cv2.erode(mask, np.ones((k, k), np.uint8))
    blur = max(3, int(size * 0.12) | 1)
    mask = cv2.GaussianBlur(mask, (blur, blur), 0)
    mask.setflags(write=False)
    return mask


def aside(matrix: np.ndarray, columns: int) -> np.ndarray:
    """``matrix`` (image -> a template crop) moved ``columns`` to the right: the crop it makes
    ``2 * columns`` wider shows the same template square with that many columns beside it on
    each side (unmask: the cheeks out to the ears, where a mask's straps run)."""
    if not columns:
        return matrix
    out = np.array(matrix, np.float64)
    out[0, 2] += columns
    return out


@functools.lru_cache(maxsize=16)
def colour_region(size: int, height: int | None = None, aside: int = 0) -> np.ndarray:
    """Weights for colour matching: the feathered face above the nose tip.

    The upper face is what no task is meant to change (a mask covers nose and mouth), so its
    mean colour is a fair reference for every task, unmask included. (height, size + 2 * aside)
    float32; rows below the square crop (``warp_face``'s ``height``) and the ``aside`` columns
    beside it weigh 0.
    """
    t = template(size)
    region = np.zeros((height or size, size + 2 * aside), np.float32)
    region[:size, aside : aside + size] = feather_mask(size)
    region[int(round(t[2, 1])) :] = 0
    region.setflags(write=False)
    return region


def match_colour(restored: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift each channel of ``restored`` so its mean under ``mask`` equals the original's.

    Only the mean is matched: matching the spread would put back the noise a denoiser removed.
    Arrays are float32 (H, W, C) in the same range.
    """
    w = np.ascontiguousarray(mask, np.float32).reshape(-1)
    total = float(w.sum()) + 1e-6
    c = restored.shape[-1]
    # weighted channel sums as one matrix-vector product each (BLAS; ~10x the broadcast product)
    shift = (w @ original.reshape(-1, c) - w @ restored.reshape(-1, c)) / total
    return restored + shift.astype(np.float32)


def match_colour_robust(restored: np.ndarray, original: np.ndarray, mask: np.ndarray,
                        spread: float = 12.0) -> np.ndarray:
    """``match_colour`` for a network that repaints part of the reference region (unmask: a mask
    pulled up over the nose lies in the upper face): each channel is shifted by the mean
    difference over the pixels of ``mask`` (weight over 0.5) whose difference lies within
    ``spread`` levels of the median difference, so the repainted pixels, far from it, do not
    pull the face's colour towards the mask's."""
    sel = mask > 0.5
    if not sel.any():
        return match_colour(restored, original, mask)
    diff = (original[sel] - restored[sel]).astype(np.float32)  # (n, C)
    med = np.median(diff, axis=0)
    close = np.all(np.abs(diff - med) <= spread, axis=-1)
    shift = diff[close].mean(axis=0) if close.sum() >= 16 else med
    return restored + shift.astype(np.float32)


def _frame_rect(matrix: np.ndarray, size: int, frame_shape: tuple[int, int], height: int | None = None):
    """The frame rectangle a ``size`` crop (``height`` tall if given) under ``matrix`` covers,
    clipped to the frame, and the affine map crop -> that rectangle; None when the crop lies
    outside the frame."""
    h, w = frame_shape[:2]
    ch = height or size
    inv = cv2.invertAffineTransform(matrix)  # crop -> frame
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, ch, 1], [size, ch, 1]], np.float64)
    pts = corners @ inv.T
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    to_rect = _compose(np.array([[1, 0, -x0], [0, 1, -y0]], np.float64), inv)  # crop -> rect
    return (int(x0), int(y0), int(x1), int(y1)), to_rect


def warp_delta(
    delta: np.ndarray, matrix: np.ndarray, size: int, frame_shape: tuple[int, int]
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Warp a crop's change back into frame coordinates, weighted by the feathered mask.

    delta: (size, size, C) float32 in frame units. Returns ((x0, y0, x1, y1), (h, w, C)
    float32) covering the face's bounding rectangle in the frame, or None when the face lies
    outside the frame. The inverse warp is bilinear, which also upsamples a delta computed on a
    crop smaller than the face.
    """
    placed = _frame_rect(matrix, size, frame_shape)
    if placed is None:
        return None
    rect, to_rect = placed
    dsize = (rect[2] - rect[0], rect[3] - rect[1])
    d = cv2.warpAffine(delta, to_rect, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    m = cv2.warpAffine(feather_mask(size), to_rect, dsize, flags=cv2.INTER_LINEAR, borderValue=0)
    if d.ndim == 2:
        d = d[..., None]
    return rect, d * m[..., None]


@functools.lru_cache(maxsize=16)
def crop_feather(size: int, height: int | None = None) -> np.ndarray:
    """Soft paste mask over the whole crop, falling to 0 only near its border. float32
    (height, size); height defaults to size."""
    k = max(2, int(size * 0.03))
    mask = np.zeros((height or size, size), np.float32)
    mask[k:-k, k:-k] = 1
    blur = max(3, int(size * 0.06) | 1)
    mask = cv2.GaussianBlur(mask, (blur, blur), 0)
    mask.setflags(write=False)
    return mask


def replace_weight(restored: np.ndarray, crop: np.ndarray, threshold: float = 8.0) -> np.ndarray:
    """Where a replacing task (unmask) changed the crop: 1 where the restored crop differs from
    the input by well over ``threshold`` levels, grown a little past the changed area and
    feathered, 0 where the network left the crop as it was. float32, the crop's (height, width).

    Grown and feathered by 2 % of the crop each (1 px at 128, 5 px at 512): a wider paste lays
    the network's output over pixels the mask never covered and scores lower around big faces;
    without growing or feathering, a thin rim of a soft-edged mask stays visible."""
    height, size = crop.shape[:2]
    change = np.abs(restored - crop).max(axis=-1)
    w = np.clip((change - threshold) / (2 * threshold), 0, 1).astype(np.float32)
    k = max(3, int(size * 0.02) | 1)  # odd: grown by k // 2 px, then feathered over k px
    w = cv2.dilate(w, np.ones((k, k), np.uint8))
    w = cv2.GaussianBlur(w, (k, k), 0)
    return np.minimum(w, crop_feather(size, height))


def warp_replace(
    restored: np.ndarray, weight: np.ndarray, matrix: np.ndarray, frame: np.ndarray,
    grain_seed: int | None = None,
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """The frame-space change that puts the restored crop itself where ``weight`` (crop space)
    says, for tasks that replace content rather than correct it (unmask).

    A change computed on a crop smaller than the face, then upsampled (``warp_delta``), keeps
    the frame's detail above the crop's resolution: the edges and texture of a face mask would
    stay as a ghost over the painted face. Here the restored pixels themselves are upsampled and
    blended in by ``weight``; where the weight is 0 the frame is untouched. restored: (h, S, 3)
    float32 0..255 (a ``warp_face`` crop, square or taller); frame: (H, W, 3) in the same units.
    grain_seed: add ``pipeline.grain.matched_grain`` drawn from this seed. Returns
    ((x0, y0, x1, y1), delta)."""
    height, size = restored.shape[:2]
    placed = _frame_rect(matrix, size, frame.shape[:2], height)
    if placed is None:
        return None
    rect, to_rect = placed
    x0, y0, x1, y1 = rect
    dsize = (x1 - x0, y1 - y0)
    r = cv2.warpAffine(restored, to_rect, dsize, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    m = cv2.warpAffine(weight, to_rect, dsize, flags=cv2.INTER_LINEAR, borderValue=0)
    region = frame[y0:y1, x0:x1, :3].astype(np.float32)
    delta = (r - region) * m[..., None]
    if grain_seed is not None:
        from .grain import matched_grain

        grain = matched_grain(r, region, m, to_rect, (height, size), grain_seed)
        if grain is not None:
            delta += grain[..., None]
    return rect, delta


def add_delta(image: np.ndarray, rect: tuple[int, int, int, int], delta: np.ndarray,
              scale: float = 1.0) -> None:
    """Add ``delta * scale`` to ``image`` (H, W[, C], integer dtype) over ``rect`` in place.

    Pixels where the delta is exactly zero are left bit-exact. A single-channel image gets the
    delta's luma (BT.601 weights).
    """
    x0, y0, x1, y1 = rect
    region = image[y0:y1, x0:x1]
    d = delta * scale
    if region.ndim == 2:
        d = d[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32) if d.shape[-1] >= 3 else d[..., 0]
        touched = d != 0
    else:
        touched = np.any(d != 0, axis=-1)
    info = np.iinfo(image.dtype)
    new = np.clip(np.rint(region.astype(np.float32) + d), info.min, info.max).astype(image.dtype)
    region[touched] = new[touched]


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 affine ``a`` after ``b``."""
    a3 = np.vstack([a, [0, 0, 1]])
    b3 = np.vstack([b, [0, 0, 1]])
    return (a3 @ b3)[:2]
