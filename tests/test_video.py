"""Videos end to end on the real clips: frames, timing, audio, faces, pixels."""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import VIDEOS, cut, decode_rgb, face_mask, masked_psnr, probe, psnr, run_json


def assert_same_media(src: Path, out: Path) -> dict:
    a, b = probe(src), probe(out)
    assert b["frames"] == a["frames"]
    assert (b["width"], b["height"]) == (a["width"] + a["width"] % 2, a["height"] + a["height"] % 2)
    assert b["pts"] == pytest.approx(a["pts"], abs=1e-6)  # same frame timing, frame by frame
    frame = 1.0 / a["fps"]
    assert abs((a["pts"][-1] - a["pts"][0]) - (b["pts"][-1] - b["pts"][0])) < frame
    assert b["audio_codecs"] == a["audio_codecs"]
    assert b["audio"] == a["audio"]  # every audio packet byte-identical
    assert b["rotation"] == a["rotation"]
    assert b["color"] == a["color"]  # a BT.709 source stays tagged BT.709, so colours do not shift
    return b


def test_walking_1080p_identity_round_trip(tmp_path):
    src = VIDEOS / "walking_1080p.mp4"
    out = tmp_path / "walking.identity.mp4"
    # superfast at crf 15 (not the default medium at 18): the encoder's speed is not what is tested
    # here, and its faces keep more margin over 40 dB (41.8) than the defaults' (41.5), in half the time
    r = run_json("submit", src, "--task", "identity", "--output", out, "--preset", "superfast", "--crf", 15)
    assert r["frames"] == 105
    assert r["faces"] / r["frames"] >= 2.0  # several people in every frame
    assert_same_media(src, out)
    a, b = decode_rgb(src, every=8), decode_rgb(out, every=8)  # 14 frames of 105
    assert masked_psnr(a, b, face_mask(a)) >= 40.0


def test_closeup_identity_and_denoise_touch_only_faces(tmp_path):
    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "closeup.mp4", 3.0)
    ident = tmp_path / "closeup.identity.mp4"
    den = tmp_path / "closeup.denoise.mp4"
    r = run_json("submit", src, "--task", "identity", "--output", ident)
    assert r["frames_with_faces"] == r["frames"] > 0
    assert_same_media(src, ident)
    a, b = decode_rgb(src, every=3), decode_rgb(ident, every=3)
    faces = face_mask(a)
    assert masked_psnr(a, b, faces) >= 40.0  # a large face comes back as sharp as it went in

    run_json("submit", src, "--task", "denoise", "--output", den)
    assert_same_media(src, den)
    # identity is a plain decode/encode at the same settings (frames without change are
    # encoded untouched), so it is the reference for pixels outside faces
    c = decode_rgb(den, every=3)
    outside = [~m for m in face_mask(a, grow=0.35)]
    assert masked_psnr(b, c, outside) >= 45.0
    assert masked_psnr(b, c, faces) < 60.0  # the model did change the faces


@pytest.mark.parametrize("name, faces", [("no_face_cartoon.mp4", False), ("selfie_mp3audio.mp4", True)])
def test_short_clips_pass_through_with_audio(tmp_path, name, faces):
    src = VIDEOS / name
    out = tmp_path / f"out{src.suffix}"
    r = run_json("submit", src, "--task", "identity", "--output", out, "--preset", "veryfast")
    assert (r["faces"] > 0) == faces
    b = assert_same_media(src, out)
    if name.startswith("selfie"):
        assert b["audio_codecs"] == ["mp3float"] or b["audio_codecs"][0].startswith("mp3")


def test_hevc_mov_default_output_name(tmp_path):
    src = tmp_path / "clip.mov"
    src.write_bytes((VIDEOS / "face_then_noface_hevc.mov").read_bytes())
    r = run_json("submit", src, "--task", "identity", "--preset", "veryfast")
    out = tmp_path / "clip.identity.mov"
    assert r["output"] == str(out) and out.is_file()
    assert 0 < r["frames_with_faces"] < r["frames"]  # a face, then a cut to footage with none
    assert_same_media(src, out)


def test_rotation_metadata_kept(tmp_path):
    src = tmp_path / "rotated.mp4"
    with av.open(str(VIDEOS / "selfie_mp3audio.mp4")) as c, av.open(str(src), "w") as o:
        outs = {s.index: o.add_stream_from_template(s) for s in c.streams}
        outs[c.streams.video[0].index].set_display_rotation(90)
        for p in c.demux():
            if p.dts is None:
                continue
            p.stream = outs[p.stream.index]
            o.mux(p)
    out = tmp_path / "rotated.identity.mp4"
    run_json("submit", src, "--task", "identity", "--preset", "veryfast")
    assert probe(src)["rotation"] == 90
    assert_same_media(src, out)


def write_clip(path: Path, frames: list[np.ndarray], codec: str, pix_fmt: str,
               color_range: int = 0) -> None:
    """RGB frames (all one size) as a video-only clip at 30 fps; ``color_range`` 2: full range,
    tagged so."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as o:
        s = o.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if color_range:
            s.codec_context.color_range = color_range
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if color_range:
                frame = frame.reformat(format=pix_fmt, dst_color_range=color_range)
            for p in s.encode(frame):
                o.mux(p)
        for p in s.encode(None):
            o.mux(p)


def test_odd_dimensions_padded_and_reported(tmp_path):
    src = tmp_path / "odd.mkv"
    frames = decode_rgb(VIDEOS / "selfie_mp3audio.mp4", limit=12)
    write_clip(src, [f[:181, :321] for f in frames], "ffv1", "yuv444p")
    r = run_json("submit", src, "--task", "identity", "--preset", "veryfast")
    out = tmp_path / "odd.identity.mkv"
    info = probe(out)
    assert (info["width"], info["height"]) == (322, 182)
    assert info["frames"] == 12
    # padded in YUV itself: the picture is the source's (4:4:4 -> 4:2:0 and x264 aside), and the
    # added column and row repeat the last ones
    got, want = decode_rgb(out), decode_rgb(src)
    assert min(psnr(g[:181, :321], w) for g, w in zip(got, want)) > 36
    assert all(np.abs(g[:, 321].astype(int) - g[:, 320]).mean() < 3 for g in got)
    assert any("odd frame size 321x181" in n for n in r["notes"])


@pytest.mark.parametrize("codec,pix_fmt", [("ffv1", "yuv422p10le"), ("mjpeg", "yuvj420p")])
def test_full_range_sources_stay_full_range_and_say_so(tmp_path, codec, pix_fmt):
    """A full-range source in another layout (10-bit 4:2:2 from a camera, a motion-JPEG yuvj
    clip) is converted to yuv420p with its full-range values, so the output must be tagged full
    range too: untagged, players read it as limited range and crush blacks and whites (before the
    fix: 26.5-26.8 dB against the source, mean brightness 4-5 levels up)."""
    src = tmp_path / "full.mkv"
    frames = decode_rgb(VIDEOS / "selfie_mp3audio.mp4", limit=8)
    write_clip(src, frames, codec, pix_fmt, color_range=2)
    assert probe(src)["color"][3] == 2
    run_json("submit", src, "--task", "identity", "--preset", "veryfast", "--crf", "12")
    out = tmp_path / "full.identity.mkv"
    assert probe(out)["color"][3] == 2
    got, want = decode_rgb(out), decode_rgb(src)
    assert len(got) == 8
    assert min(psnr(g, w) for g, w in zip(got, want)) > 36
    # as a player shows it: the source's mean brightness (swscale's rounding aside)
    assert abs(np.mean(got) - np.mean(want)) < 2.0


def test_faces_are_read_and_written_back_in_the_clips_own_colour_matrix():
    """Faces reach the detector and the network as a player shows them: a BT.709 clip (the
    HEVC .mov says so; the 1080p clip says nothing, and HD means BT.709) read with BT.601's
    matrix, OpenCV's, is off by 1-2 levels in mean colour and up to 8 on saturated pixels. The
    reference is FFmpeg's own exact conversion with the clip's matrix. A change written back goes
    through the same matrix, so it reads back as the RGB change it was."""
    from av.video.reformatter import Interpolation as I

    from pipeline.media import BT601, BT709, add_rgb_delta, i420_to_rgb, iter_frames, plan

    exact = I.POINT | I.ACCURATE_RND | I.FULL_CHR_H_INT | I.BITEXACT
    for name, expected in (("face_then_noface_hevc.mov", BT709), ("walking_1080p.mp4", BT709),
                           ("closeup_pexels.mp4", BT601)):
        vp = plan(VIDEOS / name)
        assert vp.yuv_matrix == expected, name
        _, yuv = next(iter_frames(vp, 0, 1))
        with av.open(str(VIDEOS / name)) as c:
            frame = next(c.decode(video=0))
        ref = frame.reformat(format="rgb24", interpolation=exact,
                             src_colorspace="ITU709" if expected == BT709 else "ITU601")
        ref = ref.to_ndarray().astype(np.float64)
        ours = i420_to_rgb(yuv, vp.yuv_matrix).astype(np.float64)
        assert np.abs((ours - ref).mean((0, 1))).max() < 0.3, name
        assert np.abs(ours - ref).mean() < 0.5, name
        if expected == BT709:  # what reading it as BT.601 gave
            wrong = i420_to_rgb(yuv, BT601).astype(np.float64)
            assert np.abs((wrong - ref).mean((0, 1))).max() > 0.9, name

        before = yuv.copy()
        rect = (200, 100, 264, 164)
        delta = np.float32([-10, 6, 14]) + np.random.default_rng(0).normal(0, 3, (64, 64, 3))
        add_rgb_delta(yuv, rect, delta.astype(np.float32), vp.yuv_matrix)
        x0, y0, x1, y1 = rect
        change = (i420_to_rgb(yuv, vp.yuv_matrix).astype(np.float64)
                  - i420_to_rgb(before, vp.yuv_matrix))[y0:y1, x0:x1].mean((0, 1))
        # written with BT.601 and read as BT.709 this was (-12.1, 5.2, 15.0)
        assert np.allclose(change, delta.mean((0, 1)), atol=0.4), (name, change)
        H = vp.out_height
        outside = np.ones(yuv[:H].shape, bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(yuv[:H][outside], before[:H][outside])


def test_full_range_and_other_matrices_round_trip():
    """A clip tagged full range (phones' yuv420p with color_range 2) and BT.2020 / SMPTE 240M /
    FCC matrices: RGB written as I420 with a matrix reads back within a level with it."""
    from pipeline.media import yuv_matrix, i420_to_rgb

    rng = np.random.default_rng(0)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (90, 160, 3)), 2, 0), 2, 1).astype(np.float32)
    for color, height, name in (({"colorspace": 1, "color_range": 2}, 1080, "bt709-full"),
                                ({"colorspace": 2}, 480, "bt601"), ({"colorspace": 9}, 2160, "bt2020"),
                                ({"colorspace": 7}, 480, "smpte240m"), ({"colorspace": 4}, 480, "fcc"),
                                ({"colorspace": 5, "color_range": 2}, 480, "bt601-full")):
        m = yuv_matrix(color, height)
        assert m.name == name
        offset = np.float32([0 if m.full_range else 16, 128, 128])
        yuv444 = rgb @ m.rgb_to_yuv().T + offset
        assert yuv444.min() > -0.5 and yuv444.max() < 255.5
        yuv444 = np.rint(yuv444).astype(np.uint8)
        i420 = np.concatenate([yuv444[..., 0], yuv444[::2, ::2, 1].reshape(-1, 320),
                               yuv444[::2, ::2, 2].reshape(-1, 320)])
        back = i420_to_rgb(i420, m).astype(np.float32)
        assert np.abs(back - rgb).max() <= 2.0, name
        assert np.abs(back - rgb).mean() < 0.8, name


def test_a_clip_whose_height_is_not_a_multiple_of_4_gets_its_faces_restored(tmp_path):
    """I420 packs the chroma planes one after the other: at 480 x 270 a chroma plane ends in the
    middle of a row of the frame array, and writing a face back used to fail there (as it did for
    odd sizes padded to such a height). A real face clip scaled to 480 x 270, restored."""
    src = tmp_path / "small.mp4"
    frames = decode_rgb(VIDEOS / "selfie_mp3audio.mp4", limit=10)
    write_clip(src, [cv2.resize(f, (480, 270), interpolation=cv2.INTER_AREA) for f in frames],
               "libx264", "yuv420p")
    r = run_json("submit", src, "--task", "denoise", "--preset", "veryfast")
    out = tmp_path / "small.denoise.mp4"
    assert probe(out)["frames"] == 10 and (probe(out)["width"], probe(out)["height"]) == (480, 270)
    assert r["faces"] >= 10
    got, was = decode_rgb(out), decode_rgb(src)
    assert any(np.abs(g.astype(int) - w).max() > 10 for g, w in zip(got, was))  # faces changed


def test_cancel_leaves_nothing(tmp_path):
    from pipeline.errors import Cancelled
    from pipeline.job import Hooks, JobOptions, run_job

    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "c.mp4", 3.0)
    opts = JobOptions(task="identity", preset="ultrafast")
    with pytest.raises(Cancelled):
        run_job(src, opts, Hooks(cancelled=lambda: True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]


class _Recorder:
    """An identity restorer that keeps the faces it is given, frame by frame."""

    def __init__(self) -> None:
        self.faces: list = []
        self.aspects: set = set()

    def deltas(self, images, faces, frames=None, aspect=1.0):
        self.faces += [list(fs) for fs in faces]
        self.aspects.add(aspect)
        return [[] for _ in images]


def _process(src, out, **kw):
    from pipeline.faces import FaceDetector
    from pipeline.media import EncoderSettings, plan
    from pipeline.video import process_range

    rec = _Recorder()
    stats = process_range(plan(src), out, detector=kw.pop("detector", None) or FaceDetector(), restorer=rec,
                          settings=EncoderSettings(preset="ultrafast"), **kw)
    return stats, rec


def test_an_anamorphic_clips_faces_are_restored_as_shown(tmp_path):
    """A 16:9 PAL DVD stores its frames 720 px wide, each pixel 64:45 wide on screen, so its faces
    are stored squeezed: the restorer is told the pixel aspect ratio (an aligned crop then shows
    the face in its true shape; ``test_units``), and a square-pixel clip's is 1."""
    from fractions import Fraction

    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "c.mp4", 0.5)
    dvd = tmp_path / "dvd.mpg"
    with av.open(str(src)) as i, av.open(str(dvd), "w") as o:
        s = o.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt, s.bit_rate = 448, 360, "yuv420p", 8_000_000
        s.codec_context.sample_aspect_ratio = Fraction(64, 45)  # 448 x 64/45 = 637 px shown
        for f in i.decode(video=0):
            o.mux(s.encode(f.reformat(width=448, height=360)))
        o.mux(s.encode())
    _, rec = _process(dvd, tmp_path / "o.mp4")
    assert len(rec.aspects) == 1 and abs(rec.aspects.pop() - 64 / 45) < 0.1
    assert sum(map(len, rec.faces)) > 0  # the squeezed face was found
    _, rec = _process(src, tmp_path / "o2.mp4")
    assert rec.aspects == {1.0}


def test_threaded_io_keeps_order_count_and_pixels(tmp_path):
    """Decode and encode threads (io_queue) write the same frames, in order, as one thread."""
    from fractions import Fraction

    from pipeline.media import plan

    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "c.mp4", 3.0)
    frames = {}
    for q in (0, 8):
        out = tmp_path / f"q{q}.mp4"
        stats, _ = _process(src, out, start=10, stop=61, io_queue=q, detect_every=3)
        assert stats.frames == 51
        with av.open(str(out)) as c:
            times = [float(f.pts * f.time_base) for f in c.decode(video=0)]
        vplan = plan(src)
        tb = Fraction(vplan.time_base)
        # every frame of the range once, in order, at its source time
        assert times == pytest.approx([float(p * tb) for p in vplan.pts[10:61]], abs=1e-3)
        frames[q] = decode_rgb(out)
    assert all(np.array_equal(a, b) for a, b in zip(frames[0], frames[8]))


def test_threaded_io_raises_decoder_and_encoder_errors(tmp_path, monkeypatch):
    import threading

    import pipeline.video as video
    from pipeline.errors import CorruptInput

    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "c.mp4", 3.0)
    real = video.iter_frames
    before = threading.active_count()

    def broken(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 20:
                raise CorruptInput("decoder gave up")
            yield item

    monkeypatch.setattr(video, "iter_frames", broken)
    with pytest.raises(CorruptInput, match="decoder gave up"):
        _process(src, tmp_path / "d.mp4", io_queue=4)
    monkeypatch.setattr(video, "iter_frames", real)

    def write(self, index, yuv):
        if index == 12:
            raise OSError("disk full")
        self.frames += 1

    monkeypatch.setattr(video.VideoEncoder, "write", write)
    with pytest.raises(OSError, match="disk full"):
        _process(src, tmp_path / "e.mp4", io_queue=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]  # no part, no partial
    assert threading.active_count() == before  # the decode and encode threads ended


def test_detect_every_3_restores_the_faces_per_frame_detection_does(tmp_path):
    """The default detect_every (3) hands the restorer the faces that detecting every frame
    does: same faces per frame (new and vanishing faces included), boxes close."""
    from bench.detect_quality import compare
    from pipeline.faces import FaceDetector
    from pipeline.job import JobOptions

    assert JobOptions().detect_every == 3
    src = VIDEOS / "walking_1080p.mp4"
    det = FaceDetector()
    s1, every1 = _process(src, tmp_path / "k1.mp4", stop=40, detect_every=1, detector=det)
    s3, every3 = _process(src, tmp_path / "k3.mp4", stop=40, detect_every=3, detector=det)
    assert s1.frames == s3.frames == 40 and s3.detected < 0.75 * s1.detected
    assert s3.searched > 0  # faces come and go in this crowd: frames searched around them
    ref = [[f for f in fs] for fs in every1.faces]
    got = [[f for f in fs] for fs in every3.faces]
    q = compare(ref, got, detected=set())
    assert q["recall"] >= 0.98 and q["precision"] >= 0.98 and q["tracks_found"] == 1.0, q
    assert q["iou_mean"] >= 0.85 and q["lm_nme_mean"] <= 0.06, q


def test_detect_every_3_segments_see_the_faces_of_one_pass(tmp_path):
    """With detect_every 3, two segments hand the restorer the landmarks one pass does."""
    from pipeline.faces import FaceDetector

    src = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "c.mp4", 3.0)
    det = FaceDetector()

    def run(ranges):
        seen = []
        for a, b in ranges:
            _, rec = _process(src, tmp_path / f"p{a}-{b}.mp4", start=a, stop=b, detect_every=3, detector=det)
            seen += [np.array([f.landmarks for f in fs]) for fs in rec.faces]
        return seen

    one, two = run([(0, 50)]), run([(0, 25), (25, 50)])
    assert len(one) == len(two) == 50
    for i, (a, b) in enumerate(zip(one, two)):
        assert a.shape == b.shape, f"frame {i}: {len(a)} faces in one pass, {len(b)} in segments"
        assert np.abs(a - b).max() < 0.5, f"frame {i}: landmarks moved by {np.abs(a - b).max():.2f} px"


def test_the_throughput_bench_reports_the_median_of_its_rounds(capsys):
    """``bench.throughput --rounds N``: the transcode and the pipeline run N times in turn; each
    fps and ratio reported is the median over the rounds, every round's figures are kept."""
    import json
    import statistics

    from conftest import VIDEOS

    from bench.throughput import main

    assert main(["--input", str(VIDEOS / "selfie_mp3audio.mp4"), "--frames", "12", "--rounds", "3",
                 "--skip", "naive,restore,networks,crop,fast", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rounds = res["rounds"]
    assert len(rounds) == 3 and all(r["fps"]["pipeline"] > 0 and r["fps"]["transcode"] > 0 for r in rounds)
    for key in ("pipeline", "transcode"):
        assert res["fps"][key] == round(statistics.median(r["fps"][key] for r in rounds), 3)
    ratio = "pipeline_over_transcode"
    assert res["ratios"][ratio] == round(statistics.median(r["ratios"][ratio] for r in rounds), 3)
    assert res["faces"]["pipeline"] >= 12 and res["stages"]["pipeline"]["detect"] > 0
