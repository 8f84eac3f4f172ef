"""Unit checks of alignment, paste-back, tracking and metadata handling."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline import align, grain
from pipeline.faces import Face
from pipeline.media import add_rgb_delta
from pipeline.track import FaceTracker


def similarity(scale, angle, tx, ty):
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def test_estimate_transform_recovers_a_similarity():
    t = align.template(128)
    m = similarity(0.5, 0.3, 40.0, -12.0)  # crop -> frame
    frame_pts = t @ m[:, :2].T + m[:, 2]
    est = align.estimate_transform(frame_pts, 128)  # frame -> crop
    back = frame_pts @ est[:, :2].T + est[:, 2]
    assert np.allclose(back, t, atol=1e-6)


@pytest.mark.parametrize("aspect", [64 / 45, 4 / 3, 10 / 11])
def test_an_anamorphic_face_is_aligned_in_its_shown_shape(aspect):
    """Anamorphic frames (16:9 PAL DVD 64:45, HDV 4:3, NTSC DV 10:11) store a face squeezed or
    stretched in x: given the pixel aspect ratio, the crop puts its landmarks on the template, as
    those of the face shown; a similarity on the stored pixels cannot."""
    t = align.template(128)
    m = similarity(1.6, 0.2, 300.0, 120.0)  # crop -> the frame as shown
    stored = (t @ m[:, :2].T + m[:, 2]) / (aspect, 1.0)
    for a, exact in ((aspect, True), (1.0, False)):
        est = align.estimate_transform(stored, 128, a)
        off = np.abs(stored @ est[:, :2].T + est[:, 2] - t).max()
        assert (off < 1e-4) if exact else (off > 2.0), (a, off)
    est = align.estimate_transform(stored, 128, aspect)  # a square crop: stored x spans 1/aspect of y
    sx, sy = np.linalg.norm(est[:, 0]), np.linalg.norm(est[:, 1])
    assert sx / sy == pytest.approx(aspect)


def test_matched_size_grows_with_the_face():
    t = align.template(1.0)
    assert align.matched_size(t * 100) == 128
    assert align.matched_size(t * 300) == 384
    assert align.matched_size(t * 2000) == 512


def test_zero_delta_leaves_frame_bit_exact_and_delta_stays_in_mask():
    rng = np.random.default_rng(0)
    yuv = rng.integers(0, 256, (360 * 3 // 2, 640), dtype=np.uint8)
    before = yuv.copy()
    lm = align.template(1.0) * 150 + [200, 100]
    m = align.estimate_transform(lm, 128)
    rect, d = align.warp_delta(np.zeros((128, 128, 3), np.float32), m, 128, (360, 640))
    add_rgb_delta(yuv, rect, d)
    assert np.array_equal(yuv, before)
    rect, d = align.warp_delta(np.full((128, 128, 3), 40, np.float32), m, 128, (360, 640))
    add_rgb_delta(yuv, rect, d)
    changed = np.argwhere(yuv[:360] != before[:360])
    x0, y0, x1, y1 = rect
    assert changed.size and changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
    # a face-sized change: the crop corners (background) get nothing
    assert align.feather_mask(128)[0, 0] == 0 and align.feather_mask(128)[64, 64] == pytest.approx(1.0)


def test_replace_paste_removes_detail_the_upsampled_change_leaves():
    """Unmask paints over a mask: on a face larger than the 128 crop, adding the upsampled
    change leaves the mask's fine texture (a ghost); blending the restored pixels removes it,
    and the frame is bit-exact wherever the network changed nothing."""
    frame = np.full((400, 400, 3), 120, np.uint8)
    lm = align.template(1.0) * 300 + [50, 40]  # a 300 px face, restored on a 128 crop
    m = align.estimate_transform(lm, 128)
    yy, xx = np.mgrid[0:400, 0:400]
    cover = (yy > 230) & (yy < 300) & (xx > 150) & (xx < 250)  # the "mask", fine stripes
    frame[cover] = np.where((xx[cover] % 2)[:, None] == 0, 130, 250).astype(np.uint8)
    before = frame.copy()
    crop = align.warp_face(frame, m, 128).astype(np.float32)
    cover_c = cv2.warpAffine(cover.astype(np.float32), m, (128, 128)) > 0.01
    restored = crop.copy()
    restored[cover_c] = 120.0  # the network paints the covered area over
    ghost = frame.copy()
    align.add_delta(ghost, *align.warp_delta(restored - crop, m, 128, frame.shape[:2]))
    out = frame.copy()
    weight = align.replace_weight(restored, crop)
    align.add_delta(out, *align.warp_replace(restored, weight, m, frame))
    inner = cover & (yy > 240) & (yy < 290) & (xx > 160) & (xx < 240)
    assert np.abs(out[inner].astype(int) - 120).max() <= 3
    assert np.abs(ghost[inner].astype(int) - 120).max() > 40  # the stripes survive a change paste
    far = (yy < 150) | (yy > 360) | (xx < 90) | (xx > 310)
    assert np.array_equal(out[far], before[far])


def _painted_face(noise: float, seed: int = 0):
    """A 400 px frame of skin with grain of ``noise`` levels, a face aligned over it whose lower
    half the "network" paints flat (a 128 px painter's smooth output)."""
    rng = np.random.default_rng(seed)
    frame = np.clip(150 + rng.normal(0, noise, (400, 400, 1)) + [10, 0, -20], 0, 255).astype(np.uint8)
    lm = align.template(1.0) * 300 + [50, 20]
    m = align.estimate_transform(lm, 128)
    crop = align.warp_face(frame, m, 128).astype(np.float32)
    restored = crop.copy()
    restored[80:120, 30:98] = crop[80:120, 30:98].mean(axis=(0, 1))  # smooth paint
    return frame, m, crop, restored


def test_unmask_paint_gets_the_grain_of_the_skin_around_it():
    """A flat paint in a grainy frame gets grain of about the skin's level (the high band of
    luma), only where it painted, the same grain for the same track; a smooth frame gets none."""
    frame, m, crop, restored = _painted_face(noise=6.0)
    weight = np.zeros((128, 128), np.float32)
    weight[80:120, 30:98] = 1.0  # the paint: the painted box
    flat, grainy = frame.copy(), frame.copy()
    rect, delta = align.warp_replace(restored, weight, m, frame)
    align.add_delta(flat, rect, delta)
    rect2, delta2 = align.warp_replace(restored, weight, m, frame, grain_seed=7)
    assert rect2 == rect
    align.add_delta(grainy, rect2, delta2)
    inv = cv2.invertAffineTransform(m)
    x0, y0 = np.rint(inv @ [40, 85, 1]).astype(int)
    x1, y1 = np.rint(inv @ [88, 115, 1]).astype(int)
    band = lambda img: grain._band(grain._luma(img[y0:y1, x0:x1].astype(np.float32)))
    skin = grain._band(grain._luma(frame[20:120, 20:380].astype(np.float32))).std()
    assert band(flat).std() < 0.25 * skin  # the paint alone is smooth
    assert 0.6 * skin < band(grainy).std() < 1.5 * skin  # with grain: about the skin's texture
    far = np.ones(frame.shape[:2], bool)
    far[rect[1]:rect[3], rect[0]:rect[2]] = False
    assert np.array_equal(grainy[far], frame[far])  # nothing outside the face's rectangle
    weight_frame = cv2.warpAffine(weight, m, (400, 400), flags=cv2.WARP_INVERSE_MAP)
    unpainted = cv2.dilate((weight_frame > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    assert unpainted[rect[1]:rect[3], rect[0]:rect[2]].mean() > 0.5
    assert np.array_equal(grainy[unpainted], flat[unpainted])  # only where it painted
    again = align.warp_replace(restored, weight, m, frame, grain_seed=7)[1]
    other = align.warp_replace(restored, weight, m, frame, grain_seed=8)[1]
    assert np.array_equal(again, delta2) and not np.array_equal(other, delta2)

    smooth, m, crop, restored = _painted_face(noise=0.0)
    assert np.array_equal(align.warp_replace(restored, weight, m, smooth, grain_seed=7)[1],
                          align.warp_replace(restored, weight, m, smooth)[1])

def test_taller_crop_extends_the_square_one_downwards_and_pastes_there():
    """unmask's crop is the square template crop plus 32 rows below it (the chin): its top 128
    rows are the square crop, and a change painted in the extra rows lands under the face."""
    frame = np.random.default_rng(0).integers(0, 255, (400, 400, 3)).astype(np.uint8)
    lm = align.template(1.0) * 300 + [50, 20]
    m = align.estimate_transform(lm, 128)
    square, tall = align.warp_face(frame, m, 128), align.warp_face(frame, m, 128, 160)
    assert tall.shape == (160, 128, 3) and np.array_equal(tall[:128], square)
    restored = tall.astype(np.float32)
    restored[136:150, 40:88] = 0.0  # painted only in the extra rows
    weight = align.replace_weight(restored, tall.astype(np.float32))
    assert weight.shape == (160, 128) and weight[:120].max() == 0 and weight[143, 64] == 1
    out = frame.copy()
    align.add_delta(out, *align.warp_replace(restored, weight, m, frame))
    changed = np.nonzero(np.abs(out.astype(int) - frame).max(axis=2))
    inv = cv2.invertAffineTransform(m)
    bottom = (inv @ [64, 128, 1])[1]  # the square crop's lower edge, in the frame
    x, y = np.rint(inv @ [64, 143, 1]).astype(int)  # a painted pixel, in the frame
    assert changed[0].min() > bottom and out[y, x].max() < 40
    assert align.colour_region(128, 160).shape == (160, 128) and not align.colour_region(128, 160)[128:].any()


def test_crop_of_a_large_face_is_shrunk_without_aliasing_and_without_moving():
    """A face larger than the crop is area-averaged down before it is warped: single-pixel
    stripes (a knitted mask, a striped shirt) come out near their mean, not as moire, and a smooth
    face comes out where the unfiltered warp puts it. A face smaller than the crop is warped as
    before, bit for bit. Also at a frame's edge, where the crop reflects the frame."""
    yy, xx = np.mgrid[0:600, 0:600]
    stripes = np.repeat(np.where(xx % 2 == 0, 40, 220)[..., None], 3, axis=2).astype(np.uint8)
    rng = np.random.default_rng(3)
    smooth = cv2.GaussianBlur(rng.normal(128, 60, (600, 600, 3)).astype(np.float32), (0, 0), 8)
    smooth = np.clip((smooth - 128) * 6 + 128, 0, 255).astype(np.uint8)
    for offset in ([120, 80], [330, 320]):  # inside; chin and side past the frame
        m = align.estimate_transform(align.template(1.0) * 300 + offset, 128)  # scale ~0.4
        shrunk = align.warp_face(stripes, m, 128, 160).astype(float)
        aliased = align.warp_face(stripes, m, 128, 160, antialias=False).astype(float)
        # a box filter at a ratio of 2.34 px leaves a faint beat (std ~12); unfiltered, the
        # stripes alias to bands of full contrast (std ~63), as the network saw them before
        assert abs(shrunk.mean() - 130) < 3 and shrunk.std() < 15 and aliased.std() > 50
        a = align.warp_face(smooth, m, 128, 160).astype(float)
        b = align.warp_face(smooth, m, 128, 160, antialias=False).astype(float)
        inner = np.s_[8:-8, 8:-8] if offset[0] == 120 else np.s_[8:100, 8:100]
        assert 10 * np.log10(255**2 / ((a[inner] - b[inner]) ** 2).mean()) > 40
    small = align.estimate_transform(align.template(1.0) * 100 + [200, 200], 128)  # scale > 0.9
    assert np.array_equal(align.warp_face(stripes, small, 128), align.warp_face(stripes, small, 128, antialias=False))


def test_outside_frame_marks_the_crop_pixels_warp_face_reflects():
    """The crop pixels that map outside the frame are those warp_face fills by reflection: a
    crop of an image of ones with a zero border is 1 where they are inside (bilinear edges
    aside)."""
    for lm, shape in ((align.template(1.0) * 200 + [10, 60], (240, 220)),  # chin past the bottom
                      (align.template(1.0) * 120 + [60, 40], (400, 300))):  # all inside
        m = align.estimate_transform(lm, 128)
        rotated = align.estimate_transform(lm @ [[0.98, 0.17], [-0.17, 0.98]], 128)
        for mat in (m, rotated):
            out = align.outside_frame(mat, 128, 160, shape)
            ones = cv2.warpAffine(np.ones(shape, np.float32), mat, (128, 160), flags=cv2.INTER_LINEAR,
                                  borderValue=0)
            assert out.shape == (160, 128) and out.dtype == bool
            assert (ones[out] < 0.75).all() and (ones[~out] > 0.25).all()
    low = align.estimate_transform(align.template(1.0) * 200 + [10, 60], 128)
    assert align.outside_frame(low, 128, 160, (240, 220))[-1].all()
    assert not align.outside_frame(m, 128, 160, (400, 300)).any()  # the second face


def test_tracker_fills_gaps_and_smooths_jitter():
    rng = np.random.default_rng(1)
    base = align.template(1.0) * 120 + [300, 200]
    tr = FaceTracker()
    truth, noisy = [], []
    for i in range(40):
        true = base + [i * 2.0, 0]
        lm = true + rng.normal(0, 2.0, (5, 2))
        truth.append(true)
        noisy.append(lm)
        box = np.array([lm[:, 0].min() - 30, lm[:, 1].min() - 40, lm[:, 0].max() + 30, lm[:, 1].max() + 40])
        faces = [] if i in (10, 11, 12) else [Face(box=box, landmarks=lm, score=0.99)]
        tr.add(i, faces)
    out = tr.pop_ready() + tr.pop_ready(final=True)
    assert [i for i, _ in out] == list(range(40))
    assert all(len(fs) == 1 for _, fs in out)  # the 3-frame gap is filled
    assert len({fs[0].track for _, fs in out}) == 1  # one track throughout
    assert out[11][1][0].interpolated
    err_raw = np.mean([np.abs(n - t).mean() for n, t in zip(noisy, truth)])
    err_smooth = np.mean([np.abs(fs[0].landmarks - t).mean() for (_, fs), t in zip(out, truth)])
    assert err_smooth < 0.7 * err_raw


def test_jpeg_metadata_copied():
    from pipeline.images import _copy_jpeg_metadata

    app1 = b"\xff\xe1\x00\x08Exif\x00\x00"
    src = b"\xff\xd8" + app1 + b"\xff\xdb\x00\x02" + b"\xff\xda"
    dst = b"\xff\xd8\xff\xdb\x00\x02\xff\xda"
    assert _copy_jpeg_metadata(src, dst) == b"\xff\xd8" + app1 + dst[2:]


def _moving_face(x: float, w: float = 90.0) -> Face:
    lm = align.template(1.0) * w * 1.4 + [x, 300.0]
    return Face(box=np.array([x, 280.0, x + w, 400.0]), landmarks=lm, score=0.99)


def test_tracker_keeps_a_fast_face_across_a_detection_gap():
    # 90 px wide, 35 px a frame (walking_1080p's nearest face): frames 3 apart overlap by IoU < 0.1
    tr = FaceTracker()
    for i in range(13):
        tr.add(i, [_moving_face(35.0 * i)] if i % 3 == 0 else None)
    out = tr.pop_ready(final=True)
    assert all(len(fs) == 1 for _, fs in out)  # every frame has the face, the gaps interpolated
    assert len({fs[0].track for _, fs in out}) == 1
    assert out[4][1][0].interpolated and out[4][1][0].box[0] == pytest.approx(140.0)


def test_tracker_hands_back_weak_faces_only_near_a_confident_detection_of_their_track():
    # a face that scores 0.99 on frame 9 only, else 0.6; a box elsewhere that never scores 0.9
    tr = FaceTracker(confirm_score=0.9)
    for i in range(30):
        face = _moving_face(10.0 * i)
        face.score = 0.99 if i == 9 else 0.6
        weak = _moving_face(1500.0)
        weak.score = 0.85
        tr.add(i, [face, weak] if i % 3 == 0 else None)
    out = dict(tr.pop_ready() + tr.pop_ready(final=True))
    assert sorted(out) == list(range(30))
    with_face = [i for i, fs in out.items() if fs]
    assert with_face == list(range(3, 16))  # within lookahead (6) of frame 9
    assert all(len(out[i]) == 1 and out[i][0].box[0] < 1000 for i in with_face)  # never the weak box
    everything = FaceTracker()  # confirm_score 0: every detection counts, as for still images
    for i in range(28):
        face = _moving_face(10.0 * i)
        face.score = 0.6
        everything.add(i, [face] if i % 3 == 0 else None)
    assert all(len(fs) == 1 for _, fs in everything.pop_ready(final=True))


def test_tracker_drops_a_box_found_on_one_frame_only():
    """A confident box on one detected frame that the detector does not find again on the
    detected frames around it (a pattern on a jacket) is not handed back; a face found on two
    frames is, and so is the one face of a clip too short to look twice."""
    tr = FaceTracker(confirm_score=0.9)
    for i in range(19):
        faces = [_moving_face(10.0 * i)] if i % 3 == 0 else None
        if i == 9:
            blip = _moving_face(1500.0)
            blip.score = 0.97
            faces.append(blip)
        tr.add(i, faces)
    out = dict(tr.pop_ready() + tr.pop_ready(final=True))
    assert all(len(fs) == 1 and fs[0].box[0] < 1000 for fs in out.values())
    kept = FaceTracker(confirm_score=0.9, repeat=False)
    for i in range(20):
        kept.add(i, [_moving_face(1500.0)] if i == 9 else ([] if i % 3 == 0 else None))
    assert [len(fs) for _, fs in kept.pop_ready(final=True)][9] == 1
    once = FaceTracker(confirm_score=0.9)
    once.add(0, [_moving_face(100.0)])
    assert [len(fs) for _, fs in once.pop_ready(final=True)] == [1]


def _face_at(y: float, score: float, x: float = 300.0, w: float = 90.0) -> Face:
    lm = align.template(1.0) * w * 1.4 + [x, y + 20.0]
    return Face(box=np.array([x, y, x + w, y + 120.0]), landmarks=lm, score=score)


def test_a_weak_box_away_from_a_track_does_not_take_it():
    """A masked face looking down (walking_1080p): the detector misses it for a few frames and
    finds a weak box on the hair above it, a box height away, then both. The track stays on the
    face (its gaps interpolated) and the hair box, never confirmed, is not handed back."""
    tr = FaceTracker(confirm_score=0.9)
    for i in range(22):
        if i % 3:
            tr.add(i, None)
        elif i in (12, 15):  # the hair box (weak, no overlap with the face); then the face too
            tr.add(i, [_face_at(180.0, 0.64)] + ([_face_at(285.0, 0.77)] if i == 15 else []))
        else:
            tr.add(i, [_face_at(280.0, 0.99)])
    out = tr.pop_ready() + tr.pop_ready(final=True)
    assert [len(fs) for _, fs in out] == [1] * 22
    assert all(fs[0].box[1] >= 280.0 for _, fs in out)  # never on the hair
    assert len({fs[0].track for _, fs in out}) == 1


def test_a_track_takes_the_confident_of_two_boxes_on_one_head():
    """Two boxes on one head, both overlapping its track: the weak one (eyes and hair) overlaps
    it more, the confident one (the lower face) less; the track goes on with the confident one."""
    tr = FaceTracker(confirm_score=0.9)
    for i in range(0, 10, 3):
        tr.add(i, [_face_at(280.0, 0.99)])
        tr.add(i + 1, None)
        tr.add(i + 2, None)
    weak, sure = _face_at(250.0, 0.6), _face_at(335.0, 0.95)
    tr.add(12, [weak, sure])
    out = dict(tr.pop_ready(final=True))
    assert [f.box[1] for f in out[12]] == [335.0]
    assert out[12][0].track == out[0][0].track


def test_same_faces_tells_when_faces_appear_or_vanish():
    from pipeline.track import same_faces

    a = [_moving_face(0.0)]
    assert same_faces(a, [_moving_face(105.0)], 3)  # the same face, moved 35 px a frame
    assert not same_faces(a, [_moving_face(105.0)], 1)  # too far for one frame
    assert not same_faces(a, [], 3)  # it vanished
    assert not same_faces(a, [_moving_face(105.0), _moving_face(900.0)], 3)  # another appeared
    assert same_faces([], [], 3)


def test_changed_faces_names_the_face_that_came_and_where_to_look_for_it():
    from pipeline.track import changed_faces, search_regions

    stay, came = _moving_face(0.0), _moving_face(900.0)
    vanished, appeared = changed_faces([stay], [_moving_face(105.0), came], 3)
    assert vanished == [] and appeared == [came]
    (x0, y0, x1, y1), = search_regions(appeared, 3, 1920, 1080)
    # half a width a frame of the gap and half a width more on each side, inside the frame
    assert (x0, y0, x1, y1) == (900 - 180, 280 - 180, 990 + 180, 400 + 180)
    assert search_regions([_moving_face(-30.0)], 3, 1920, 1080)[0][0] == 0


def test_only_a_confident_face_that_came_or_went_asks_for_a_search_between_detections():
    from pipeline.track import gap_regions

    stay, came = _moving_face(0.0), _moving_face(900.0)
    came.score = 0.8  # under the detector's min_score, over its track_score
    faces = [_moving_face(105.0), came]
    assert gap_regions((0, [stay]), 3, faces, 1, 1920, 1080, min_score=0.92) == []
    assert gap_regions((0, [stay]), 3, faces, 1, 1920, 1080) != []  # every face counts by default
    came.score = 0.95
    assert len(gap_regions((0, [stay]), 3, faces, 1, 1920, 1080, min_score=0.92)) == 1
    dipped = _moving_face(105.0)  # the face that stayed, its score dipped: paired, no search
    dipped.score = 0.75
    assert gap_regions((0, [stay]), 3, [dipped], 1, 1920, 1080, min_score=0.92) == []


@pytest.mark.parametrize("shrunk", [False, True])
def test_detect_regions_finds_in_a_region_the_faces_the_whole_frame_has_there(shrunk):
    """In the frame itself, and in the copy shrunk to the detector's size as a video's frames
    are converted (``shape``): the faces come back in the frame's coordinates."""
    from conftest import VIDEOS
    from pipeline.faces import FaceDetector
    from pipeline.media import i420_to_rgb, iter_frames, plan
    from pipeline.track import iou, search_regions

    vplan = plan(VIDEOS / "walking_1080p.mp4")
    yuv = next(iter_frames(vplan, 0, 1))[1]
    frame = i420_to_rgb(yuv, vplan.yuv_matrix)
    det = FaceDetector()
    shape = frame.shape[:2] if shrunk else None
    looked = i420_to_rgb(yuv, vplan.yuv_matrix, det.size_for(*frame.shape[:2])) if shrunk else frame
    whole = det.detect([looked], shape=shape)[0]
    assert len(whole) >= 4
    clear = [f for f in whole if f.score > 0.99]  # not the half-hidden face behind another
    assert len(clear) >= 4
    for face in clear:
        region = search_regions([face], 1, frame.shape[1], frame.shape[0])
        found = det.detect_regions(looked, region, shape=shape)
        assert max(iou(face.box, f.box) for f in found) > 0.75  # in frame coordinates
        x0, y0, x1, y1 = region[0]
        inside = [f for f in whole if x0 <= f.box[0] and f.box[2] <= x1 and y0 <= f.box[1] and f.box[3] <= y1]
        assert len(found) >= len(inside) and len(found) < len(whole)


def test_a_frame_converted_at_the_detectors_size_is_the_frame_shrunk():
    """``i420_to_rgb(yuv, matrix, size)``: the planes averaged to the detector's size, then
    converted; the same as converting the whole frame and shrinking it, up to rounding (and
    where clipping to 0..255 comes before or after the averaging); and the detector finds the
    same faces in it."""
    from conftest import VIDEOS
    from pipeline.faces import FaceDetector
    from pipeline.media import i420_to_rgb, iter_frames, plan
    from pipeline.track import iou

    vplan = plan(VIDEOS / "walking_1080p.mp4")
    yuvs = [y for _, y in iter_frames(vplan, 0, 24)][::6]
    det = FaceDetector()
    shape = (vplan.height, vplan.width)
    size = det.size_for(*shape)
    assert size == (960, 540) and det.size_for(540, 960) is None
    full = [i420_to_rgb(y, vplan.yuv_matrix) for y in yuvs]
    small = [i420_to_rgb(y, vplan.yuv_matrix, size) for y in yuvs]
    d = np.abs(cv2.resize(full[0], size, interpolation=cv2.INTER_AREA).astype(int) - small[0])
    assert small[0].shape == (540, 960, 3) and d.mean() < 0.3 and np.percentile(d, 99.9) <= 2
    a, b = det.detect(full, floor=det.track_score), det.detect(small, floor=det.track_score, shape=shape)
    assert [len(x) for x in a] == [len(x) for x in b] and sum(map(len, a)) >= 16
    ious = [max(iou(f.box, g.box) for g in fb) for fa, fb in zip(a, b) for f in fa]
    assert np.median(ious) > 0.95


@pytest.mark.parametrize("matrix", ["bt601", "bt709", "bt709-full"])
def test_an_rgb_view_converts_a_rectangle_to_what_the_whole_frame_has_there(matrix):
    """``RgbView``: a local network's windows read from the I420 frame one rectangle at a time
    must hold exactly the pixels of the whole frame's conversion, at any offset (odd ones cut
    through chroma blocks) and size, the frame's edges included."""
    from conftest import VIDEOS
    from pipeline.media import BT601, BT709, RgbView, YuvMatrix, i420_to_rgb, iter_frames, plan

    m = {"bt601": BT601, "bt709": BT709, "bt709-full": YuvMatrix("bt709-full", BT709.kr, BT709.kb, True)}[matrix]
    (_, yuv), = iter_frames(plan(VIDEOS / "selfie_mp3audio.mp4"), 10, 11)
    full, view = i420_to_rgb(yuv, m), RgbView(yuv, m)
    H, W = full.shape[:2]
    assert view.shape == full.shape and np.array_equal(np.asarray(view), full)
    rng = np.random.default_rng(1)
    rects = [(0, H, 0, W), (1, 2, 1, 2), (H - 3, H, W - 5, W), (7, 7, 3, 9)]
    rects += [(*sorted(rng.integers(0, H + 1, 2)), *sorted(rng.integers(0, W + 1, 2))) for _ in range(60)]
    for y0, y1, x0, x1 in rects:
        assert np.array_equal(view[y0:y1, x0:x1, :3], full[y0:y1, x0:x1, :3]), (y0, y1, x0, x1)
        assert np.array_equal(view[y0:y1, x0:x1], full[y0:y1, x0:x1])
    with pytest.raises(TypeError):
        view[::2, :]


def test_a_local_network_given_rgb_views_restores_the_frames_as_given_them_whole():
    """A video's local task reads each frame through an ``RgbView`` (only the heads' windows
    converted): every head's region and change must be what the whole converted frame gives,
    in a crowd whose windows run to the frame's edges and overlap."""
    import models
    from conftest import VIDEOS
    from pipeline.faces import FaceDetector
    from pipeline.media import RgbView, i420_to_rgb, iter_frames, plan
    from pipeline.restore import FaceRestorer

    vplan = plan(VIDEOS / "walking_1080p.mp4")
    yuvs = [y for _, y in iter_frames(vplan, 30, 32)]
    full = [i420_to_rgb(y, vplan.yuv_matrix) for y in yuvs]
    faces = FaceDetector().detect(full)
    rest = FaceRestorer(models.load("denoise"))
    assert rest.local and sum(map(len, faces)) >= 6
    whole = rest.deltas(full, faces)
    viewed = rest.deltas([RgbView(y, vplan.yuv_matrix) for y in yuvs], faces)
    assert [[r for r, _ in fs] for fs in viewed] == [[r for r, _ in fs] for fs in whole]
    assert all(np.array_equal(a, b) for fa, fb in zip(viewed, whole) for (_, a), (_, b) in zip(fa, fb))
    assert sum(len(fs) for fs in whole) >= 3 and any(np.abs(d).max() > 2 for fs in whole for _, d in fs)


def test_restorer_channels_last_gives_the_networks_own_output():
    import torch

    import models
    from pipeline.restore import FaceRestorer

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    plain = models.load("denoise")
    with torch.inference_mode():
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
        want = plain(x).mul(255).permute(0, 2, 3, 1).numpy()
    r = FaceRestorer(models.load("denoise"))
    assert r.channels_last
    got = np.stack(r._run(crops))
    assert np.abs(got - want).max() < 1e-3


def _dot_views(task: str, **spec_changes):
    """A flat 480 px frame holding one 200 px face; the ``task``'s spec at zooms 1, 0.8 and 1.25
    (with ``spec_changes``) run by a network that sets a 3 x 3 dot at crop pixel (64, 30) to 10
    (of 255). Returns the face, each view's dot in the frame and ``change(**restorer options)``:
    the restorer's (output - 100) in channel 0, and the restorer."""
    import dataclasses

    import torch

    from models.registry import Restorer
    from models.tasks import resolve
    from pipeline.restore import FaceRestorer

    class Dot(torch.nn.Module):
        def forward(self, x):
            y = x.clone()
            y[:, :, 29:32, 63:66] = 10 / 255
            return y

    frame = np.full((480, 480, 3), 100, np.uint8)
    face = Face(np.array([140.0, 140, 340, 340]), align.template(1.0) * 200 + [140, 120], 0.99)
    zooms = (1.0, 0.8, 1.25)
    spec = dataclasses.replace(resolve(task), zooms=zooms, **spec_changes)
    dots = [np.rint(cv2.invertAffineTransform(align.estimate_transform(align.zoomed(face.landmarks, z), 128))
                    @ [64, 30, 1]).astype(int) for z in zooms]  # each view's dot, in the frame

    def change(**options):
        r = FaceRestorer(Restorer(spec, Dot()).eval(), colour_match=False, **options)
        out = frame.copy()
        for rect, delta in r.deltas([frame], [[face]])[0]:
            align.add_delta(out, rect, delta)
        return out.astype(int)[..., 0] - 100, r

    return face, dots, change


def test_zoomed_views_are_averaged_into_one_change_per_face():
    """TaskSpec.zooms (unmask: 1, 0.9, 1.1): each face is restored from several crops of it, at
    different zooms, and the results are averaged before one paste. A network that darkens a
    dot at a fixed place of its crop darkens three places of the face (one per view) by a third
    each; ``ensemble=False`` (the CLI's --fast) restores the zoom-1 crop alone; pixels outside
    that crop stay bit-exact; each face counts once."""
    face, dots, run = _dot_views("enhance", native=False)  # an aligned, non-replacing 128 px task
    assert min(np.abs(a - b).max() for a in dots for b in dots if a is not b) >= 10
    for ensemble in (True, False):
        change, r = run(ensemble=ensemble)
        assert r.faces_restored == 1
        at_dots = [change[y, x] for x, y in dots]
        if ensemble:
            assert all(-36 <= c <= -24 for c in at_dots), at_dots  # (10 - 100) / 3 each
        else:
            assert at_dots[0] <= -80 and at_dots[1:] == [0, 0], at_dots
        assert (change < 0).sum() < 400  # the dots and nothing else
        x0, y0, x1, y1 = align._frame_rect(align.estimate_transform(face.landmarks, 128), 128, change.shape)[0]
        outside = np.ones(change.shape, bool)
        outside[y0:y1, x0:x1] = False
        assert not change[outside].any()


def test_a_replacing_tasks_paint_is_steadied_along_its_track():
    """views.TrackSteady: a face's paint on consecutive frames of one track is blended with the
    previous frame's, resampled into this frame's crop (the face moved 3 px); noise that
    changes from frame to frame shrinks, a real change (the paint differs by far) is kept, and
    another track, a skipped frame or an untracked face is left as it came."""
    from pipeline.views import TrackSteady

    rng = np.random.default_rng(0)
    base = np.full((64, 64, 3), 120.0, np.float32)
    base[20:40, 20:40] = 160.0
    steady, raw, out = TrackSteady(), [], []
    for f in range(12):
        m = np.array([[1.0, 0, -3.0 * f], [0, 1, 0]])  # frame -> crop: the face moved 3 px a frame
        rest = (base + rng.normal(0, 3, base.shape)).astype(np.float32)
        raw.append(rest)
        out.append(steady(7, f, m, rest))
    shimmer = lambda xs: np.mean([np.abs(b - a)[8:56, 8:56].mean() for a, b in zip(xs[4:], xs[5:])])  # noqa: E731
    assert shimmer(out) < 0.6 * shimmer(raw)
    assert np.abs(out[-1][20:40, 20:40] - 160).mean() < 2.5  # the square stays in place
    changed = base + 60.0  # a real change: kept as it is
    m = np.array([[1.0, 0, -36.0], [0, 1, 0]])
    assert np.allclose(steady(7, 12, m, changed), changed, atol=0.01)
    for track, frame in ((8, 13), (7, 15), (-1, 16)):  # a new track, a gap, an untracked face
        assert np.array_equal(steady(track, frame, m, base), base)


def test_a_replacing_tasks_views_count_by_what_each_changed():
    """unmask's views often disagree on a small face: one paints the mask over, another leaves
    it. Weighted by what each view changed (``pipeline.views``), the paint of a view that
    changed a place outvotes the views that left it alone: a dot one view of three paints keeps
    most of its contrast, not a third (a ghost), and pixels no view changed stay as they were."""
    _, dots, run = _dot_views("unmask", below=0, aside=0, mirror=False)
    change, _ = run(grain=False)
    at_dots = [change[y, x] for x, y in dots]
    assert all(c <= -55 for c in at_dots), at_dots  # a plain mean: (10 - 100) / 3 = -30
    assert (np.abs(change) > 3).sum() < 400  # the dots (and the resampling's ringing) only


def test_a_replacing_task_cuts_each_face_at_the_template_size_nearest_its_own():
    """TaskSpec.sizes (here 128, 192, 256; no shipped task sets it): a face is painted at the
    crop size nearest its own in the frame instead of being shrunk to the network's 128 px and
    its paint enlarged back; the columns aside and the rows below grow with it, to multiples of
    the network's stride. A network that darkens the template's point (0.5, 0.8) whatever the
    crop's size darkens that point of each face, a 90 px face cut at 128 and a 260 px face at
    256."""
    import dataclasses

    import torch

    from models.registry import Restorer
    from models.tasks import resolve
    from pipeline.restore import FaceRestorer

    seen = []
    margins = {160: (128, 16), 256: (192, 32), 320: (256, 32)}  # crop width: template, aside

    class Mark(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            size, aside = margins[x.shape[3]]
            y = x.clone()
            cx, cy = int(0.5 * size) + aside, int(0.8 * size)
            y[:, :, cy - 2 : cy + 2, cx - 2 : cx + 2] = 0.0
            return y

    spec = dataclasses.replace(resolve("unmask"), zooms=(1.0,), mirror=False, sizes=(128, 192, 256))
    r = FaceRestorer(Restorer(spec, Mark()).eval(), colour_match=False, grain=False)
    frame = np.full((480, 720, 3), 100, np.uint8)
    small = Face(np.zeros(4), align.template(1.0) * 90 + [60, 100], 0.99)
    large = Face(np.zeros(4), align.template(1.0) * 260 + [300, 80], 0.99)
    assert [r.crop_size(f) for f in (small, large)] == [128, 256]
    assert r.crop_size(Face(np.zeros(4), align.template(1.0) * 180, 0.99)) == 192
    out = frame.copy()
    for rect, delta in r.deltas([frame], [[small, large]])[0]:
        align.add_delta(out, rect, delta)
    assert sorted(seen) == [(160, 160), (320, 320)]
    dark = out[..., 0] < 60
    for side, (ox, oy) in ((90, (60, 100)), (260, (300, 80))):
        x, y = 0.5 * side + ox, 0.8 * side + oy  # the template point, in the frame
        near = dark[int(y) - 8 : int(y) + 9, int(x) - 8 : int(x) + 9]
        assert near.any(), (side, x, y)
    assert dark.sum() < 20 * 20 * 2  # the two marks and nothing else
