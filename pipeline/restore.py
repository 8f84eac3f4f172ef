"""Align, restore in batches, and turn each restored face into a delta to paste back.

``FaceRestorer.deltas(images, faces)`` takes RGB frames and their faces and returns, per frame,
a list of ``(rect, delta)``: the rectangle of the frame a face touches and the feathered RGB
change (float32) the model made there. Callers add the delta to their own pixel format (I420
video, 8/16-bit images, grayscale), so pixels outside faces are never converted or rewritten.

Geometry: a task whose network is local (``spec.native``, e.g. denoise: noise and compression
artefacts live on the frame's pixel grid) runs on each head cut straight out of the frame, at its
own resolution and integer offsets (with the frame around it up to a bucketed size, so that heads
of nearby sizes run in one batch of one shape), and the result's pixels of the head are feathered
back in the same grid (``pipeline.regions``): nothing is resampled. Other tasks see the face
aligned to the network's template crop and their result is warped back onto the face. Either
way the face keeps every detail the model did not change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import align, regions
from .faces import Face
from .views import RegionSteady, TrackSteady, change_weight, merge_views

log = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]


class AlignedCrop(NamedTuple):
    """One view of a face aligned to the network's template (tasks that are not local)."""

    image: int  # index of the image (frame) in the call
    face: Face
    size: int  # the crop's width: the template square's side and the columns aside
    matrix: np.ndarray  # frame -> crop similarity (2 x 3)
    crop: np.ndarray  # the aligned crop, uint8 (template side + rows below, size, 3)
    aside: int = 0  # of ``size``, the columns on each side of the template square


class LocalCrop(NamedTuple):
    """A head region of a frame and the network's input for it (local tasks)."""

    image: int  # index of the image (frame) in the call
    rect: Rect  # the region (x0, y0, x1, y1): the frame's pixels the result is written to
    window: Rect  # the frame's pixels given to the network around it (``regions.window``)
    crop: np.ndarray  # the network's input: the window (padded by reflection to the stride)
    track: int  # the track of a face in the region, -1 for none

    @property
    def height(self) -> int:
        return self.rect[3] - self.rect[1]

    @property
    def width(self) -> int:
        return self.rect[2] - self.rect[0]

    @property
    def inner(self) -> tuple[slice, slice]:
        """The region's rows and columns in ``crop``."""
        dy, dx = self.rect[1] - self.window[1], self.rect[0] - self.window[0]
        return slice(dy, dy + self.height), slice(dx, dx + self.width)

    @property
    def given(self) -> np.ndarray:
        """The region's own pixels as the network was given them (uint8)."""
        return self.crop[self.inner]


@dataclass
class PreviewSink:
    """Keeps up to ``limit`` (before, after) crop pairs for a contact sheet."""

    limit: int = 16
    pairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    tracks_seen: set = field(default_factory=set)

    def offer(self, track: int, before: np.ndarray, after: np.ndarray) -> None:
        """One pair per video track, so a sheet shows different people; every face of a still
        image (track -1) is a different face."""
        if len(self.pairs) >= self.limit or track in self.tracks_seen:
            return
        self.tracks_seen |= {track} if track >= 0 else set()
        self.pairs.append((before.copy(), after.copy()))


class FaceRestorer:
    """Runs a ``models.Restorer`` over the faces of a batch of frames."""

    def __init__(self, model, *, device: str = "cpu", batch_size: int = 16,
                 colour_match: bool = True, half: bool = False, preview: PreviewSink | None = None,
                 channels_last: bool | None = None, zooms: tuple[float, ...] | None = None,
                 ensemble: bool = True, grain: bool = True, strength: float = 1.0) -> None:
        import torch

        self.model, self.spec, self._torch = model, model.spec, torch
        self.device = torch.device(device)
        self.batch_size = batch_size
        # FaceMath edits change colour on purpose (grey hair, skin tone): never undo that
        self.colour_match = colour_match and not getattr(self.spec, "latent", False)
        self.uses_tracks = getattr(model, "uses_tracks", False)
        self.replaces = getattr(self.spec, "replaces", False)
        self.grain = grain  # a replacing task's paint gets the skin's grain (``pipeline.grain``)
        if not 0.0 < strength <= 1.0:  # the fraction of a local network's change applied
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        self.strength = float(strength)
        # rows of context under the square crop (unmask: the chin); replacing tasks only
        self.below = getattr(self.spec, "rows_below", 0)
        self.aside = getattr(self.spec, "cols_aside", 0)
        # output steadied over a video's frames where the spec asks (``RegionSteady``; ``TrackSteady``)
        self.steadies = getattr(self.spec, "steady", True)
        self.half = half and self.device.type == "cuda"
        self.preview = preview
        if zooms is not None and (not zooms or min(zooms) <= 0):
            raise ValueError(f"zooms must be positive scales, got {zooms!r}")
        self._zooms = tuple(zooms) if zooms else None
        # ensemble=False: one network pass per face (no mirror, first zoom only), the fast mode
        self.ensemble = ensemble
        self.identity = getattr(model, "net", None) is None
        self.faces_restored = 0
        # local tasks: the network's input sides are multiples of this (``regions.bucket``)
        self.bucket = regions.BUCKET
        # a video's last frame's output: local regions (``RegionSteady``), replacing tasks' tracks (``TrackSteady``)
        self._regions, self._held = RegionSteady(), TrackSteady()
        # channels-last convolutions: ~1.45x faster per face on CPU (bench, 128-512 px crops),
        # the layout tensor cores want on CUDA; same outputs. None: on for learned non-latent nets
        if channels_last is None:
            channels_last = not getattr(self.spec, "latent", False)
        self.channels_last = channels_last and not self.identity
        if self.channels_last:
            self.model = model.to(memory_format=torch.channels_last)

    def reset(self) -> None:
        """Forget per-track state (a FaceMath edit's smoothed codes, the last frame's output);
        call before each video."""
        self._regions, self._held = RegionSteady(), TrackSteady()
        if getattr(self.model, "reset", None) is not None:
            self.model.reset()

    CPU_BATCH_PIXELS = 16 * 128 * 128

    def batch_for(self, size: int, width: int | None = None) -> int:
        """Faces per network call for crops of ``size`` rows and ``width`` (default: ``size``)
        columns. On CPU, large crops run fastest a few at a time (cache-bound: 384 px crops take
        0.125 s/face one by one, 0.16 in batches of 16), so the batch is capped at 16 crops'
        worth of 128 px pixels; on CUDA it is ``batch_size``."""
        cap = self.batch_size if self.device.type == "cuda" else self.CPU_BATCH_PIXELS // (size * (width or size))
        return max(1, min(self.batch_size, cap))

    def crop_size(self, face: Face, aspect: float = 1.0) -> int:
        """The side of the aligned crop's template square: the network's own, or where the task
        has several (``TaskSpec.sizes``), the one nearest the face's own size in the frame, so a
        large face is painted at its resolution rather than enlarged from the network's (the crop
        adds ``margins(size)`` around it)."""
        sizes = getattr(self.spec, "sizes", ())
        if not sizes:
            return self.spec.size
        m = align.estimate_transform(face.landmarks, self.spec.size, aspect)
        own = self.spec.size / np.sqrt(abs(np.linalg.det(m[:, :2])))  # the face's template side, frame px
        return min(sizes, key=lambda s: abs(np.log(s / own)))

    def margins(self, size: int) -> tuple[int, int]:
        """(columns on each side, rows below) of a replacing task's crop of template ``size``:
        the spec's ``aside`` and ``below`` at its own size, grown with the template to the next
        multiple of the network's stride (32: twice ``aside``, and ``below``)."""
        k = -(-size // self.spec.size)  # 1 at the network's own size, 2 up to twice it
        return self.aside * k, self.below * k

    @property
    def local(self) -> bool:
        """True when the network runs on heads cut from the frame at its own resolution."""
        return bool(self.spec.native) and not getattr(self.spec, "latent", False)

    def deltas(self, images: list[np.ndarray], faces: list[list[Face]],
               frames: list[int] | None = None, aspect: float = 1.0) -> list[list[tuple[Rect, np.ndarray]]]:
        """Per image, the (rect, RGB delta) of each face. images: RGB uint8 (H, W, 3). frames: their
        indices in one video, in order (a local network's output is then steadied). aspect: their
        pixel aspect ratio: aligned crops show faces as shown, local networks see stored pixels."""
        out: list[list[tuple[Rect, np.ndarray]]] = [[] for _ in images]
        jobs: list[AlignedCrop] = []  # one per face and zoom
        views = self.zooms
        if self.local:
            self.faces_restored += sum(len(fs) for fs in faces)
            if self.identity and self.preview is None:
                return out  # nothing changes: skip the work, output stays bit-exact
            return self._local_deltas(images, faces, frames)
        for i, (img, fs) in enumerate(zip(images, faces)):
            for f in fs:
                size = self.crop_size(f, aspect)
                aside, below = self.margins(size)
                width = size + 2 * aside
                for z in views:
                    m = align.aside(align.estimate_transform(align.zoomed(f.landmarks, z), size, aspect), aside)
                    jobs.append(AlignedCrop(i, f, width, m, align.warp_face(img, m, width, size + below), aside))
        self.faces_restored += len(jobs) // len(views)
        if self.identity and self.preview is None:
            return out  # nothing changes: skip the work, output stays bit-exact
        given = [job.crop for job in jobs]  # what the network is given for each crop
        nv = len(views)
        start = 0
        while start < len(jobs):  # whole faces, about two network batches at a time (memory)
            end = min(len(jobs), start + max(1, 2 * self.batch_for(jobs[start].size) // nv) * nv)
            restored = self._restore_jobs(jobs, given, range(start, end))
            if self.replaces:  # crops reaching past the frame: a second pass (``_refill``)
                again = self._refill(jobs, given, restored, images, range(start, end, nv), nv)
                restored.update(self._restore_jobs(jobs, given, again))
            for first in range(start, end, nv):  # each face: its views, zoom 1 first
                job = jobs[first]
                i, crop = job.image, job.crop
                rest = self._merged(jobs, restored, first, nv)
                if frames is not None and self.replaces and self.steadies:  # ``views.TrackSteady``
                    rest = self._held(job.face.track, frames[i], job.matrix, rest)
                if self.preview is not None:
                    self.preview.offer(job.face.track, crop, np.clip(np.rint(rest), 0, 255).astype(np.uint8))
                placed = self._place(rest, given[first], job.matrix, images[i],
                                     grain_seed=job.face.track if job.face.track >= 0 else first)
                if placed is not None:
                    out[i].append(placed)
            start = end
        return out

    def _local_deltas(self, images: list[np.ndarray], faces: list[list[Face]],
                      frames: list[int] | None = None) -> list[list[tuple[Rect, np.ndarray]]]:
        """``deltas`` for a local network: each frame's head regions (``regions.regions``),
        restored from a window of the frame around each at a bucketed size (``LocalCrop``;
        ``regions.bucket``, ``regions.window``), in batches of one shape, and the change the
        network made to the region's own pixels feathered back in the same pixel grid. Where the
        frame is smaller than the bucket, the window is the frame's side, padded by reflection to
        the network's stride, and the padding dropped. With ``frames`` (the frames' indices in a
        video) the result is steadied over time (``views.RegionSteady``) where the task asks for it."""
        out: list[list[tuple[Rect, np.ndarray]]] = [[] for _ in images]
        m = getattr(self.model, "multiple", 1)
        jobs: list[LocalCrop] = []
        for i, (img, fs) in enumerate(zip(images, faces)):
            for rect in regions.regions([f.box for f in fs], img.shape, multiple=m):
                x0, y0, x1, y1 = rect
                inside = [f.track for f in fs if x0 <= (f.box[0] + f.box[2]) / 2 < x1 and y0 <= (f.box[1] + f.box[3]) / 2 < y1]
                jobs.append(self._local_crop(i, img, rect, min(inside, default=-1), m))
        by_shape: dict[tuple[int, int], list[int]] = {}
        for j, job in enumerate(jobs):
            by_shape.setdefault(job.crop.shape[:2], []).append(j)
        restored: dict[int, np.ndarray] = {}
        for (h, w), idxs in by_shape.items():
            step = self.batch_for(h, w)
            for k in range(0, len(idxs), step):
                chunk = idxs[k : k + step]
                restored.update(zip(chunk, self._run([jobs[j].crop for j in chunk])))
        for j, job in enumerate(jobs):  # in frame order
            i, rect = job.image, job.rect
            rh, rw = job.height, job.width
            weight = regions.feather(rh, rw, rect, images[i].shape)
            given_u8 = job.given
            given = given_u8.astype(np.float32)
            rest = restored.pop(j)[job.inner]
            if self.colour_match:
                rest = align.match_colour(rest, given, weight)
            if frames is not None and self.steadies:
                rest = self._regions(frames[i], rect, rest, job.track, faces[i])
            if self.strength != 1.0:  # after steadying, which keeps the whole output
                rest = given + self.strength * (rest - given)
            if self.preview is not None:  # a square about the head's centre, as other tasks' tiles
                side = min(rh, rw)
                sy, sx = (rh - side) // 2, (rw - side) // 2
                self.preview.offer(job.track, given_u8[sy : sy + side, sx : sx + side],
                                   np.clip(np.rint(rest[sy : sy + side, sx : sx + side]), 0, 255).astype(np.uint8))
            delta = (rest - given) * weight[..., None]
            if np.any(delta):
                out[i].append((rect, delta))
        return out

    def _local_crop(self, image: int, img: np.ndarray, rect: Rect, track: int, multiple: int) -> "LocalCrop":
        """The network's input for one head region: the frame's window of the region's bucketed
        size around it (``regions.window``). A frame smaller than the bucket gives its whole side,
        padded by reflection to the network's stride (as a region cut alone is): reflected
        pixels at the frame's edge, where the feather keeps the result whole, would change it."""
        x0, y0, x1, y1 = rect
        H, W = img.shape[:2]
        size = (min(regions.bucket(y1 - y0, self.bucket, multiple), regions.bucket(H, 1, multiple)),
                min(regions.bucket(x1 - x0, self.bucket, multiple), regions.bucket(W, 1, multiple)))
        win = regions.window(rect, img.shape, size, phase=multiple)
        wx0, wy0, wx1, wy1 = win
        crop = img[wy0:wy1, wx0:wx1, :3]
        ph, pw = size[0] - crop.shape[0], size[1] - crop.shape[1]
        if ph or pw:  # the frame is smaller than the bucket
            crop = np.pad(crop, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(crop.shape[:2]) > 1 else "edge")
        return LocalCrop(image, rect, win, np.ascontiguousarray(crop), track)

    def _restore_jobs(self, jobs: list[AlignedCrop], given: list[np.ndarray], which) -> dict[int, np.ndarray]:
        """The network's (colour-matched) output for ``given[j]``, j in ``which``, in batches of
        one crop size."""
        restored: dict[int, np.ndarray] = {}
        by_size: dict[int, list[int]] = {}
        for j in which:
            by_size.setdefault(jobs[j].size, []).append(j)
        for size, idxs in by_size.items():
            step = self.batch_for(size)
            for k in range(0, len(idxs), step):
                chunk = idxs[k : k + step]
                keys = [max(jobs[j].face.track, -1) for j in chunk] if self.uses_tracks else None
                for j, rest in zip(chunk, self._run([given[j] for j in chunk], keys)):
                    restored[j] = self._matched(rest, given[j], jobs[j].aside)
        return restored

    def _merged(self, jobs: list[AlignedCrop], restored: dict[int, np.ndarray], first: int, count: int) -> np.ndarray:
        """A face's views merged into its first (``pipeline.views``), by what each changed for a replacing task."""
        if count == 1:
            return restored[first]
        js = range(first, first + count)
        weights = [change_weight(restored[j], jobs[j].crop) for j in js] if self.replaces else None
        others = [(jobs[j].matrix, restored[j]) for j in js[1:]]
        return merge_views(jobs[first].matrix, restored[first], others, weights)

    @property
    def zooms(self) -> list[float]:
        """The scales each face is restored at (see ``TaskSpec.zooms``): the task's, or the
        ``zooms`` given to the constructor; the first alone in the fast mode, for the identity
        and for a network that keeps state per face track (FaceMath's smoothed codes)."""
        zooms = list(self._zooms or getattr(self.spec, "zooms", (1.0,)))
        one = not self.ensemble or self.identity or self.uses_tracks
        return zooms[:1] if one else zooms

    def _matched(self, rest: np.ndarray, crop: np.ndarray, aside: int = 0) -> np.ndarray:
        """The restored crop, colour-matched to the crop it came from when that is on."""
        if not self.colour_match:
            return rest
        match = align.match_colour_robust if self.replaces else align.match_colour
        region = align.colour_region(crop.shape[1] - 2 * aside, crop.shape[0], aside)
        return match(rest, crop.astype(np.float32), region)

    def _place(self, rest: np.ndarray, crop: np.ndarray, m: np.ndarray, image: np.ndarray,
               grain_seed: int | None = None):
        """The (rect, delta) that puts a restored crop into its frame; None when nothing changes.
        A replacing task's paint gets grain drawn from ``grain_seed`` when ``grain`` is on."""
        crop_f = crop.astype(np.float32)
        if self.replaces:
            weight = align.replace_weight(rest, crop_f)
            seed = grain_seed if self.grain else None
            return align.warp_replace(rest, weight, m, image, seed) if np.any(weight) else None
        delta = rest - crop_f  # (square crops: ``below`` is for replacing tasks)
        if not np.any(delta):
            return None
        return align.warp_delta(delta, m, crop.shape[1], image.shape[:2])

    def _refill(self, jobs: list[AlignedCrop], given: list[np.ndarray], restored: dict[int, np.ndarray],
                images: list[np.ndarray], firsts, views: int) -> list[int]:
        """A second pass for replacing tasks' crops that reach past the frame (a face at a
        photo's bottom edge: unmask's crop runs 32 rows under the chin). ``warp_face`` fills
        the crop's pixels outside the frame by reflecting the frame, mask included, so the
        network saw the mask again, mirrored, under the edge, and painted the chin worse for it.
        Those pixels are filled again from the frame with the face's first pass (all its views,
        merged) pasted in, whose reflection is a face without a mask, and the network runs on
        that. The pixels inside the frame are the same in both passes. ``given`` (the crops the
        network is given, per job) is updated in place; returns the jobs to run again. firsts:
        the first job of each face to look at; views: jobs per face."""
        again = []
        for first in firsts:
            i, size, crop = jobs[first].image, jobs[first].size, jobs[first].crop
            leaving = []
            for j in range(first, first + views):
                outside = align.outside_frame(jobs[j].matrix, size, crop.shape[0], images[i].shape[:2])
                if outside.any():
                    leaving.append((j, outside))
            if not leaving:
                continue
            placed = self._place(self._merged(jobs, restored, first, views), crop, jobs[first].matrix, images[i])
            if placed is None:
                continue
            pasted = images[i].copy()
            align.add_delta(pasted, placed[0], placed[1])
            for j, outside in leaving:
                refilled = align.warp_face(pasted, jobs[j].matrix, size, crop.shape[0])
                given[j] = np.where(outside[..., None], refilled, jobs[j].crop)
                again.append(j)
        return again

    def _run(self, crops: list[np.ndarray], keys: list | None = None) -> list[np.ndarray]:
        """Crops (h, S, 3) uint8 -> restored (h, S, 3) float32 in 0..255."""
        with self._torch.inference_mode():
            return self._forward(crops, keys)

    def _forward(self, crops: list[np.ndarray], keys: list | None = None) -> list[np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(np.stack(crops)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.half:
            x = x.half()
        if keys is not None:
            y = self.model(x, keys)
        elif not self.ensemble and getattr(self.spec, "mirror", False):
            y = self.model(x, mirror=False)
        else:
            y = self.model(x)
        y = y.float().mul_(255.0)
        return list(y.permute(0, 2, 3, 1).cpu().numpy())
