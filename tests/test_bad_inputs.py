"""Awkward inputs and outputs through the real CLI: a documented exit code, one error line naming
the file and the problem, no traceback, nothing half-written left behind, inputs unchanged."""
from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import cli


def run(capfd, *args) -> tuple[int, str, str]:
    """``cli.main`` in this process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def error_line(err: str, *words: str) -> str:
    """The one error line on stderr (captured at the file descriptor: a library's own output
    would show too), holding ``words``; anything else there is facemend's own log lines."""
    lines = [ln for ln in err.splitlines() if ln.startswith("facemend: error:")]
    assert len(lines) == 1, err
    assert all(ln.startswith("facemend: ") for ln in err.splitlines() if ln.strip()), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def no_error(err: str) -> None:
    assert "facemend: error:" not in err, err


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha1), to prove inputs are untouched."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders a job must never leave behind."""
    return [str(p) for p in root.rglob("*") if ".partial." in p.name or p.name.startswith(".facemend-")]


def write_image(path: Path, h: int, w: int, channels: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def write_video(path: Path, w: int, h: int, frames: int = 6, audio: str | None = None) -> Path:
    """A tiny synthetic clip (libx264), with a PCM or AAC audio track if asked."""
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as o:
        v = o.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        a = None
        if audio:
            a = o.add_stream(audio, rate=8000)
            a.layout = "mono"
        for i in range(frames):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                o.mux(p)
        if a is not None:
            fmt = "s16" if audio.startswith("pcm") else "fltp"
            n = 8000 * frames // 10
            samples = (np.sin(np.arange(n) / 5.0) * (3000 if fmt == "s16" else 0.1))
            samples = samples.astype(np.int16 if fmt == "s16" else np.float32)[None, :]
            step = 1024
            for k in range(0, n, step):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k:k + step]), format=fmt,
                                               layout="mono")
                f.sample_rate = 8000
                f.pts = k
                f.time_base = Fraction(1, 8000)
                for p in a.encode(f):
                    o.mux(p)
            for p in a.encode(None):
                o.mux(p)
        for p in v.encode(None):
            o.mux(p)
    return path


def grey_stream(o, codec: str, w: int = 64, h: int = 48, rate: int = 25, *, gop: int | None = None,
                b_frames: int | None = None, bit_rate: int | None = None, options: dict | None = None,
                sar: Fraction | None = None):
    """A yuv420p video stream added to the open output ``o``, set up as asked."""
    v = o.add_stream(codec, rate=rate)
    v.width, v.height, v.pix_fmt = w, h, "yuv420p"
    if gop is not None:
        v.gop_size = gop
    if b_frames is not None:
        v.codec_context.max_b_frames = b_frames
    if bit_rate is not None:
        v.bit_rate = bit_rate
    if options:
        v.options = options
    if sar is not None:
        v.codec_context.sample_aspect_ratio = sar
    return v


def grey_frames(o, v, frames: int, step: int) -> None:
    """Frames ``0..frames-1`` of stream ``v``, frame i all grey level ``step * i``, the encoder
    flushed: the order a decoder gives them can be read back from their means."""
    for i in range(frames):
        img = np.full((v.height, v.width, 3), step * i, np.uint8)
        for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            o.mux(p)
    for p in v.encode(None):
        o.mux(p)


# ---- 1. pictures too small to hold a face ----------------------------------------------------

def test_tiny_image_passes_through_unchanged(tmp_path, capfd, caplog):
    src = write_image(tmp_path / "in" / "thumb.png", 30, 24)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "thumb.out.png"
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--json")
    assert code == 0, err
    no_error(err)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["faces"] == 0
    assert any("thumb.png" in n and "smaller than the smallest face" in n for n in result["notes"])
    assert any("smaller than the smallest face" in r.getMessage() for r in caplog.records)
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), cv2.imread(str(src), cv2.IMREAD_UNCHANGED))
    assert snapshot(tmp_path / "in") == before
    assert leftovers(tmp_path) == []


def test_tiny_video_passes_through(tmp_path, capfd):
    src = write_video(tmp_path / "in" / "tiny.mp4", 32, 24, frames=5)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "tiny.out.mp4"
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--json")
    assert code == 0, err
    no_error(err)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["faces"] == 0 and result["frames"] == 5
    assert any("tiny.mp4" in n and "smaller than the smallest face" in n for n in result["notes"])
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
    assert snapshot(tmp_path / "in") == before
    assert leftovers(tmp_path) == []


def test_thumbnail_in_a_folder_does_not_stop_the_job(tmp_path, capfd):
    src = tmp_path / "photos"
    write_image(src / "a_big.png", 120, 160, seed=1)
    write_image(src / "b_thumb.jpg", 16, 16, seed=2)
    write_image(src / "sub" / "c_big.png", 90, 90, seed=3)
    before = snapshot(src)
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "--json")
    assert code == 0, err
    no_error(err)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["files"]["processed"] == 3 and result["files"]["failed"] == 0
    dst = tmp_path / "photos.identity"
    assert sorted(snapshot(dst)) == ["a_big.png", "b_thumb.jpg", "sub/c_big.png"]
    assert snapshot(src) == before
    assert leftovers(tmp_path) == []


# ---- 2. bad files inside a folder ------------------------------------------------------------

def test_bad_files_in_a_folder_are_listed_and_the_job_goes_on(tmp_path, capfd, monkeypatch):
    src = tmp_path / "photos"
    write_image(src / "a_good.png", 60, 80, seed=1)
    good = (src / "a_good.png").read_bytes()
    (src / "b_truncated.png").write_bytes(good[: len(good) // 2])
    (src / "c_garbage.jpg").write_bytes(os.urandom(700))
    (src / "d_empty.webp").write_bytes(b"")
    (src / "e_notes.mp4").write_text("not a video")
    clip = write_video(src / "f_corrupt.mp4", 64, 48, frames=20).read_bytes()
    mid = len(clip) // 3  # plans fine (the index is intact), fails while decoding
    (src / "f_corrupt.mp4").write_bytes(clip[:mid] + os.urandom(2000) + clip[mid + 2000 :])
    unreadable = write_image(src / "g_unreadable.png", 40, 40, seed=2)
    unreadable.chmod(0)  # root reads it anyway: simulate the EACCES a user gets
    real = np.fromfile

    def fromfile(file, *a, **k):
        if str(file) == str(unreadable):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *a, **k)

    monkeypatch.setattr(np, "fromfile", fromfile)
    write_image(src / "z_good.png", 60, 60, seed=3)
    before = snapshot(src)
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "--json")
    unreadable.chmod(0o644)
    assert code == 6, err
    no_error(err)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["files"] == {"processed": 2, "skipped": 0, "failed": 6}
    failed = [ln for ln in err.splitlines() if ln.startswith("failed: ")]
    bad = ["b_truncated.png", "c_garbage.jpg", "d_empty.webp", "e_notes.mp4", "f_corrupt.mp4",
           "g_unreadable.png"]
    assert len(failed) == len(bad)
    for name, line in zip(bad, failed):
        assert name in line, line
    assert "Permission denied" in failed[-1]
    dst = tmp_path / "photos.identity"
    assert sorted(snapshot(dst)) == ["a_good.png", "z_good.png"]
    assert snapshot(src) == before
    assert leftovers(tmp_path) == []


def test_an_unexpected_error_on_one_file_fails_that_file_only(tmp_path, capfd, monkeypatch):
    import pipeline.job

    src = tmp_path / "photos"
    write_image(src / "a.png", 60, 60, seed=1)
    write_image(src / "b.png", 60, 60, seed=2)
    real = pipeline.job.restore_image

    def restore_image(p, *a, **k):
        if p.name == "a.png":
            raise RuntimeError("something no check foresaw\nsecond line")
        return real(p, *a, **k)

    monkeypatch.setattr(pipeline.job, "restore_image", restore_image)
    code, stdout, err = run(capfd, "submit", src, "--task", "identity")
    assert code == 6, err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed: ")]
    assert failed == [f"failed: {src / 'a.png'}: cannot be processed (RuntimeError: something no check foresaw)"]
    assert "1 files" in stdout
    assert sorted(snapshot(tmp_path / "photos.identity")) == ["b.png"]


# ---- 3. outputs that cannot be written -------------------------------------------------------

def full_disk_at(path: Path) -> None:
    """Make writing ``path``'s temporary name hit a full disk: the name this process writes
    first becomes a link to /dev/full, where every write fails with ENOSPC."""
    from pipeline.media import partial_name

    partial_name(path).symlink_to("/dev/full")


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("case", ["parent is a file", "under a file", "not writable", "disk full"])
def test_unwritable_output(tmp_path, capfd, monkeypatch, kind, case):
    inp = tmp_path / "in"
    src = write_image(inp / "face.png", 48, 64) if kind == "image" else write_video(inp / "clip.mp4", 64, 48, 4)
    before = snapshot(inp)
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file, not a folder")
    name = src.with_suffix(".out" + src.suffix).name
    if case == "parent is a file":
        out, words = blocker / name, ("blocker.txt is a file",)
    elif case == "under a file":
        out, words = blocker / "deeper" / name, ("blocker.txt is a file",)
    elif case == "not writable":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)  # enough for a user; root passes it, so the check is simulated too
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == locked else real(p, m, **k))
        out, words = locked / name, ("locked", "permission denied")
    else:
        out, words = tmp_path / "out" / name, ("no space left",)
        out.parent.mkdir()
        full_disk_at(out)
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out)
    assert code == 4, err
    error_line(err, name, *words)
    assert not out.exists()
    assert snapshot(inp) == before
    assert leftovers(tmp_path) == []
    if case == "not writable":
        locked.chmod(0o755)


def test_full_disk_stops_a_folder_job(tmp_path, capfd):
    src = tmp_path / "photos"
    write_image(src / "a.png", 40, 50, seed=1)
    write_image(src / "b.png", 40, 50, seed=2)
    before = snapshot(src)
    dst = tmp_path / "photos.identity"
    dst.mkdir()
    full_disk_at(dst / "a.png")
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "--overwrite")
    assert code == 4, err
    error_line(err, "a.png", "no space left")
    assert not [ln for ln in err.splitlines() if ln.startswith("failed:")]
    assert list(dst.iterdir()) == []
    assert snapshot(src) == before


@pytest.mark.parametrize("src_name,out_name,words", [
    ("face.png", "face.xyz", ("an image is written as", ".xyz")),
    ("face.png", "face.mp4", ("an image is written as", ".mp4")),
    ("clip.mp4", "clip.jpg", ("a video is written as", ".jpg")),
    ("clip.mp4", "clip.xyz", ("a video is written as", ".xyz")),
    ("clip.mp4", "clip.avi", ("a video is written as", ".avi")),
    ("clip.mp4", "clip", ("a video is written as", "no extension")),
])
def test_unknown_output_extension(tmp_path, capfd, src_name, out_name, words):
    inp = tmp_path / "in"
    src = (write_image(inp / src_name, 40, 40) if src_name.endswith(".png")
           else write_video(inp / src_name, 64, 48, 3))
    before = snapshot(inp)
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", tmp_path / out_name)
    assert code == 4, err
    error_line(err, out_name, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert snapshot(inp) == before


def test_existing_folder_as_output_for_a_file(tmp_path, capfd):
    src = write_image(tmp_path / "in" / "face.png", 40, 40)
    folder = tmp_path / "results.png"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", folder, *extra)
        assert code == 4, err
        error_line(err, "results.png", "is a folder")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_queued_job_refuses_a_bad_output_at_submit(tmp_path, capfd):
    # nothing listens on the broker's port: exit 4 (not 7) shows the refusal comes first
    src = write_video(tmp_path / "clip.mp4", 64, 48, 3)
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("x")
    broker = "redis://127.0.0.1:1/0"
    for out, words in ((tmp_path / "clip.xyz", ("a video is written as",)),
                       (blocker / "clip.out.mp4", ("blocker.txt is a file",))):
        code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--broker", broker)
        assert code == 4, err
        error_line(err, out.name, *words)
        assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker.txt", "clip.mp4"]


# ---- 4. no temporary file left behind, whatever happens --------------------------------------

def test_avi_output_is_refused_before_any_work(tmp_path, capfd):
    src = write_video(tmp_path / "clip.mp4", 64, 48, 4, audio="aac")
    before = snapshot(tmp_path)
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", tmp_path / "out.avi")
    assert code == 4, err
    error_line(err, "out.avi", ".avi")
    assert snapshot(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_avi_input_is_written_as_mp4(tmp_path, capfd):
    src = write_video(tmp_path / "clip.avi", 64, 48, 4)
    code, stdout, err = run(capfd, "submit", src, "--task", "identity")
    assert code == 0, err
    assert (tmp_path / "clip.identity.mp4").exists()
    assert leftovers(tmp_path) == []


def test_avi_with_b_frames_keeps_every_frame_in_order(tmp_path, capfd):
    """AVI has no presentation times: with B-frames the decoder gives its frames decode-order
    numbers, out of order. Each frame here is one grey level, so the order can be read back."""
    from pipeline.media import i420_to_rgb, iter_frames, plan

    src = tmp_path / "grey.avi"
    with av.open(str(src), "w") as o:
        grey_frames(o, grey_stream(o, "libx264", rate=10, options={"g": "5", "bf": "2"}), 24, 8)
    code, _, err = run(capfd, "submit", src, "--task", "identity")
    assert code == 0, err
    with av.open(str(tmp_path / "grey.identity.mp4")) as c:
        levels = [round(float(f.to_ndarray(format="rgb24").mean()) / 8) for f in c.decode(video=0)]
    assert levels == list(range(24))
    vplan = plan(src)  # a queued segment starts after a seek: it counts from the keyframe
    got = [(i, round(float(i420_to_rgb(y).mean()) / 8)) for i, y in iter_frames(vplan, 7, 19)]
    assert got == [(i, i) for i in range(7, 19)]


def test_a_program_stream_whose_demuxer_repeats_a_frame_time_keeps_every_frame(tmp_path, capfd):
    """MPEG program streams carry a pts only on some packets and FFmpeg's demuxer guesses the
    rest: in this 40-frame MPEG-2 .mpg it gives one frame's pts twice and skips another. Frames
    are then counted out of the decoder: all 40 come back, in order, with the audio."""
    src = tmp_path / "camcorder.mpg"
    with av.open(str(src), "w") as o:
        v = grey_stream(o, "mpeg2video", bit_rate=2_000_000)
        a = o.add_stream("mp2", rate=48000)
        a.layout, done = "stereo", 0
        for i in range(40):  # each frame, then the audio up to its end
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * i, np.uint8), format="rgb24")):
                o.mux(p)
            while done < (i + 1) * 48000 // 25:
                f = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 1152), np.int16), format="s16", layout="stereo")
                f.sample_rate, f.pts = 48000, done
                done += 1152
                for p in a.encode(f):
                    o.mux(p)
        for p in [*v.encode(None), *a.encode(None)]:
            o.mux(p)
    with av.open(str(src)) as c:
        times = [p.pts for p in c.demux(video=0) if p.size]
    assert len(set(times)) < len(times)  # the case this test is about
    out = tmp_path / "out.mp4"
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", out)
    assert code == 0, err
    with av.open(str(out)) as c:
        levels = [float(f.to_ndarray(format="gray").mean()) for f in c.decode(video=0)]
    assert len(levels) == 40 and np.allclose(levels, [5 * i for i in range(40)], atol=3.0), levels
    with av.open(str(src)) as c, av.open(str(out)) as d:
        assert sum(1 for p in d.demux(audio=0) if p.size) == sum(1 for p in c.demux(audio=0) if p.size)


def test_a_concatenated_vob_is_refused_naming_the_restart(tmp_path, capfd):
    """``cat VTS_01_1.VOB VTS_01_2.VOB``: two program streams whose clocks both start at 0.5 s.
    Frames are placed by their timestamps, which now repeat: a one-line error names the file
    and the frame where time starts again (exit 3), and nothing is written. Each part alone
    is fine."""
    parts = []
    for k in range(2):
        parts.append(tmp_path / f"VTS_01_{k + 1}.VOB")
        with av.open(str(parts[-1]), "w", format="vob") as o:
            grey_frames(o, grey_stream(o, "mpeg2video", bit_rate=2_000_000, b_frames=2), 20, 10)
    src = tmp_path / "movie.vob"
    src.write_bytes(b"".join(p.read_bytes() for p in parts))
    before = snapshot(tmp_path)
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", tmp_path / "out.mp4")
    assert code == 3, err
    assert "timestamps restart at frame 20" in error_line(err, str(src), "concatenated")
    assert snapshot(tmp_path) == before
    code, _, err = run(capfd, "submit", parts[0], "--task", "identity", "-o", tmp_path / "one.mp4")
    assert code == 0, err


@pytest.mark.parametrize("name, vcodec, acodec", [("clip.flv", "flv", "mp3"), ("clip.vob", "mpeg2video", "ac3"),
                                                  ("clip.divx", "mpeg4", "mp3")])
def test_old_archive_containers_keep_every_frame_and_audio_packet(tmp_path, capfd, name, vcodec, acodec):
    """Flash video (its demuxer cannot seek back), a DVD's VOB and a DivX AVI with B-frames."""
    src = tmp_path / name
    with av.open(str(src), "w", format="avi" if name.endswith(".divx") else None) as o:
        # grey levels 10 apart stay readable at this rate
        v = grey_stream(o, vcodec, bit_rate=2_000_000, b_frames=None if vcodec == "flv" else 2)
        a = o.add_stream(acodec, rate=48000)
        a.layout = "stereo"
        grey_frames(o, v, 20, 10)
        fs = a.codec_context.frame_size
        for k in range(48000 * 20 // 25 // fs):
            t = np.arange(k * fs, (k + 1) * fs) / 48000.0
            s = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            f = av.AudioFrame.from_ndarray(np.stack([s, s]), format="fltp", layout="stereo")
            f.sample_rate, f.pts = 48000, k * fs
            for p in a.encode(f):
                o.mux(p)
        for p in a.encode(None):
            o.mux(p)

    def packets(path):
        with av.open(str(path)) as c:
            kinds = [p.stream.type for p in c.demux() if p.size]
        return kinds.count("video"), kinds.count("audio")

    code, _, err = run(capfd, "submit", src, "--task", "identity")
    assert code == 0, err
    out = tmp_path / f"{src.stem}.identity.mp4"
    assert packets(out) == packets(src) and packets(src)[1] > 0
    with av.open(str(out)) as c:
        levels = [round(float(f.to_ndarray(format="rgb24").mean()) / 10) for f in c.decode(video=0)]
    assert levels == list(range(20))


def _comb(gray: np.ndarray) -> float:
    """Interlace combing: how far each row is from the mean of the rows above and below it."""
    y = gray.astype(np.float32)
    return float(np.abs(y[1:-1] - 0.5 * (y[:-2] + y[2:])).mean())


def _combed_clip(src, codec: str, flagged: bool) -> float:
    """18 frames of a bar moving between the two fields of each frame (as a camera records
    them), encoded with its frames flagged interlaced (top field first) or not; the frames'
    mean combing."""
    h, w = 96, 128
    flags = {"flags": "+ildct+ilme", **({"top": "1"} if codec == "mpeg2video" else {"x264-params": "tff=1"})}
    with av.open(str(src), "w") as o:
        v = grey_stream(o, codec, w, h, gop=6, bit_rate=4_000_000, options=flags if flagged else {})
        for i in range(18):
            img = np.full((h, w, 3), 60, np.uint8)
            img[0::2, 6 * i:6 * i + 16] = 220  # top field
            img[1::2, 6 * i + 3:6 * i + 19] = 220  # bottom field, half a frame later
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                o.mux(p)
        for p in v.encode(None):
            o.mux(p)
    with av.open(str(src)) as c:
        return float(np.mean([_comb(f.to_ndarray(format="gray")) for f in c.decode(video=0)]))


def _output_combing(path) -> tuple[int, float]:
    with av.open(str(path)) as c:
        frames = [f for f in c.decode(video=0)]
    assert not any(f.interlaced_frame for f in frames)
    return len(frames), float(np.mean([_comb(f.to_ndarray(format="gray")) for f in frames]))


@pytest.mark.parametrize("codec, name", [("mpeg2video", "tape.mpg"), ("libx264", "tv.mp4")])
def test_interlaced_source_is_deinterlaced_frame_for_frame(tmp_path, capfd, codec, name):
    """A bar moving between the two fields of each frame (as a camera records them), encoded
    as interlaced: the output has every frame, progressive, without combing, and a queued
    segment starting on a keyframe gets the pixels a single pass gets."""
    from pipeline.media import iter_frames, plan

    src = tmp_path / name
    combed = _combed_clip(src, codec, flagged=True)
    vplan = plan(src)
    assert vplan.interlaced
    code, out, err = run(capfd, "submit", src, "--task", "identity", "--json")
    assert code == 0, err
    assert any("deinterlaced" in n for n in json.loads(out)["notes"])
    n, left = _output_combing(tmp_path / f"{src.stem}.identity.mp4")
    assert n == 18 and left < combed / 4
    single = [y for _, y in iter_frames(vplan)]
    for start in vplan.keyframes[1:]:
        assert all(np.array_equal(y, single[i]) for i, y in iter_frames(vplan, start, start + 4)), start


def test_deinterlace_option_for_sources_whose_flags_are_wrong(tmp_path, capfd):
    """--deinterlace all: a combed source whose interlace flags were lost is deinterlaced all the
    same (auto leaves it combed: nothing says it is interlaced); --deinterlace off: a source
    flagged interlaced is left as it is (progressive film flagged interlaced)."""
    lost = tmp_path / "lost.mp4"
    combed = _combed_clip(lost, "libx264", flagged=False)
    flagged = tmp_path / "flagged.mp4"
    combed_flagged = _combed_clip(flagged, "libx264", flagged=True)
    got = {}
    for src, mode in ((lost, "auto"), (lost, "all"), (flagged, "off")):
        dst = tmp_path / f"{src.stem}.{mode}.mp4"
        code, out, err = run(capfd, "submit", src, "--task", "identity", "--deinterlace", mode, "-o", dst, "--json")
        assert code == 0, err
        notes = json.loads(out)["notes"]
        got[src.stem, mode] = _output_combing(dst) + (notes,)
    n, left, notes = got["lost", "auto"]
    assert n == 18 and left > combed / 2 and not notes
    n, left, notes = got["lost", "all"]
    assert n == 18 and left < combed / 4 and any("every frame deinterlaced" in x for x in notes)
    n, left, notes = got["flagged", "off"]
    assert n == 18 and left > combed_flagged / 2 and not any("deinterlaced" in x for x in notes)


@pytest.mark.parametrize("out", ["clip.identity.mp4", "out.mkv", "out.mov"])
def test_anamorphic_source_keeps_its_pixel_aspect(tmp_path, capfd, out):
    """A 16:9 PAL DVD stores 720x576 pixels 64:45 wide: the output keeps the shape players show."""
    src = tmp_path / "clip.mpg"
    with av.open(str(src), "w") as o:
        grey_frames(o, grey_stream(o, "mpeg2video", 96, 64, sar=Fraction(64, 45)), 5, 40)
    with av.open(str(src)) as c:
        sar = c.streams.video[0].sample_aspect_ratio  # MPEG-2 codes the display shape: near 64:45
    assert abs(sar - Fraction(64, 45)) < 0.1
    args = [] if out.startswith("clip.") else ["-o", tmp_path / out]
    code, _, err = run(capfd, "submit", src, "--task", "identity", *args)
    assert code == 0, err
    with av.open(str(tmp_path / out)) as c:
        s = c.streams.video[0]
        assert (s.sample_aspect_ratio, sum(1 for _ in c.decode(s))) == (sar, 5)


@pytest.mark.parametrize("codec, ext", [("mpeg4", "mp4"), ("mpeg4", "avi"), ("mpeg2video", "mpg"),
                                        ("mpeg2video", "ts"), ("libx264", "mkv")])
def test_a_segment_after_a_seek_gets_the_frames_a_single_pass_gets(tmp_path, codec, ext):
    """B-frames and open GOPs (MPEG-4 ASP, MPEG-2) in containers that seek by decode time or by
    byte position: a queued segment starting anywhere decodes exactly its frames."""
    from pipeline.media import i420_to_rgb, iter_frames, plan

    src = tmp_path / f"grey.{ext}"
    with av.open(str(src), "w") as o:  # grey levels 5 apart stay readable at this rate
        grey_frames(o, grey_stream(o, codec, gop=12, b_frames=2, bit_rate=4_000_000), 48, 5)
    vplan = plan(src)
    assert vplan.frames == 48 and len(vplan.keyframes) > 2
    single = [y for _, y in iter_frames(vplan)]
    levels = [float(i420_to_rgb(y).mean()) / 5 for y in single]
    assert np.abs(np.array(levels) - np.arange(48)).max() < 0.5  # the single pass is in order
    for start in (5, 11, 12, 23, 30, 35, 47):
        got = list(iter_frames(vplan, start, start + 8))
        assert [i for i, _ in got] == list(range(start, min(48, start + 8))), start
        assert all(np.array_equal(y, single[i]) for i, y in got), start


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_join_stopped_halfway_leaves_nothing(tmp_path, capfd, monkeypatch, stop):
    import heapq

    import pipeline.media.remux

    real = heapq.merge

    def merge(*iters, **kw):  # a few packets are written, then the join is stopped
        for k, item in enumerate(real(*iters, **kw)):
            if k == 3:
                raise stop("stopped while joining")
            yield item

    monkeypatch.setattr(pipeline.media.remux.heapq, "merge", merge)
    src = write_video(tmp_path / "in" / "clip.mp4", 64, 48, 8, audio="aac")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out.mp4"
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", out)
    if stop is KeyboardInterrupt:
        assert code == 130 and err.strip().splitlines()[-1] == "facemend: interrupted", err
    else:
        assert code == 4, err
        error_line(err, "out.mp4", "stopped while joining")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert snapshot(tmp_path / "in") == before


# ---- 5. SIGTERM ------------------------------------------------------------------------------

def test_sigterm_stops_an_embedded_job_like_ctrl_c(tmp_path):
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    src = tmp_path / "closeup.mp4"
    shutil.copyfile(ROOT / "samples" / "closeup.mp4", src)
    before = snapshot(tmp_path)
    # detection on every frame, on the CPU: the job lasts long enough to be caught halfway
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "submit", str(src), "--task", "identity",
                             "--device", "cpu", "--detect-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        # progress has started once the encoder has written into the job's temporary folder
        deadline = time.monotonic() + 300
        while not any(p.stat().st_size for p in tmp_path.glob(".facemend-*/*") if p.is_file()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if "terminated" in ln] == ["facemend: terminated (SIGTERM)"]
    assert [ln for ln in err.splitlines() if ln.startswith("facemend: error")] == []
    assert snapshot(tmp_path) == before  # no output, no temporary folder, no partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closeup.mp4"]


@pytest.mark.parametrize("var, value", [("FACEMEND_ENGINE", "tensorrt"), ("FACEMEND_OPENVINO_PRECISION", "int4")])
def test_a_bad_engine_setting_is_a_settings_error_before_any_work(tmp_path, capfd, monkeypatch, var, value):
    src = write_image(tmp_path / "a.png", 80, 80)
    monkeypatch.delenv("FACEMEND_BROKER_URL", raising=False)
    monkeypatch.setenv(var, value)
    code, _, err = run(capfd, "submit", src, "--task", "denoise", "-o", tmp_path / "out.png")
    assert code == 2, err
    error_line(err, var, repr(value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


# ---- 6. special files ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip.mp4", "face.jpg"])
def test_fifo_input_is_refused_without_opening_it(tmp_path, name):
    import subprocess
    import sys

    from conftest import ROOT

    fifo = tmp_path / name
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", str(fifo), "--task", "identity"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    error_line(proc.stderr, name, "named pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_fifo_as_the_morph_target_is_refused(tmp_path, capfd):
    src = write_image(tmp_path / "a.png", 40, 40)
    os.mkfifo(tmp_path / "b.png")
    code, _, err = run(capfd, "submit", src, "--task", "morph", "--to", tmp_path / "b.png")
    assert code == 3, err
    error_line(err, "b.png", "named pipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_device_linked_as_input_is_refused(tmp_path, capfd):
    link = tmp_path / "null.mp4"
    link.symlink_to("/dev/null")
    code, _, err = run(capfd, "submit", link, "--task", "identity")
    assert code == 3, err
    error_line(err, "null.mp4", "character device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null.mp4"]


def test_fifo_in_a_folder_is_skipped(tmp_path, capfd):
    src = tmp_path / "photos"
    write_image(src / "a.png", 40, 40)
    os.mkfifo(src / "b.jpg")
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["files"]["processed"] == 1
    assert [s["file"] for s in result["skipped"]] == [str(src / "b.jpg")]
    assert "named pipe" in result["skipped"][0]["reason"]
    assert sorted(p.name for p in (tmp_path / "photos.identity").iterdir()) == ["a.png"]


# ---- 7. what a format cannot hold is said, or kept ------------------------------------------

def notes_of(stdout: str) -> list[str]:
    return json.loads(stdout.strip().splitlines()[-1])["notes"]


def test_rgba_png_written_as_jpeg_says_the_transparency_is_dropped(tmp_path, capfd, caplog):
    img = np.random.default_rng(0).integers(0, 256, (40, 48, 4), dtype=np.uint8)
    img[:10, :, 3] = 0  # a transparent band
    src = tmp_path / "logo.png"
    cv2.imwrite(str(src), img)
    out = tmp_path / "logo.jpg"
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--json")
    assert code == 0, err
    notes = [n for n in notes_of(stdout) if "transparency" in n]
    assert notes == [f"{out}: JPEG has no alpha channel; the transparency is dropped"]
    assert any(r.levelname == "WARNING" and "transparency" in r.getMessage() for r in caplog.records)
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).shape == (40, 48, 3)
    # an opaque alpha channel loses nothing: no note
    img[..., 3] = 255
    cv2.imwrite(str(src), img)
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--overwrite", "--json")
    assert code == 0 and not [n for n in notes_of(stdout) if "transparency" in n]


def test_16_bit_written_as_jpeg_is_scaled_and_said(tmp_path, capfd):
    img = np.full((40, 40, 3), 40000, np.uint16)
    src = tmp_path / "scan.png"
    cv2.imwrite(str(src), img)
    out = tmp_path / "scan.jpg"
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--json")
    assert code == 0, err
    assert [n for n in notes_of(stdout) if "16-bit" in n] == [
        f"{out}: .jpg holds 8 bits per channel; 16-bit pixels are reduced to 8 bits"]
    assert abs(float(cv2.imread(str(out)).mean()) - 40000 / 257) < 2  # scaled, not clipped to white


def test_multi_page_tiff_says_the_other_pages_are_dropped(tmp_path, capfd):
    from PIL import Image

    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    src = tmp_path / "in" / "scan.tif"
    src.parent.mkdir()
    pages[0].save(src, save_all=True, append_images=pages[1:])
    before = snapshot(src.parent)
    out = tmp_path / "scan.out.tif"
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--json")
    assert code == 0, err
    assert [n for n in notes_of(stdout) if "pages" in n] == [
        f"{src}: has 3 pages; only the first is restored and written, the other 2 are dropped"]
    assert snapshot(src.parent) == before


@pytest.mark.parametrize("out_name,codec", [("out.mp4", "aac"), ("out.mov", "aac"), ("out.mkv", "pcm_s16le")])
def test_pcm_audio_is_aac_in_mp4_and_kept_in_mkv(tmp_path, capfd, out_name, codec):
    src = write_video(tmp_path / "in" / "clip.mov", 64, 48, 10, audio="pcm_s16le")
    before = snapshot(tmp_path / "in")
    out = tmp_path / out_name
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "-o", out, "--json")
    assert code == 0, err
    with av.open(str(out)) as c:
        assert [s.codec_context.name for s in c.streams.audio] == [codec]
        samples = sum(f.samples for f in c.decode(c.streams.audio[0]))
    assert samples >= 8000  # one second of sound, none lost (AAC adds its priming samples)
    reencoded = [n for n in notes_of(stdout) if n.startswith("re-encoded")]
    assert reencoded == (["re-encoded audio #1 (pcm_s16le -> aac)"] if codec == "aac" else [])
    assert snapshot(tmp_path / "in") == before
    assert leftovers(tmp_path) == []


def test_aac_audio_is_still_copied(tmp_path, capfd):
    src = write_video(tmp_path / "clip.mp4", 64, 48, 10, audio="aac")
    code, stdout, err = run(capfd, "submit", src, "--task", "identity", "--json")
    assert code == 0, err
    assert not [n for n in notes_of(stdout) if n.startswith("re-encoded")]
    with av.open(str(src)) as a, av.open(str(tmp_path / "clip.identity.mp4")) as b:
        assert [bytes(p) for p in a.demux(audio=0) if p.size] == [bytes(p) for p in b.demux(audio=0) if p.size]


# ---- 8. storage roots, on the real path ------------------------------------------------------

@pytest.fixture
def storage(tmp_path, monkeypatch):
    """A shared storage root and a folder outside it; FACEMEND_STORAGE_ROOTS set to the root."""
    root, away = tmp_path / "shared", tmp_path / "elsewhere"
    root.mkdir()
    away.mkdir()
    monkeypatch.setenv("FACEMEND_STORAGE_ROOTS", str(root))
    monkeypatch.delenv("FACEMEND_BROKER_URL", raising=False)
    return root, away


def test_embedded_job_refuses_a_link_out_of_the_storage(storage, capfd):
    root, away = storage
    secret = write_image(away / "secret.png", 40, 40)
    link = root / "innocent.png"
    link.symlink_to(secret)
    code, _, err = run(capfd, "submit", link, "--task", "identity")
    assert code == 3, err
    error_line(err, "innocent.png", "outside the shared storage", f"resolves to {secret}")
    code, _, err = run(capfd, "submit", secret, "--task", "identity", "-o", root / "copy.png")
    assert code == 3, err
    error_line(err, "secret.png", "outside the shared storage")
    inside = write_image(root / "mine.png", 40, 40)
    (root / "out").symlink_to(away, target_is_directory=True)
    code, _, err = run(capfd, "submit", inside, "--task", "identity", "-o", root / "out" / "mine.png")
    assert code == 4, err
    error_line(err, "mine.png", "outside the shared storage")
    code, _, err = run(capfd, "submit", inside, "--task", "identity", "--preview", away / "sheet.png")
    assert code == 4, err
    error_line(err, "sheet.png", "outside the shared storage")
    assert sorted(p.name for p in root.iterdir()) == ["innocent.png", "mine.png", "out"]
    assert sorted(p.name for p in away.iterdir()) == ["secret.png"]


def test_embedded_folder_job_fails_a_link_out_of_the_storage(storage, capfd):
    root, away = storage
    write_image(away / "secret.png", 40, 40)
    src = root / "photos"
    write_image(src / "a.png", 40, 40)
    (src / "b.png").symlink_to(away / "secret.png")
    code, _, err = run(capfd, "submit", src, "--task", "identity")
    assert code == 6, err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and "b.png" in failed[0] and "outside the shared storage" in failed[0]
    assert sorted(p.name for p in (root / "photos.identity").iterdir()) == ["a.png"]


# ---- queued: a real worker on a Redis database of these tests' own ---------------------------

QUEUE_REDIS = os.environ.get("FACEMEND_TEST_REDIS_BAD_INPUTS", "redis://127.0.0.1:6379/12")


def queue_env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FACEMEND_")}
    e.update(FACEMEND_BROKER_URL=QUEUE_REDIS, FACEMEND_PRELOAD_TASKS="identity", FACEMEND_TORCH_THREADS="1",
             FACEMEND_PROGRESS_INTERVAL="0.2", PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


@pytest.fixture
def queue_db():
    import redis

    r = redis.Redis.from_url(QUEUE_REDIS)
    try:
        r.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis at {QUEUE_REDIS} is not reachable ({e})")
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def start_worker(queue_db, tmp_path):
    """start_worker(**env): a ``cli.py worker`` process (killed with its group afterwards)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    procs = []

    def start(**extra):
        log_path = tmp_path / f"worker{len(procs)}.log"
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "-n", f"w{len(procs)}@%h", "-c", "1"],
                                cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                env=queue_env(**extra), start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 180
        while "models loaded" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def queued(capfd, monkeypatch, *args) -> tuple[int, str, str]:
    """The CLI in this process against the tests' Redis database."""
    monkeypatch.setenv("FACEMEND_BROKER_URL", QUEUE_REDIS)
    return run(capfd, *args)


def test_worker_checks_storage_roots_on_real_paths(tmp_path, capfd, monkeypatch, start_worker):
    root, away = tmp_path / "shared", tmp_path / "elsewhere"
    write_image(away / "secret.png", 40, 40)
    src = root / "photos"
    write_image(src / "a.png", 40, 40)
    (src / "b.png").symlink_to(away / "secret.png")
    start_worker(FACEMEND_STORAGE_ROOTS=root, FACEMEND_CHUNK_FILES=1)
    # the worker judges each file of a folder where it really is: the link fails, alone
    monkeypatch.delenv("FACEMEND_STORAGE_ROOTS", raising=False)
    code, out, err = queued(capfd, monkeypatch, "submit", src, "--task", "identity", "--wait", "-q")
    assert code == 6, out + err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 1 and "b.png" in failed[0] and "outside the shared storage" in failed[0], err
    assert sorted(p.name for p in (root / "photos.identity").iterdir()) == ["a.png"]
    # a job submitted from a machine without the setting is refused by the worker's plan
    code, out, err = queued(capfd, monkeypatch, "submit", away / "secret.png", "--task", "identity",
                            "-o", root / "copy.png", "--wait", "-q")
    assert code == 3, out + err
    assert "outside the shared storage" in out
    error_line(err, "secret.png", "outside the shared storage")
    assert not (root / "copy.png").exists()


# ---- 9. a cancelled folder job takes back what it wrote ---------------------------------------

def test_cancelled_folder_job_removes_the_files_it_wrote(tmp_path, capfd, monkeypatch, start_worker, queue_db):
    import time

    src = tmp_path / "photos"
    for i in range(24):
        write_image(src / f"sub{i % 2}" / f"p{i:02d}.png", 360, 480, seed=i)
    before = snapshot(src)
    dst = tmp_path / "photos.identity"
    start_worker(FACEMEND_CHUNK_FILES=1)
    code, out, err = queued(capfd, monkeypatch, "submit", src, "--task", "identity", "--device", "cpu")
    assert code == 0, err
    job_id = out.strip()
    deadline = time.monotonic() + 180
    while len(list(dst.rglob("*.png"))) < 2:
        assert time.monotonic() < deadline, "no file written"
        time.sleep(0.05)
    code, out, err = queued(capfd, monkeypatch, "cancel", job_id)
    assert code == 0 and "CANCELLED" in out, out + err

    def running() -> bool:
        parts = queue_db.hgetall(f"facemend:job:{job_id}:parts")
        return any(k.endswith(b".state") and v == b"RUNNING" for k, v in parts.items())

    while running():  # the chunk being written when the cancel came stops after that file
        assert time.monotonic() < deadline, "a chunk never stopped"
        time.sleep(0.1)
    assert not dst.exists(), sorted(map(str, dst.rglob("*")))
    assert snapshot(src) == before
    assert leftovers(tmp_path) == []
    code, out, err = queued(capfd, monkeypatch, "wait", job_id)
    assert code == 5, out + err


def test_queued_folder_with_bad_files_lists_them_and_exits_6(tmp_path, capfd, monkeypatch, start_worker):
    src = tmp_path / "photos"
    write_image(src / "a.png", 40, 50, seed=1)
    good = (src / "a.png").read_bytes()
    (src / "b_truncated.png").write_bytes(good[: len(good) // 2])
    (src / "c_notes.mp4").write_text("not a video")
    write_image(src / "d_thumb.png", 12, 12, seed=2)
    before = snapshot(src)
    start_worker(FACEMEND_CHUNK_FILES=2)
    code, out, err = queued(capfd, monkeypatch, "submit", src, "--task", "identity", "--wait", "--json")
    assert code == 6, out + err
    failed = [ln for ln in err.splitlines() if ln.startswith("failed: ")]
    assert [("b_truncated.png" in f, "c_notes.mp4" in f) for f in sorted(failed)] == [(True, False), (False, True)]
    job = json.loads(out.strip().splitlines()[-1])
    assert job["summary"]["processed"] == 2 and job["summary"]["failed"] == 2
    assert [n for n in job["summary"]["notes"] if "d_thumb.png" in n and "smaller than" in n]
    assert sorted(p.name for p in (tmp_path / "photos.identity").iterdir()) == ["a.png", "d_thumb.png"]
    assert snapshot(src) == before
    assert leftovers(tmp_path) == []


def test_truncated_png_is_one_line_on_stderr_and_nothing_else(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    whole = write_image(tmp_path / "whole.png", 60, 80).read_bytes()
    src = tmp_path / "cut.png"
    src.write_bytes(whole[: len(whole) // 2])
    (tmp_path / "whole.png").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "submit", str(src), "--task", "identity"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [f"facemend: error: {src}: truncated PNG (its end is missing)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.png"]


def test_read_only_output_folder(tmp_path, capfd):
    """A real read-only file system (a read-only bind mount; needs the right to mount, as root
    in a container has): refused before any work, and the write-time mapping says the same."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    bound = subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here ({bound.stderr.decode().strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        src = write_image(tmp_path / "in" / "face.png", 40, 40)
        before = snapshot(tmp_path / "in")
        code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", ro / "face.png")
        assert code == 4, err
        error_line(err, "face.png", "read-only file system")
        from pipeline.images import write_image as write_image_file

        with pytest.raises(Exception) as e:  # past the check: the OSError is mapped to one line
            write_image_file(ro / "x.png", np.zeros((4, 4, 3), np.uint8), src)
        assert type(e.value).__name__ == "OutputUnwritable" and "read-only file system" in str(e.value)
        assert list(ro.iterdir()) == []
        assert snapshot(tmp_path / "in") == before
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_generate_refuses_an_unwritable_output_before_loading_anything(tmp_path, capfd):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("x")
    code, _, err = run(capfd, "generate", "--count", "1", "-o", blocker / "grid.png")
    assert code == 4, err
    error_line(err, "grid.png", "blocker.txt is a file")
    (tmp_path / "grids.png").mkdir()
    code, _, err = run(capfd, "generate", "--count", "1", "-o", tmp_path / "grids.png", "--overwrite")
    assert code == 4, err
    error_line(err, "grids.png", "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker.txt", "grids.png"]


def test_unreadable_subfolder_is_said_not_ignored(tmp_path, capfd, monkeypatch, caplog):
    src = tmp_path / "photos"
    write_image(src / "a.png", 40, 40)
    write_image(src / "locked" / "b.png", 40, 40)
    (src / "locked").chmod(0)  # root lists it anyway: simulate the EACCES a user gets
    real = os.scandir

    def scandir(path="."):
        if Path(path) == src / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    try:
        code, stdout, err = run(capfd, "submit", src, "--task", "identity", "--json")
    finally:
        (src / "locked").chmod(0o755)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["skipped"] == [{"file": str(src / "locked"), "reason": "folder cannot be read (Permission denied)"}]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "locked" in r.getMessage()]
    assert said == [f"{src / 'locked'}: skipped (folder cannot be read (Permission denied))"]


def test_an_output_name_near_the_length_limit_is_written(tmp_path, capfd):
    src = write_image(tmp_path / "in" / "face.png", 40, 40)
    out = tmp_path / ("é" * 100 + "x" * 50 + ".png")  # 254 bytes: legal, its temporary name too
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", out)
    assert code == 0, err
    assert out.is_file() and leftovers(tmp_path) == []
    too_long = tmp_path / ("x" * 256 + ".png")
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", too_long)
    assert code == 4, err
    error_line(err, "xxxx.png", "file name too long")
    code, _, err = run(capfd, "submit", too_long, "--task", "identity")
    assert code == 2, err
    error_line(err, "xxxx.png", "file name too long")
    assert leftovers(tmp_path) == []


def test_damaged_jpeg_is_processed_and_the_codec_complaint_names_the_file(tmp_path, capfd, caplog):
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = bytearray(buf.tobytes())
    data[800:900] = bytes(100)  # damaged entropy-coded data: libjpeg decodes it and complains
    src = tmp_path / "damaged.jpg"
    src.write_bytes(bytes(data))
    code, _, err = run(capfd, "submit", src, "--task", "identity")
    assert code == 0, err
    assert "Corrupt JPEG data" not in err  # not libjpeg's own line on stderr, naming no file ...
    said = [r.getMessage() for r in caplog.records if "Corrupt JPEG data" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{src}: ")  # ... but one naming it
    assert (tmp_path / "damaged.identity.jpg").is_file()


@pytest.mark.parametrize("which", ["input", "output"])
def test_a_folder_that_may_not_be_searched(tmp_path, capfd, monkeypatch, which):
    """A path under a folder the user may not search (no x permission): ``Path.exists`` raises
    EACCES there instead of answering. Root searches anything, so the EACCES is simulated."""
    closed = tmp_path / "closed"
    src = write_image((closed if which == "input" else tmp_path) / "face.png", 40, 40)
    out = (tmp_path if which == "input" else closed) / "out.png"
    real = os.stat

    def stat(path, *a, **k):
        if Path(path) != closed and Path(path).is_relative_to(closed):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    code, _, err = run(capfd, "submit", src, "--task", "identity", "-o", out)
    monkeypatch.undo()
    if which == "input":
        assert code == 3, err
        error_line(err, "face.png", "cannot be read", "Permission denied")
    else:
        assert code == 4, err
        error_line(err, "out.png", "permission denied")
    assert leftovers(tmp_path) == [] and not out.exists()
