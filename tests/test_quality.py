"""The output file's quality, as a user judges it: real clips degraded, the CLI run, faces scored.

``bench.quality`` degrades the clean frames of a real clip (seeded), stores them losslessly, runs
``cli.py submit`` on them and scores the output file's heads against the clean frames. These
tests run its quick cut and assert what a user would check; the unit tests below pin the
geometry that makes the difference (local networks see the frame's own pixels).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import regions
from pipeline.faces import Face


@pytest.fixture(scope="module")
def quick_run():
    from bench import quality

    return quality.run(quick=True)["rows"]


@pytest.fixture(scope="module")
def quick(quick_rows):
    """The quick cut's close-up rows by (task, degradation)."""
    return {(r["task"], r["degradation"]): r for r in quick_rows.values() if r["source"] == "closeup"}


@pytest.fixture(scope="module")
def quick_rows(quick_run):
    return {(r["source"], r["task"], r["degradation"]): r for r in quick_run}


def test_denoise_output_beats_the_noisy_input_and_non_local_means(quick):
    """Gaussian noise sigma 20 on a real close-up: the file's faces gain well over the input and
    beat OpenCV's non-local means at its best strength, and come within 1 dB of the network run
    alone on an unresampled crop; pixels outside the faces are as the input's."""
    r = quick[("denoise", "noise20")]
    out = r["facemend"]
    assert out["faces"] >= 6
    assert out["psnr"] >= r["input"]["psnr"] + 6.0, r
    assert out["psnr"] >= r["classical"]["psnr"] + 2.0, r
    assert out["psnr"] >= r["ceiling"]["psnr"] - 1.0, r
    assert out["ssim"] > r["input"]["ssim"] + 0.2
    assert out["outside_psnr"] >= 45.0
    assert out["flicker"] < r["input"]["flicker"] / 2  # the noise's frame-to-frame change is gone


def test_enhance_output_beats_the_x4_degraded_input(quick):
    """x4 area-down, bicubic-up: the heads gain at least 1 dB (cut on the frame's grid, where the
    upscale's pixel grid starts; cut anywhere they gained about 0.7)."""
    r = quick[("enhance", "down4")]
    assert r["facemend"]["psnr"] >= r["input"]["psnr"] + 1.0, r
    assert r["facemend"]["psnr"] >= r["classical"]["psnr"], r
    assert r["facemend"]["outside_psnr"] >= 45.0


def test_unmask_output_paints_the_mask_better_than_telea(quick):
    """Inside the mask above Telea given the true mask; and the painted mouth, guessed anew in
    every frame, steadied along the face's track: the heads change from frame to frame at most
    15 % more than the clean clip's (this 6-frame cut: 1.11; unsteadied 1.23)."""
    r = quick[("unmask", "mask")]
    m = r["mask_psnr"]
    assert m["facemend"] >= m["classical"] + 1.0, m
    assert r["facemend"]["psnr"] >= r["input"]["psnr"] + 6.0, r
    assert r["facemend"]["outside_psnr"] >= 45.0
    assert r["facemend"]["flicker"] <= 1.15 * r["clean"]["flicker"], r


@pytest.mark.parametrize("source", ["closeup", "scenes"])
def test_unmask_removes_the_ear_straps(quick_rows, source):
    """Masks with ear straps drawn on a real clip and on real photos: the straps, which run past
    the 128 px template crop to the ears, are painted over. On the strap pixels the file gains
    over 9 dB on the input on the clip and over 6 on the photos (10.1 and 7.9); a crop that ends
    at the cheeks, whose feathered border leaves the straps' outer halves, gains 7.3 and 3.3.
    Where a strap crossed hair or a textured background the painting is smoother than what was
    there, so Telea given the true mask, which follows the texture at its edge, stays ahead on
    the strap pixels."""
    r = quick_rows[(source, "unmask", "mask")]
    s = r["strap_psnr"]
    assert s["facemend"] >= s["input"] + (9.0 if source == "closeup" else 6.0), s
    assert r["mask_psnr"]["facemend"] >= r["mask_psnr"]["classical"] + 1.0, r["mask_psnr"]


def test_old_footage_is_repaired_by_restore_and_by_denoise(quick):
    """Old footage (x2 down-up, sigma 10 noise, then a real H.264 encode at CRF 32) on a real
    close-up: the blind restore task and denoise (trained on noise and codecs) each gain over
    the input and over the classical filter on the same file, and leave the pixels outside the
    faces alone."""
    for task in ("restore", "denoise"):
        r = quick[(task, "mix")]
        assert r["facemend"]["faces"] >= 6
        assert r["facemend"]["psnr"] >= r["input"]["psnr"] + 0.2, r
        assert r["facemend"]["psnr"] >= r["classical"]["psnr"] + 0.2, r
        assert r["facemend"]["outside_psnr"] >= 45.0


def test_identity_output_is_the_input(quick):
    r = quick[("identity", "noise20")]
    assert r["identity_exact"]
    assert r["facemend"]["psnr"] == r["input"]["psnr"]


# ---------------------------------------------------------------------------------------------
# the geometry of local networks


def _face(x0, y0, x1, y1):
    w = x1 - x0
    lm = np.array([[x0 + 0.3 * w, y0 + 0.4 * w], [x0 + 0.7 * w, y0 + 0.4 * w], [x0 + 0.5 * w, y0 + 0.6 * w],
                   [x0 + 0.35 * w, y0 + 0.8 * w], [x0 + 0.65 * w, y0 + 0.8 * w]])
    return Face(np.array([x0, y0, x1, y1], float), lm, 0.99)


def test_regions_hold_the_head_with_a_margin_and_merge_overlaps():
    shape = (720, 1280, 3)
    a, b = _face(100, 200, 300, 450), _face(700, 100, 800, 230)
    rects = regions.regions([a.box, b.box], shape, multiple=8)
    assert len(rects) == 2
    for (x0, y0, x1, y1), f in zip(sorted(rects), (a, b)):
        hx0, hy0, hx1, hy1 = regions.head_rect(f.box, shape)
        assert x0 < hx0 and y0 < hy0 and x1 > hx1 and y1 > hy1  # head and feather margin inside
        assert (x1 - x0) % 16 == 0 and (y1 - y0) % 16 == 0
        assert x0 % 8 == 0 and y0 % 8 == 0  # on the frame's grid, where codec blocks start
        assert f.box[1] - y0 > 0.4 * (f.box[3] - f.box[1])  # the forehead is in
    # two overlapping heads are one region (a pixel is restored once)
    c = _face(260, 220, 460, 470)
    assert len(regions.regions([a.box, c.box], shape)) == 1
    # at the frame's edge the region stays inside the frame
    x0, y0, x1, y1 = regions.regions([_face(-30, -40, 120, 150).box], shape)[0]
    assert x0 == 0 and y0 == 0 and x1 <= 1280 and y1 <= 720


def test_feather_is_one_inside_and_fades_only_towards_the_frame():
    w = regions.feather(100, 80, (10, 10, 90, 110), (200, 200))
    assert w[50, 40] == 1.0 and w[0, 40] < 0.05 and w[50, 0] < 0.05
    edge = regions.feather(100, 80, (0, 0, 80, 100), (100, 200))  # top, left and bottom on the frame's edge
    assert edge[0, 40] == 1.0 and edge[50, 0] == 1.0 and edge[99, 40] == 1.0 and edge[50, 79] < 0.05


def test_a_local_network_sees_and_changes_the_frames_own_pixels():
    """denoise runs on heads cut straight out of the frame, on the frame's 8 px grid: a network
    that adds a one-pixel checkerboard gets the frame's pixels unresampled, and its checkerboard
    comes back at full contrast on the frame's grid inside the head; pixels away from the face
    are untouched."""
    import torch

    from models.registry import Restorer
    from models.tasks import resolve
    from pipeline import align
    from pipeline.restore import FaceRestorer

    seen = []

    class Checker(torch.nn.Module):
        multiple = 8

        def forward(self, x):
            seen.append(x.clone())
            yy, xx = torch.meshgrid(torch.arange(x.shape[2]), torch.arange(x.shape[3]), indexing="ij")
            return x + ((yy + xx) % 2).float() * (20 / 255)

    rng = np.random.default_rng(0)
    frame = rng.integers(60, 200, (400, 600, 3), dtype=np.uint8)
    face = _face(203, 117, 331, 283)  # a region whose sides are not multiples of the window's
    r = FaceRestorer(Restorer(resolve("denoise"), Checker()).eval(), colour_match=False)
    assert r.local
    out = frame.copy()
    placed = r.deltas([frame], [[face]])[0]
    assert len(placed) == 1
    (x0, y0, x1, y1), delta = placed[0]
    given = (seen[0][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    h, w = y1 - y0, x1 - x0  # the region lies somewhere in the window the network saw: find it
    at = [(oy, ox) for oy in range(given.shape[0] - h + 1) for ox in range(given.shape[1] - w + 1)
          if np.array_equal(given[oy : oy + h, ox : ox + w], frame[y0:y1, x0:x1])]
    assert at, "the region is not in the network's input unresampled"
    wy0, wx0 = y0 - at[0][0], x0 - at[0][1]  # the window's corner in the frame
    assert np.array_equal(given, frame[wy0 : wy0 + given.shape[0], wx0 : wx0 + given.shape[1]])  # the frame itself
    assert wy0 % 8 == 0 and wx0 % 8 == 0  # on the frame's grid of the network's stride (codec blocks)
    align.add_delta(out, (x0, y0, x1, y1), delta)
    change = out.astype(int) - frame
    cy, cx = int(face.box[1] + face.box[3]) // 2, int(face.box[0] + face.box[2]) // 2
    patch = change[cy - 10 : cy + 10, cx - 10 : cx + 10, 0]
    yy, xx = np.mgrid[cy - 10 : cy + 10, cx - 10 : cx + 10]
    assert np.array_equal(patch, ((yy - wy0 + xx - wx0) % 2) * 20)  # the network's change, as it made it
    outside = np.ones(frame.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert not change[outside].any()


def test_a_local_networks_video_output_is_steadied_where_frames_agree():
    """What a network leaves of the noise changes from frame to frame; where the previous
    frame's output is nearly this one's, the two are blended (the face shimmers less), where it
    differs (motion) this frame's output stands, and frames that do not follow each other, or
    still images, are never blended."""
    import torch

    from models.registry import Restorer
    from models.tasks import resolve
    from pipeline.restore import FaceRestorer

    class Level(torch.nn.Module):  # paints the crop one flat level, set from outside
        multiple = 8
        level = 100.0

        def forward(self, x):
            return torch.full_like(x, self.level / 255)

    net = Level()
    r = FaceRestorer(Restorer(resolve("denoise"), net).eval(), colour_match=False)
    frame = np.full((240, 480, 3), 50, np.uint8)
    faces = [_face(40, 60, 120, 160), _face(340, 60, 420, 160)]  # two heads, two regions
    centres = [(110, 80), (110, 380)]

    def centre(frames, level):
        net.level = level
        placed = r.deltas([frame], [faces], frames=frames)[0]
        assert len(placed) == 2
        got = [50 + d[cy - y0, cx - x0, 0] for ((x0, y0, _, _), d), (cy, cx) in zip(placed, centres)]
        assert got[0] == got[1]  # every head of the frame is steadied alike
        return got[0]

    assert centre([0], 100) == 100
    small = centre([1], 104)  # nearly the last frame's: pulled towards it
    assert 100 < small < 103
    assert centre([2], 160) > 155  # far from it (motion): kept
    assert centre([5], 100) == 100  # not the next frame: nothing to blend with
    r.reset()
    assert centre([6], 104) == 104
    assert centre(None, 100) == 100  # still images


def test_a_moving_face_is_steadied_with_the_previous_frame_moved_along_its_track():
    """A face that moves between frames is blended with the previous frame's output moved with
    it: what the network leaves of the noise (different in every frame) is averaged down over
    the face's own texture, which a blend at the same pixels would smear or, where the texture
    differs, not blend at all."""
    import cv2
    import torch

    from models.registry import Restorer
    from models.tasks import resolve
    from pipeline.restore import FaceRestorer

    class Noisy(torch.nn.Module):  # gives the crop back with fresh noise: a network's leftovers
        multiple = 8
        gen = torch.Generator().manual_seed(0)

        def forward(self, x):
            return x + torch.randn(x.shape, generator=self.gen) * (4 / 255)

    rng = np.random.default_rng(1)
    scene = cv2.GaussianBlur(rng.uniform(0, 255, (300, 560, 3)).astype(np.float32), (0, 0), 2.0)
    scene = np.clip((scene - scene.mean()) * 6 + 128, 0, 255).astype(np.uint8)  # texture ~40 levels
    r = FaceRestorer(Restorer(resolve("denoise"), Noisy()).eval(), colour_match=False)
    moves = [(0, 0), (6, 3), (12, 5)]  # the face (and the scene with it) moves right and down
    frames, faces = [], []
    for dx, dy in moves:
        frames.append(np.ascontiguousarray(scene[30 - dy : 270 - dy, 40 - dx : 520 - dx]))
        f = _face(180 + dx, 60 + dy, 260 + dx, 160 + dy)
        f.track = 0
        faces.append([f])
    placed = r.deltas(frames, faces, frames=[0, 1, 2])
    (x0, y0, x1, y1), d = placed[2][0]
    left = d[20:-20, 20:-20]  # the output's change: the noise the network left, steadied
    assert np.abs(d).max() > 0
    assert float(np.sqrt(np.mean(left**2))) < 0.8 * 4.0  # averaged down with the moved previous output
    r.reset()
    placed = r.deltas(frames[2:], faces[2:], frames=[2])  # alone: nothing to blend with
    assert 3.6 < float(np.sqrt(np.mean(placed[0][0][1][20:-20, 20:-20] ** 2))) < 4.4


def test_unmask_colour_match_ignores_the_repainted_pixels():
    """A mask pulled up over the nose lies in the region colour matching looks at: the robust
    match takes the face's shift from the pixels the network left alone, so the painted face is
    not pulled towards the mask's colour (a blue mask once tinted a whole face blue)."""
    from pipeline import align

    rng = np.random.default_rng(0)
    original = rng.uniform(90, 110, (160, 128, 3)).astype(np.float32)
    restored = original + 3.0  # the network's slight overall shift...
    original[60:160, 20:108] = (20, 40, 230)  # ...and a blue mask reaching into the region
    region = align.colour_region(128, 160)
    robust = align.match_colour_robust(restored, original, region)
    assert np.allclose((robust - restored)[0, 0], -3.0, atol=0.01)
    plain = align.match_colour(restored, original, region)
    assert np.abs((plain - restored)[0, 0] + 3.0).max() > 5  # the plain mean is pulled away


def test_the_bench_scores_the_faces_of_its_photos_and_not_the_chair_the_detector_finds():
    """The bench's reference heads are the faces the detector finds on the clean photos, less
    the boxes listed as none (``NOT_FACES``): on the Obama photo a dark desk chair scores 0.95,
    and a restorer that rightly leaves it alone on the degraded photo would score as the input."""
    from bench.quality import NOT_FACES, SCENE_PHOTOS, SOURCES, load_source
    from pipeline.track import iou

    scenes = next(s for s in SOURCES if s.name == "scenes")
    kind, clean, faces, heads, names = load_source(scenes, False, None)
    assert kind == "photos" and list(names) == list(SCENE_PHOTOS)
    by_name = dict(zip(names, faces))
    (chair,) = NOT_FACES["facerec_obama_partial_face.jpg"]
    obama = by_name["facerec_obama_partial_face.jpg"]
    assert len(obama) == 1 and obama[0].width > 200 and iou(obama[0].box, chair) == 0
    assert sum(map(len, faces)) == 15 and all(len(h) == len(f) for h, f in zip(heads, faces))
