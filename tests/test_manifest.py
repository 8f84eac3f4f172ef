"""Nightly reruns of a folder: OUTPUT/.facemend/manifest.jsonl decides what --skip-existing
skips (same input, task, pixel options, weights, output still there), survives a crash, and
each run leaves a report (report.json, a self-contained report.html)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cli
from conftest import ROOT, SCENES, UTKFACE

FACES = sorted(p for p in UTKFACE.iterdir() if p.name.endswith(".jpg"))[:3]


def run(capfd, *args) -> tuple[int, dict | None, str]:
    """``cli.main`` in this process with --json: (exit code, the result, stderr)."""
    capfd.readouterr()
    code = cli.main([str(a) for a in args] + ["--json"])
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), err


def names(result: dict) -> list[str]:
    """The files a run processed (or failed on), by name."""
    return sorted([Path(i["file"]).name for i in result["items"]]
                  + [Path(f["file"]).name for f in result["failures"]])


def records(dst: Path) -> list[dict]:
    lines = (dst / ".facemend" / "manifest.jsonl").read_bytes().split(b"\n")
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def album(tmp_path: Path, n: int = 4) -> Path:
    """3 UTKFace faces (one in a subfolder) and a scene photo; a text file facemend ignores."""
    src = tmp_path / "album"
    (src / "sub").mkdir(parents=True)
    for i, f in enumerate(FACES):
        shutil.copy(f, (src / "sub" if i == 0 else src) / f"face{i}.jpg")
    if n > 3:
        shutil.copy(SCENES / "pyfeat_single_face.jpg", src / "scene.jpg")
    (src / "notes.txt").write_text("not a photo")
    return src


def bump(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_manifest_decides_what_a_rerun_does(tmp_path, capfd):
    src = album(tmp_path)
    dst = tmp_path / "album.identity"
    # a folder written before manifests: no records unless asked; then the file-time rule
    code, r, _ = run(capfd, "submit", src, "--task", "identity")
    assert code == 0 and r["files"]["processed"] == 4 and "report" not in r
    assert not (dst / ".facemend").exists()
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert r["files"] == {"processed": 0, "skipped": 4, "failed": 0}
    assert {s["reason"] for s in r["skipped"] if s["file"].endswith(".jpg")} == {"output is newer than input"}
    recs = records(dst)
    assert len(recs) == 4 and all(x["outcome"] == "done" and x["adopted"] for x in recs)
    assert {x["input"] for x in recs} == {"sub/face0.jpg", "face1.jpg", "face2.jpg", "scene.jpg"}
    assert r["report"] == str(dst / ".facemend" / "report.json")

    # from now on the manifest decides: nothing to do
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert code == 0 and r["files"] == {"processed": 0, "skipped": 4, "failed": 0}
    assert all("manifest" in s["reason"] for s in r["skipped"] if s["file"].endswith(".jpg"))

    # a new mtime: exactly that file (its output is newer still: the file times would skip it)
    bump(src / "sub" / "face0.jpg", seconds=-3600)
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert names(r) == ["face0.jpg"] and r["files"]["skipped"] == 3

    # a deleted output: exactly that one
    (dst / "face2.jpg").unlink()
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert names(r) == ["face2.jpg"] and (dst / "face2.jpg").is_file()

    # an option that changes pixels: all of them; then the same option again: none
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing", "--min-face", "30")
    assert r["files"]["processed"] == 4
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing", "--min-face", "30")
    assert r["files"]["processed"] == 0
    # a video-only option does not touch photos
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing", "--min-face", "30",
                     "--crf", "23")
    assert r["files"]["processed"] == 0

    # a record torn by a crash mid-write is ignored, and the next record is still whole
    manifest = dst / ".facemend" / "manifest.jsonl"
    with open(manifest, "ab") as f:
        f.write(b'{"v":1,"input":"face1.jpg","size":1,"outc')
    bump(src / "face1.jpg")
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing", "--min-face", "30")
    assert names(r) == ["face1.jpg"]
    last = manifest.read_bytes().rstrip(b"\n").split(b"\n")[-1]
    assert json.loads(last)["input"] == "face1.jpg" and json.loads(last)["outcome"] == "done"
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing", "--min-face", "30")
    assert r["files"]["processed"] == 0

    # the records hold what the rules need
    rec = records(dst)[-1]
    st = (src / "face1.jpg").stat()
    assert (rec["size"], rec["mtime_ns"], rec["task"], rec["output"]) == (st.st_size, st.st_mtime_ns,
                                                                         "identity", "face1.jpg")
    assert rec["options"]["min_face"] == 30 and "crf" not in rec["options"] and rec["weights"] == {}
    assert re.fullmatch(r".+:\d+", rec["worker"]) and rec["time"].endswith("+00:00")
    # the input folder is untouched and the output mirrors it, beside its records
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == [
        ".facemend/lock", ".facemend/manifest.jsonl", ".facemend/report.html",
        ".facemend/report.json", "face1.jpg", "face2.jpg", "scene.jpg", "sub/face0.jpg"]
    assert not (src / ".facemend").exists()


def test_new_weights_redo_everything(tmp_path, capfd, monkeypatch):
    from pipeline import weights as pipeline_weights

    weights = tmp_path / "net.safetensors"
    weights.write_bytes(b"first weights")
    monkeypatch.setattr(pipeline_weights, "weights_files", lambda task: [weights])
    src = album(tmp_path, n=3)
    dst = tmp_path / "album.identity"
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert r["files"]["processed"] == 3
    digest = records(dst)[-1]["weights"]
    assert set(digest) == {"net.safetensors"} and len(digest["net.safetensors"]) == 64
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert r["files"]["processed"] == 0
    weights.write_bytes(b"retrained weights!")
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert r["files"]["processed"] == 3
    assert records(dst)[-1]["weights"] != digest
    report = json.loads((dst / ".facemend" / "report.json").read_text())
    assert report["weights"] == records(dst)[-1]["weights"]



def test_card_rewrite_keeps_the_weights_digest_and_old_records_still_match(tmp_path, capfd, monkeypatch):
    """The digest is over the tensors: rewriting the model card in the safetensors header (what
    a card refresh does) redoes nothing, a changed value redoes everything, and a record that
    holds the whole file's sha256 (how records were written before) still matches."""
    import torch
    from safetensors.torch import save_file

    from pipeline import weights as pipeline_weights

    weights = tmp_path / "net.safetensors"
    tensors = {"conv.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "conv.bias": torch.ones(3)}
    save_file(tensors, str(weights), metadata={"card": "first card"})
    monkeypatch.setattr(pipeline_weights, "weights_files", lambda task: [weights])
    src = album(tmp_path, n=3)
    dst = tmp_path / "album.identity"
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert r["files"]["processed"] == 3
    digest = records(dst)[-1]["weights"]["net.safetensors"]
    assert digest != pipeline_weights.file_sha256(weights)  # not the file's bytes

    save_file(tensors, str(weights), metadata={"card": "the card, rewritten with new bench rows"})
    assert pipeline_weights.weights_sha256(weights) == digest
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert (r["files"]["processed"], r["files"]["skipped"]) == (0, 3)

    # records as older versions wrote them: the sha256 of the whole file
    legacy = dst / ".facemend" / "manifest.jsonl"
    lines = [json.loads(x) for x in legacy.read_text().splitlines()]
    for rec in lines:
        rec["weights"] = {"net.safetensors": pipeline_weights.file_sha256(weights)}
    legacy.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert (r["files"]["processed"], r["files"]["skipped"]) == (0, 3)

    tensors["conv.bias"] = torch.full((3,), 1.0 + 1e-6)
    save_file(tensors, str(weights), metadata={"card": "the card, rewritten with new bench rows"})
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert r["files"]["processed"] == 3
    assert records(dst)[-1]["weights"]["net.safetensors"] not in (digest, pipeline_weights.file_sha256(weights))


CRASH = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pipeline.job import Hooks, JobOptions, run_job
done = []
def advance(n):
    done.append(n)
    if len(done) == {after}:
        os.kill(os.getpid(), signal.SIGKILL)
run_job({src!r}, JobOptions(task="identity", skip_existing=True), Hooks(advance=advance))
"""


def test_killed_run_then_rerun_does_exactly_what_is_missing(tmp_path, capfd):
    src = album(tmp_path)
    dst = tmp_path / "album.identity"
    proc = subprocess.run([sys.executable, "-c", CRASH.format(root=str(ROOT), src=str(src), after=2)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first = records(dst)
    assert len(first) == 2 and all(x["outcome"] == "done" for x in first)
    assert not (dst / ".facemend" / "report.json").exists()  # killed: no report, records kept
    # what writers killed mid-file leave (an hour and more ago), what a live writer has, and a
    # queued video job's parts folder: the rerun removes the first two only
    old = [dst / ".face2.partial.99999.jpg", dst / "sub" / ".facemend-99999-abcd_123" / "part0.mp4"]
    kept = [dst / ".scene.partial.88888.jpg", dst / ".facemend-0123456789abcdef" / "seg00000.mp4"]
    for path in old + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    for path in old + kept[1:]:
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - 3700))
    os.utime(old[1].parent, (0, old[1].stat().st_mtime))
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert code == 0
    done_before = {x["input"] for x in first}
    assert r["files"] == {"processed": 2, "skipped": 2, "failed": 0}
    assert {Path(i["file"]).relative_to(src).as_posix() for i in r["items"]}.isdisjoint(done_before)
    every = records(dst)
    assert sorted(x["input"] for x in every) == ["face1.jpg", "face2.jpg", "scene.jpg", "sub/face0.jpg"]
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*.jpg") if not p.name.startswith(".")) == [
        "face1.jpg", "face2.jpg", "scene.jpg", "sub/face0.jpg"]
    assert sorted(p for p in dst.rglob("*") if "partial" in p.name or p.name.startswith(".facemend-")) == [
        kept[1].parent, kept[0]]


def test_report_counts_failures_and_faces_and_a_new_task_redoes_all(tmp_path, capfd):
    src = album(tmp_path, n=3)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dst = tmp_path / "out"
    code, r, err = run(capfd, "submit", src, "--task", "identity", "-o", dst, "--skip-existing")
    assert code == 6 and r["files"] == {"processed": 3, "skipped": 0, "failed": 1}
    assert [x["outcome"] for x in records(dst) if x["input"] == "broken.png"] == ["failed"]
    # another task into the same folder: every file again (the broken one fails again)
    code, r, err = run(capfd, "submit", src, "--task", "denoise", "-o", dst, "--skip-existing")
    assert code == 6 and r["files"] == {"processed": 3, "skipped": 0, "failed": 1}
    assert [ln for ln in err.splitlines() if "broken.png" in ln] == [
        f"failed: {r['failures'][0]['error']}"]
    report = json.loads(Path(r["report"]).read_text())
    assert report["status"] == "partly failed" and report["task"] == "denoise"
    assert report["files"] == {"processed": 3, "skipped": 0, "failed": 1}
    assert [Path(f["file"]).name for f in report["failures"]] == ["broken.png"]
    assert report["failures"][0]["error"]
    assert set(report["weights"]) == {"denoise.safetensors"} and len(report["weights"]["denoise.safetensors"]) == 64
    assert report["options"]["task"] == "denoise" and report["faces"] == r["faces"] >= 3
    assert report["samples"] == 3 and report["files_per_second"] > 0
    assert report["started"] <= report["ended"]
    page = (dst / ".facemend" / "report.html").read_text()
    srcs = re.findall(r"<img[^>]* src='([^']*)'", page)
    assert len(srcs) == 2 * report["samples"] and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert "broken.png" in page and "partly failed" in page
    assert not re.search(r"""(href|src)=["'](?!data:)""", page)  # nothing fetched from elsewhere
    # and the same task again: nothing but the broken file
    code, r, err = run(capfd, "submit", src, "--task", "denoise", "-o", dst, "--skip-existing")
    assert r["files"] == {"processed": 0, "skipped": 3, "failed": 1}
    report = json.loads(Path(r["report"]).read_text())
    assert report["files"] == r["files"] and report["samples"] == 0


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, capfd):
    from pipeline import manifest
    from pipeline.job import JobOptions

    src = album(tmp_path, n=3)
    dst = tmp_path / "album.identity"
    with manifest.Manifest(src, dst, JobOptions(task="identity"), lock=True):
        capfd.readouterr()
        code = cli.main(["submit", str(src), "--task", "identity", "--skip-existing"])
        err = capfd.readouterr().err
    assert code == 4
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"facemend: error: {dst}: another facemend run is writing this output folder "
        f"({manifest.worker_name()} since "), err
    assert not (dst / ".facemend" / "report.json").exists()
    code, r, _ = run(capfd, "submit", src, "--task", "identity", "--skip-existing")
    assert code == 0 and r["files"]["processed"] == 3


def test_video_options_count_for_videos_only_and_records_stay_out_of_scans(tmp_path, capfd):
    from conftest import VIDEOS, cut
    from pipeline.paths import scan_folder

    src = album(tmp_path, n=3)
    cut(VIDEOS / "no_face_cartoon.mp4", src / "clip.mp4", 1.0)
    dst = tmp_path / "album.identity"
    common = ("submit", src, "--task", "identity", "--skip-existing", "--preset", "ultrafast")
    code, r, _ = run(capfd, *common)
    assert code == 0 and r["files"]["processed"] == 4
    code, r, _ = run(capfd, *common, "--crf", "30")  # a new crf: the video only
    assert names(r) == ["clip.mp4"]
    rec = [x for x in records(dst) if x["input"] == "clip.mp4"][-1]
    assert (rec["options"]["crf"], rec["options"]["preset"], rec["output"]) == (30, "ultrafast", "clip.mp4")
    # the output folder fed to another job: its records are not inputs, nor "skipped" noise
    files, skipped = scan_folder(dst)
    assert sorted(p.name for p in files) == ["clip.mp4", "face0.jpg", "face1.jpg", "face2.jpg"]
    assert skipped == []


def test_interrupted_run_reports_and_a_cancelled_one_takes_its_records_back(tmp_path):
    import pytest

    from pipeline.errors import Cancelled
    from pipeline.job import Hooks, JobOptions, run_job

    src = album(tmp_path)
    dst = tmp_path / "album.identity"
    opts = JobOptions(task="identity", skip_existing=True)

    def interrupt_after_one(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(src, opts, Hooks(advance=interrupt_after_one))
    report = json.loads((dst / ".facemend" / "report.json").read_text())
    assert report["status"] == "interrupted" and report["files"]["processed"] == 1
    assert [x["input"] for x in records(dst)] == ["face1.jpg"]

    # cancelled after two more files: those are taken back, and recorded as removed
    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 3  # file 1 skipped, files 2 and 3 written, then cancelled

    with pytest.raises(Cancelled):
        run_job(src, opts, Hooks(cancelled=cancel_after_two))
    latest = {x["input"]: x["outcome"] for x in records(dst)}
    assert latest == {"face1.jpg": "done", "face2.jpg": "removed", "scene.jpg": "removed"}
    assert sorted(p.name for p in dst.glob("*.jpg")) == ["face1.jpg"]
    assert json.loads((dst / ".facemend" / "report.json").read_text())["status"] == "cancelled"
    r = run_job(src, opts)
    assert r.files == {"processed": 3, "skipped": 1, "failed": 0}

    # a cancelled first run into a new folder leaves nothing at all
    other = tmp_path / "fresh"
    with pytest.raises(Cancelled):
        run_job(src, JobOptions(task="identity", skip_existing=True, output=str(other)),
                Hooks(cancelled=lambda: bool(calls.append(1)) or len(calls) > 6))
    assert not other.exists()


def test_chunk_api_two_workers_share_one_manifest(tmp_path):
    """What a queued chunk task calls per file: should_skip, then record, each worker process
    appending to a shard of its own; every worker reads all shards."""
    from pipeline import manifest
    from pipeline.job import JobOptions
    from pipeline.paths import mirrored_output

    src = album(tmp_path)
    dst = tmp_path / "out"
    opts = JobOptions(task="identity", skip_existing=True)
    files = sorted(p for p in src.rglob("*.jpg"))
    for i, p in enumerate(files):  # two workers, files alternating
        out = mirrored_output(p, src, dst)
        assert manifest.should_skip(src, dst, p, out, opts, shard=f"w{i % 2}") is None
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, out)
        shutil.copystat(p, out)  # as old as its input: the file-time rule would redo it
        bump(out, seconds=-60)
        manifest.record(src, dst, p, out, opts, "done", faces=1, shard=f"w{i % 2}")
    assert sorted(p.name for p in (dst / ".facemend").iterdir()) == ["manifest.w0.jsonl", "manifest.w1.jsonl"]
    for i, p in enumerate(files):  # each worker sees what the other did
        assert manifest.should_skip(src, dst, p, mirrored_output(p, src, dst), opts,
                                    shard=f"w{(i + 1) % 2}") == manifest.SKIP_REASON
    # a fresh process's view (no cache): all done, one record each
    book = manifest.Manifest(src, dst, opts)
    assert sorted(book.latest) == ["face1.jpg", "face2.jpg", "scene.jpg", "sub/face0.jpg"]
    assert all(book.decide(p, mirrored_output(p, src, dst))[0] for p in files)
    bump(files[0])
    assert book.decide(files[0], mirrored_output(files[0], src, dst)) == (False, "input changed")


def test_deinterlace_option_in_records_and_queued_options():
    """--deinterlace changes a video's pixels, so a record made with another mode is no reason
    to skip; records made before the option (no key) read as auto's, so an archive's records
    stay valid. A queued job's record with a mode this facemend does not know FAILS with it."""
    import pytest

    from pipeline.errors import FacemendError
    from pipeline.job import JobOptions
    from pipeline.manifest import pixel_options

    auto = pixel_options(JobOptions(task="denoise"), "clip.mp4")
    assert "deinterlace" not in auto
    assert pixel_options(JobOptions(task="denoise", deinterlace="off"), "clip.mp4") == {**auto, "deinterlace": "off"}
    assert "deinterlace" not in pixel_options(JobOptions(task="denoise", deinterlace="all"), "photo.png")
    with pytest.raises(FacemendError, match="deinterlace must be one of auto, all, off"):
        JobOptions.from_dict({"task": "denoise", "deinterlace": "bob"})
