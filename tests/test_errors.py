"""Bad input: a one-line error naming the file, a documented exit code, nothing at the output."""
from __future__ import annotations

import av

from conftest import SCENES, VIDEOS, run_cli


def assert_refused(proc, code: int, name: str, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("facemend: error:")]
    assert len(lines) == 1, proc.stderr
    assert name in lines[0]
    for w in words:
        assert w in lines[0]


def only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_missing_path(tmp_path):
    out = tmp_path / "o.mp4"
    assert_refused(run_cli("submit", tmp_path / "nope.mp4", "--output", out), 2, "nope.mp4", "no such file")
    only(tmp_path)


def test_text_file_named_mp4(tmp_path):
    src = tmp_path / "notes.mp4"
    src.write_text("this is not a video\n")
    assert_refused(run_cli("submit", src, "--task", "identity"), 3, "notes.mp4")
    only(tmp_path, "notes.mp4")


def test_truncated_video(tmp_path):
    # a faststart MP4 (index first) cut in half: the header promises frames the file lacks
    whole = tmp_path / "whole.mp4"
    with av.open(str(VIDEOS / "selfie_mp3audio.mp4")) as c, av.open(
        str(whole), "w", options={"movflags": "+faststart"}
    ) as o:
        outs = {s.index: o.add_stream_from_template(s) for s in c.streams}
        for p in c.demux():
            if p.dts is not None:
                p.stream = outs[p.stream.index]
                o.mux(p)
    src = tmp_path / "truncated.mp4"
    data = whole.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    whole.unlink()
    proc = run_cli("submit", src, "--task", "identity")
    assert_refused(proc, 3, "truncated.mp4")
    only(tmp_path, "truncated.mp4")


def test_audio_only_file(tmp_path):
    src = tmp_path / "voice.mp4"
    with av.open(str(VIDEOS / "selfie_mp3audio.mp4")) as c, av.open(str(src), "w") as o:
        a = o.add_stream_from_template(c.streams.audio[0])
        for p in c.demux(c.streams.audio[0]):
            if p.dts is not None:
                p.stream = a
                o.mux(p)
    assert_refused(run_cli("submit", src, "--task", "identity"), 3, "voice.mp4", "no video stream")
    only(tmp_path, "voice.mp4")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    assert_refused(run_cli("submit", tmp_path / "empty", "--task", "identity"), 3, "empty", "no images")
    only(tmp_path, "empty")


def test_output_equal_to_input(tmp_path):
    src = tmp_path / "face.jpg"
    src.write_bytes((SCENES / "pyfeat_single_face.jpg").read_bytes())
    before = src.read_bytes()
    assert_refused(run_cli("submit", src, "--output", src, "--task", "identity"), 4, "face.jpg", "is the input")
    assert src.read_bytes() == before


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "face.jpg"
    src.write_bytes((SCENES / "pyfeat_single_face.jpg").read_bytes())
    out = tmp_path / "face.identity.jpg"
    out.write_bytes(b"keep me")
    assert_refused(run_cli("submit", src, "--task", "identity"), 4, "face.identity.jpg", "--overwrite")
    assert out.read_bytes() == b"keep me"
    proc = run_cli("submit", src, "--task", "identity", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:2] == b"\xff\xd8"  # replaced by a real JPEG
    only(tmp_path, "face.jpg", "face.identity.jpg")


def test_unknown_task_is_a_usage_error(tmp_path):
    proc = run_cli("submit", VIDEOS / "selfie_mp3audio.mp4", "--task", "sharpen-everything")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bad_preview_path_refused_before_any_work(tmp_path):
    src = tmp_path / "face.jpg"
    src.write_bytes((SCENES / "pyfeat_single_face.jpg").read_bytes())
    before = src.read_bytes()
    p = run_cli("submit", src, "--task", "identity", "--preview", tmp_path / "sheet.txt")
    assert_refused(p, 4, "sheet.txt", "--preview")
    p = run_cli("submit", src, "--task", "identity", "--preview", src)
    assert_refused(p, 4, "face.jpg", "overwrite the input")
    only(tmp_path, "face.jpg")  # no output, no sheet, nothing half-written
    assert src.read_bytes() == before


def test_exit_codes_are_one_table():
    """The CLI's --help, the README and the error classes give the same exit codes: the table
    is written once (pipeline.errors.EXIT_CODES) and every error class's code is in it."""
    import re

    import pipeline.errors as pe
    import worker.errors as we
    from conftest import ROOT

    classes = [c for m in (pe, we) for c in vars(m).values()
               if isinstance(c, type) and issubclass(c, pe.FacemendError)]
    assert {c.exit_code for c in classes} <= set(pe.EXIT_CODES)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Exit codes"):]
    section = section[: section.index("\n\n", section.index("| code |"))]
    assert {int(c) for c in re.findall(r"^\| (\d+) \|", section, re.M)} == set(pe.EXIT_CODES)
    proc = run_cli("submit", "--help")
    for code, text in pe.EXIT_CODES.items():
        assert f"  {code:<3} {text[:40]}" in proc.stdout.replace("\n      ", " ")
