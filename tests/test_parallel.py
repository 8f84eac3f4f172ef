"""A job's work side by side in several processes (``--jobs``, ``pipeline.parallel``): a folder's
files give the same files, records and report as one process, a bad file failing alone; a long
video's segments join into the frames, times and audio of one process's output; a cancel takes
back what was written; the processes fit the memory and a GPU's memory; the option is refused
where it means nothing."""
from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
from conftest import SCENES, VIDEOS, run_cli


def frames_of(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    (src / "clips").mkdir(parents=True)
    for name in ("pyfeat_multi_face.jpg", "facerec_two_people.jpg", "pyfeat_single_face.jpg"):
        shutil.copy(SCENES / name, src / name)
    shutil.copy(VIDEOS / "selfie_mp3audio.mp4", src / "clips" / "selfie.mp4")
    (src / "broken.jpg").write_bytes(b"not an image")
    return src


def test_a_folder_in_two_processes_is_the_folder_one_process_makes(folder, tmp_path):
    one = run_cli("submit", folder, "--task", "denoise", "--output", tmp_path / "one", "--jobs", "1",
                  "--manifest", "--json")
    two = run_cli("submit", folder, "--task", "denoise", "--output", tmp_path / "two", "--jobs", "2",
                  "--manifest", "--json")
    assert one.returncode == two.returncode == 6, two.stderr  # the broken photo fails alone
    assert two.stderr.strip().splitlines() == [f"failed: {folder / 'broken.jpg'}: not a readable image "
                                               "(corrupt or unsupported data)"]
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (one, two))
    assert a["files"] == b["files"] == {"processed": 4, "skipped": 0, "failed": 1}
    assert (a["frames"], a["faces"]) == (b["frames"], b["faces"]) and b["faces"] > 4
    assert [i["file"] for i in b["items"]] == [i["file"] for i in a["items"]]  # in the folder's order
    for item in b["items"]:
        out = tmp_path / "two" / item["output"].split("/two/", 1)[1]
        ref = tmp_path / "one" / item["output"].split("/two/", 1)[1]
        if out.suffix == ".jpg":
            assert out.read_bytes() == ref.read_bytes(), out
        else:
            assert np.array_equal(frames_of(out), frames_of(ref)), out
    for run in ("one", "two"):  # every file recorded, and a report with its samples
        lines = [json.loads(x) for x in (tmp_path / run / ".facemend" / "manifest.jsonl").read_text().splitlines()]
        assert sorted((x["input"], x["outcome"]) for x in lines) == [
            ("broken.jpg", "failed"), ("clips/selfie.mp4", "done"), ("facerec_two_people.jpg", "done"),
            ("pyfeat_multi_face.jpg", "done"), ("pyfeat_single_face.jpg", "done")], lines
        report = json.loads((tmp_path / run / ".facemend" / "report.json").read_text())
        assert report["status"] == "partly failed" and report["files"]["processed"] == 4
    assert (tmp_path / "two" / ".facemend" / "report.html").stat().st_size > 50_000  # sample tiles in it
    again = run_cli("submit", folder, "--task", "denoise", "--output", tmp_path / "two", "--jobs", "2",
                    "--skip-existing", "--json")
    assert again.returncode == 6  # the broken photo is tried again; the others are done
    assert json.loads(again.stdout.strip().splitlines()[-1])["files"] == {"processed": 0, "skipped": 4, "failed": 1}


def test_a_cancel_stops_the_processes_and_takes_back_what_they_wrote(folder, tmp_path):
    from pipeline.errors import Cancelled
    from pipeline.job import Hooks, JobOptions, run_job

    done = []
    hooks = Hooks(advance=done.append, cancelled=lambda: len(done) >= 1)
    dst = tmp_path / "out"
    with pytest.raises(Cancelled, match="the files it wrote are removed"):
        run_job(folder, JobOptions(task="denoise", output=str(dst)), hooks, processes=2)
    assert 1 <= len(done) < 5  # stopped after the files in hand, not after all five
    assert not dst.exists() or not [p for p in dst.rglob("*") if p.is_file()]


def test_a_killed_process_fails_the_job_with_one_line_and_leaves_no_temporary_files(folder, tmp_path):
    """The out-of-memory killer takes a child as it writes the video: the job stops (exit 1)
    with one line naming that file, and nothing half-written stays beside the outputs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "submit", folder, "--task", "denoise",
                             "--output", dst, "--jobs", "2"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((dst / "clips").glob(".facemend-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    work = list((dst / "clips").glob(".facemend-*"))
    assert work, "the video was never started"
    os.kill(int(work[0].name.split("-")[1]), signal.SIGKILL)  # .facemend-PID-...: the child writing it
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"facemend: error: {folder / 'clips' / 'selfie.mp4'}: the process "
                                                   "restoring it stopped (exit code -9"), err
    left = [p.name for p in dst.rglob("*") if p.name.startswith(".facemend-") or ".partial." in p.name]
    assert left == [] and not (dst / "clips" / "selfie.mp4").exists()


def test_jobs_is_refused_where_it_means_nothing(folder, tmp_path):
    bad = run_cli("submit", folder, "--task", "denoise", "--output", tmp_path / "o", "--jobs", "0")
    assert bad.returncode == 2 and "--jobs" in bad.stderr and "1 or more" in bad.stderr
    queued = run_cli("submit", folder, "--task", "denoise", "--output", tmp_path / "o", "--jobs", "2",
                     "--broker", "redis://127.0.0.1:6379/15")
    assert queued.returncode == 3 and "Traceback" not in queued.stderr
    assert queued.stderr.strip().splitlines() == ["facemend: error: --jobs is for a job run in this process; a queued"
                                                  " job runs in the workers' pools (cli.py worker -c)"]
    assert not (tmp_path / "o").exists()


@pytest.fixture
def long_clip(tmp_path, monkeypatch):
    """selfie_mp3audio twice over (4.8 s, MP3 audio), cut into 1-second segments."""
    from bench.memory import repeat_clip
    from pipeline import parallel

    src = tmp_path / "long.mp4"
    repeat_clip(VIDEOS / "selfie_mp3audio.mp4", src, 2)
    monkeypatch.setattr(parallel, "SEGMENT_LEAST", 1.0)
    return src


def test_a_long_video_is_restored_in_segments_side_by_side(long_clip, tmp_path):
    """Its segments in two processes, joined: every frame at the source's time, the audio packet
    for packet, the faces and the pixels of the one-process run (up to the encoder: the parts
    are encoded without B-frames, as a queued job's are)."""
    from conftest import probe

    from pipeline import parallel
    from pipeline.job import Hooks, JobOptions, run_job
    from pipeline.media import plan

    assert len(parallel.segment_ranges(plan(long_clip), 2)) >= 3
    seen = []
    two = run_job(long_clip, JobOptions(task="denoise", output=str(tmp_path / "two.mp4")),
                  Hooks(advance=seen.append), processes=2)
    one = run_job(long_clip, JobOptions(task="denoise", output=str(tmp_path / "one.mp4")))
    src, a, b = probe(long_clip), probe(tmp_path / "one.mp4"), probe(tmp_path / "two.mp4")
    assert two.frames == one.frames == src["frames"] == sum(seen) == 144
    assert two.faces == one.faces >= 140
    assert b["pts"] == a["pts"] == src["pts"] and b["audio"] == src["audio"]
    x, y = frames_of(tmp_path / "one.mp4").astype(np.float32), frames_of(tmp_path / "two.mp4").astype(np.float32)
    worst = 10 * np.log10(255.0**2 / ((x - y) ** 2).reshape(len(x), -1).mean(1).max())
    assert worst > 40, worst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "one.mp4", "two.mp4"]  # no parts left


def test_a_cancelled_video_in_segments_leaves_nothing(long_clip, tmp_path):
    from pipeline.errors import Cancelled
    from pipeline.job import Hooks, JobOptions, run_job

    seen = []
    with pytest.raises(Cancelled):
        run_job(long_clip, JobOptions(task="denoise", output=str(tmp_path / "out.mp4")),
                Hooks(advance=seen.append, cancelled=lambda: bool(seen)), processes=2)
    assert 0 < sum(seen) < 144
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]


def test_processes_on_a_gpu_are_as_many_as_its_free_memory_holds(monkeypatch):
    import torch

    from pipeline.parallel import GPU_BYTES_PER_PROCESS, fit_on_device

    assert fit_on_device(4, "cpu") == 4 and fit_on_device(1, "cuda:0") == 1
    free = {"bytes": 3.2 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free["bytes"]), 8 * 2**30))
    assert GPU_BYTES_PER_PROCESS >= 1.2 * 2**30  # measured: 1.2 GB a process on an H200
    assert fit_on_device(4, "cuda:0") == 2
    free["bytes"] = 0.5 * 2**30
    assert fit_on_device(4, "cuda") == 1  # one always runs
    free["bytes"] = 64 * 2**30
    assert fit_on_device(4, "cuda:1") == 4


def test_processes_are_as_many_as_the_memory_available_holds(monkeypatch):
    from pipeline import parallel

    monkeypatch.setattr(parallel, "memory_available", lambda: 5 * 2**30)
    assert parallel.fit_in_memory(4) == 2  # 1080p: about 1.9 GB a process
    assert parallel.fit_in_memory(4, megapixels=8.3) == 1  # 4K frames: one
    assert parallel.fit_in_memory(1) == 1
    monkeypatch.setattr(parallel, "memory_available", lambda: 64 * 2**30)
    assert parallel.fit_in_memory(4, megapixels=8.3) == 4
    monkeypatch.setattr(parallel, "memory_available", lambda: None)  # not Linux: as asked
    assert parallel.fit_in_memory(3) == 3
