"""Local networks restore head regions in batches of few shapes (pipeline.regions.bucket/window)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import align, regions
from pipeline.faces import Face


def _face(cx, cy, w, track):
    """A face of width ``w`` (box 1.2 w tall) centred on (cx, cy)."""
    x0, y0 = cx - w / 2, cy - 0.6 * w
    lm = np.array([[x0 + 0.3 * w, y0 + 0.4 * w], [x0 + 0.7 * w, y0 + 0.4 * w], [x0 + 0.5 * w, y0 + 0.6 * w],
                   [x0 + 0.35 * w, y0 + 0.8 * w], [x0 + 0.65 * w, y0 + 0.8 * w]])
    return Face(np.array([x0, y0, x0 + w, y0 + 1.2 * w]), lm, 0.99, track)


def _clip(n=24, shape=(360, 640, 3), seed=0):
    """n frames of a textured scene with two faces that move and change size every frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 220, shape, dtype=np.uint8)
    frames, faces = [], []
    for k in range(n):
        frames.append(np.roll(base, 2 * k, axis=1))
        faces.append([_face(150 + 3 * k, 170, 60 + 3 * k, 0), _face(470 - 2 * k, 190, 130 - 2.5 * k, 1)])
    return frames, faces


def _restorer(bucket=None, **kw):
    import torch

    from models.registry import Restorer
    from models.tasks import resolve
    from pipeline.restore import FaceRestorer

    class PerPixel(torch.nn.Module):
        """A per-pixel function (translation-equivariant at any shift); records its inputs' shapes."""

        multiple = 8

        def __init__(self):
            super().__init__()
            self.shapes = []

        def forward(self, x):
            self.shapes.append(tuple(x.shape))
            return 0.6 * x + 0.3 * x.mean(1, keepdim=True) ** 2 + 0.08

    net = PerPixel()
    r = FaceRestorer(Restorer(resolve("denoise"), net).eval(), **kw)
    if bucket is not None:
        r.bucket = bucket
    return r, net


def test_a_clips_regions_run_in_few_full_batches_of_few_shapes():
    """Regions whose size changes every frame share a handful of bucketed shapes; each shape runs
    in batches as full as ``batch_for`` allows, not one call per region."""
    frames, faces = _clip()
    r, net = _restorer()
    r.deltas(frames, faces, frames=list(range(len(frames))))
    own = {(y1 - y0, x1 - x0) for img, fs in zip(frames, faces)
           for x0, y0, x1, y1 in regions.regions([f.box for f in fs], img.shape, multiple=8)}
    seen = {s[2:] for s in net.shapes}
    count = {s: sum(b for b, *_ in net.shapes if tuple(_[1:]) == s) for s in seen}
    assert sum(count.values()) == 48  # every region once
    assert len(own) >= 10 and len(seen) <= (len(own) + 1) // 2, (len(own), seen)
    assert all(h % regions.BUCKET == 0 and w % regions.BUCKET == 0 for h, w in seen)
    # per shape: full batches and at most one short one
    assert len(net.shapes) == sum(math.ceil(n / r.batch_for(*s)) for s, n in count.items())
    assert len(net.shapes) <= 48 // 3


@pytest.mark.parametrize("steady", [False, True])
def test_bucketed_windows_give_the_regions_own_result(steady):
    """For a network that is translation-equivariant, restoring a window of the frame around each
    region gives the region the same result as restoring the region alone (bucket 1: the
    unbucketed path), with the same rectangles and feathered weights (temporal steadying on or
    off); pixels outside the regions are unchanged."""
    frames, faces = _clip()
    idx = list(range(len(frames))) if steady else None
    got = _restorer()[0].deltas(frames, faces, frames=idx)
    r_one, net_one = _restorer(bucket=1)
    want = r_one.deltas(frames, faces, frames=idx)
    assert len({s[2:] for s in net_one.shapes}) >= 10  # the unbucketed path: a shape per region size
    for img, a, b in zip(frames, got, want):
        assert [rect for rect, _ in a] == [rect for rect, _ in b]
        inside = np.zeros(img.shape[:2], bool)
        out = img.copy()
        for (rect, da), (_, db) in zip(a, b):
            assert np.abs(da - db).max() < 1e-3
            x0, y0, x1, y1 = rect
            inside[y0:y1, x0:x1] = True
            align.add_delta(out, rect, da)
        assert (out != img).any()
        assert np.array_equal(out[~inside], img[~inside])


def test_a_frame_smaller_than_the_bucket_gives_its_side_padded_to_the_stride():
    """A head filling a frame smaller than its bucket: the window is the frame's whole side,
    padded by reflection to the network's stride only (no reflected rows where the feather keeps
    the result whole); the region's result is the unbucketed one."""
    rng = np.random.default_rng(1)
    frame = rng.integers(30, 220, (118, 100, 3), dtype=np.uint8)
    face = _face(50, 70, 55, -1)
    r, net = _restorer()
    got = r.deltas([frame], [[face]])[0]
    want = _restorer(bucket=1)[0].deltas([frame], [[face]])[0]
    assert net.shapes == [(1, 3, 120, 96)]  # 118 rows padded to 120; 96 columns: the bucket
    assert [rect for rect, _ in got] == [rect for rect, _ in want]
    assert got[0][0][3] == 118  # the region reaches the frame's bottom
    assert np.abs(got[0][1] - want[0][1]).max() < 1e-3


def test_window_holds_the_region_centred_inside_the_frame_on_the_networks_grid():
    shape = (360, 640, 3)
    for rect in [(200, 100, 312, 228), (0, 0, 96, 112), (560, 250, 640, 360), (20, 10, 116, 138), (5, 7, 101, 135)]:
        x0, y0, x1, y1 = rect
        size = (regions.bucket(y1 - y0, 32, 8), regions.bucket(x1 - x0, 32, 8))
        wx0, wy0, wx1, wy1 = regions.window(rect, shape, size, phase=8)
        assert (wy1 - wy0, wx1 - wx0) == size
        assert 0 <= wx0 <= x0 and x1 <= wx1 <= 640 and 0 <= wy0 <= y0 and y1 <= wy1 <= 360
        if wx0 > 0 and wx1 < 640:  # room on both sides: centred (to the stride) and on its grid
            assert (x0 - wx0) % 8 == 0 and abs((x0 - wx0) - (wx1 - x1)) <= 16
    # a side longer than the frame's is the frame's
    assert regions.window((0, 0, 96, 112), (100, 96), (128, 96)) == (0, 0, 96, 100)
    assert regions.bucket(100) == 128 and regions.bucket(128) == 128 and regions.bucket(20, 32, 24) == 96


def test_mtcnn_later_stages_run_in_chunks_of_few_shapes_with_the_same_results():
    """R- and O-Net get as many candidates as the pyramid found; they run in calls of at most
    STAGE_CHUNK candidates, a shorter call padded to a multiple of STAGE_STEP, and each
    candidate's result is the one a single call gives."""
    import torch

    from pipeline.mtcnn import FastMTCNN

    d = FastMTCNN(device="cpu", engine="torch")
    d.STAGE_CHUNK, d.STAGE_STEP = 64, 16
    seen = []
    for k, size in ((1, 24), (2, 48)):
        net = d.runs[k]

        def counted(x, net=net):
            seen.append(len(x))
            return net(x)

        d.runs = tuple(counted if j == k else r for j, r in enumerate(d.runs))
        x = (torch.rand(150, 3, size, size, generator=torch.Generator().manual_seed(k)) * 2 - 1)
        x = x.contiguous(memory_format=d.memory_format)
        with torch.inference_mode():
            got = d._stage(k, x)
            want = net(x)
        assert seen == [64, 64, 32]  # 150 = 64 + 64 + 22, padded to 32
        assert len(got) == len(want) and all(g.shape == w.shape for g, w in zip(got, want))
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
        seen.clear()
