"""``--strength``: a local network's change applied at a fraction, on real photos through the CLI."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import SCENES, run_cli, run_json

from pipeline.errors import FacemendError
from pipeline.job import JobOptions
from pipeline.manifest import pixel_options


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse < 1e-10 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder with a real photo as it is and with Gaussian noise σ 20 (seeded), and the heads
    of its faces found on the clean photo."""
    from pipeline.faces import FaceDetector

    root = tmp_path_factory.mktemp("strength")
    src = root / "in"
    src.mkdir()
    clean = cv2.imread(str(SCENES / "pyfeat_single_face.jpg"))
    noise = np.random.default_rng(20).normal(0, 20, clean.shape)
    noisy = np.clip(np.rint(clean + noise), 0, 255).astype(np.uint8)
    cv2.imwrite(str(src / "clean.png"), clean)
    cv2.imwrite(str(src / "noisy.png"), noisy)
    faces = FaceDetector().detect([cv2.cvtColor(clean, cv2.COLOR_BGR2RGB)])[0]
    assert faces, "the photo's face must be found"
    heads = []
    for f in faces:
        x0, y0, x1, y1 = f.box
        w, h = x1 - x0, y1 - y0
        heads.append((slice(int(max(0, y0 - 0.35 * h)), int(y1 + 0.05 * h)),
                      slice(int(max(0, x0 - 0.12 * w)), int(x1 + 0.12 * w))))
    return root, src, clean, noisy, heads


def _heads_psnr(a, b, heads) -> float:
    return float(np.mean([_psnr(a[h], b[h]) for h in heads]))


def test_strength_keeps_more_of_an_undamaged_face_and_still_cleans_a_noisy_one(photos):
    root, src, clean, noisy, heads = photos
    full, half = root / "full", root / "half"
    run_json("submit", src, "--task", "denoise", "-o", full)
    run_json("submit", src, "--task", "denoise", "-o", half, "--strength", "0.5")
    out = {(k, s): cv2.imread(str(d / f"{k}.png")) for k in ("clean", "noisy") for s, d in (("1", full), ("0.5", half))}

    # an undamaged face: half the change, so it stays much closer to itself (a quarter of the error)
    on_clean_full, on_clean_half = _heads_psnr(out["clean", "1"], clean, heads), _heads_psnr(out["clean", "0.5"], clean, heads)
    assert on_clean_half > on_clean_full + 4.0, (on_clean_full, on_clean_half)
    # the change applied is half the network's, pixel for pixel (up to rounding to 8 bits)
    for kind, given in (("clean", clean), ("noisy", noisy)):
        d_full = out[kind, "1"].astype(np.float64) - given
        d_half = out[kind, "0.5"].astype(np.float64) - given
        changed = np.abs(d_full) >= 4  # half of it is then far from 8-bit rounding
        assert changed.sum() > 500, kind
        ratio = np.median(d_half[changed] / d_full[changed])
        assert 0.45 <= ratio <= 0.55, (kind, ratio)
        # pixels the network leaves alone stay the input's at either strength
        assert np.array_equal(out[kind, "0.5"][d_full == 0], given[d_full == 0])
    # a noisy face: still far cleaner than the input, less clean than the whole change
    before = _heads_psnr(noisy, clean, heads)
    on_noisy_full, on_noisy_half = _heads_psnr(out["noisy", "1"], clean, heads), _heads_psnr(out["noisy", "0.5"], clean, heads)
    assert on_noisy_half > before + 3.0, (before, on_noisy_half)
    assert on_noisy_half < on_noisy_full, (on_noisy_half, on_noisy_full)


def test_a_folder_done_at_one_strength_is_redone_at_another(photos, tmp_path):
    _, src, *_ = photos
    out = tmp_path / "out"
    first = run_json("submit", src, "--task", "denoise", "-o", out, "--skip-existing")
    assert first["files"]["processed"] == 2
    again = run_json("submit", src, "--task", "denoise", "-o", out, "--skip-existing", "--strength", "0.5")
    assert again["files"] == {"processed": 2, "skipped": 0, "failed": 0}
    same = run_json("submit", src, "--task", "denoise", "-o", out, "--skip-existing", "--strength", "0.5")
    assert same["files"] == {"processed": 0, "skipped": 2, "failed": 0}


@pytest.mark.parametrize("value", ["0", "1.5", "-1", "nan", "half"])
def test_a_strength_out_of_range_is_a_usage_error(value, tmp_path):
    p = run_cli("submit", SCENES / "pyfeat_single_face.jpg", "--task", "denoise", "-o", tmp_path / "o.png",
                "--strength", value)
    assert p.returncode == 2 and "--strength" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("task", ["unmask", "identity", "age"])
def test_strength_is_refused_for_tasks_it_means_nothing_to(task, tmp_path):
    p = run_cli("submit", SCENES / "pyfeat_single_face.jpg", "--task", task, "-o", tmp_path / "o.png",
                "--strength", "0.5")
    assert p.returncode == 3 and "--strength" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_job_records_and_manifests_hold_strength_only_where_it_is_not_one():
    """A worker older than the option still runs a job that does not use it; a manifest written
    before the option still matches a rerun at the whole change."""
    assert "strength" not in JobOptions(task="denoise").record()
    assert "strength" not in pixel_options(JobOptions(task="denoise"))
    opts = JobOptions(task="denoise", strength=0.5)
    assert JobOptions.from_dict(opts.record()) == opts
    assert pixel_options(opts)["strength"] == 0.5
    for bad in (0, 1.5, float("nan"), "0.5"):
        with pytest.raises(FacemendError, match="strength"):
            JobOptions.from_dict({"task": "denoise", "strength": bad})
