"""FaceMath with the shipped weights: the VAE, the edits, morph, generate, on real UTKFace faces.

The age/gender judge (models/training/age.py) was trained apart from the VAE on the training split; the
faces here come from the validation split, which neither network saw.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SCENES, UTKFACE, VIDEOS, cut, decode_rgb, face_mask, probe, psnr, run_cli, run_json

import models
from models.training import data as D
from models.facemath import FaceEditor, FaceMath
from models.tasks import resolve

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def fm() -> FaceMath:
    return FaceMath.load("cpu")


@pytest.fixture(scope="module")
def val_faces() -> tuple[np.ndarray, list[dict]]:
    """40 aligned 128 px crops of validation-split UTKFace photos, made by the pipeline's MTCNN."""
    names = sorted(p.name for p in UTKFACE.iterdir() if D.parse_utkface_name(p.name) and D.is_val(p.name))
    pick = [names[i] for i in np.linspace(0, len(names) - 1, 48).astype(int)]
    crops, kept = D.make_crops([UTKFACE / n for n in pick])
    labels = [D.parse_utkface_name(pick[i]) for i in kept]
    return crops[:40], [{"age": lab.age, "gender": lab.gender} for lab in labels[:40]]


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return np.clip(np.rint(x.permute(0, 2, 3, 1).numpy() * 255), 0, 255).astype(np.uint8)


def pool(x: np.ndarray) -> np.ndarray:
    from models.training.train_vae import pool64

    return pool64(x)


def test_editor_shapes_dtypes_and_zero_amount_is_identity(fm, val_faces):
    crops, _ = val_faces
    x = to_tensor(crops[:4])
    for task in ("age", "gender"):
        ed = models.load(task, "cpu")
        assert isinstance(ed, FaceEditor) and ed.amount == resolve(task).default_amount
        y = ed(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert float(y.min()) >= 0 and float(y.max()) <= 1
        assert float((y - x).abs().mean()) > 1 / 255  # the edit changes the face
    same = FaceEditor(resolve("age"), fm, amount=0.0)(x)
    assert torch.allclose(same, x, atol=1e-6)  # zero years: decode(z) - decode(z) = 0


def test_vae_reconstructs_held_out_faces(fm, val_faces):
    crops, _ = val_faces
    faces = pool(crops)
    x = to_tensor(faces)
    y = to_uint8(fm.decode(fm.encode(x)))
    recon = np.mean([psnr(a, b) for a, b in zip(faces, y)])
    # a code for every face, not a mean face: reconstructions beat the training mean's decode
    mean_face = to_uint8(fm.decode(fm.attrs["code_mean"][None]))[0]
    baseline = np.mean([psnr(a, mean_face) for a in faces])
    card = json.loads((Path(models.__file__).parent / "weights" / "facemath.json").read_text())
    assert recon > baseline + 6, (recon, baseline)
    assert recon > card["validation"]["psnr"] - 2.5  # these 40 faces agree with the card's figure


def test_age_and_gender_arithmetic_move_the_judge(fm, val_faces):
    from models.training.age import load_age, predict, predict_gender

    crops, labels = val_faces
    judge = load_age()
    before = predict(judge, pool(crops))
    ages = np.array([lab["age"] for lab in labels])
    assert np.abs(before - ages).mean() < 15  # the judge itself reads age off real faces
    shifts = {}
    for amount in (30.0, -30.0):
        out = to_uint8(FaceEditor(resolve("age"), fm, amount=amount)(to_tensor(crops)))
        shifts[amount] = float((predict(judge, pool(out)) - before).mean())
    assert shifts[30.0] > 3 and shifts[-30.0] < -3, shifts
    p0 = predict_gender(judge, pool(crops))
    p_f = predict_gender(judge, pool(to_uint8(FaceEditor(resolve("gender"), fm, amount=1.0)(to_tensor(crops)))))
    p_m = predict_gender(judge, pool(to_uint8(FaceEditor(resolve("gender"), fm, amount=-1.0)(to_tensor(crops)))))
    assert (p_f - p0).mean() > 0.05 and (p_m - p0).mean() < -0.05, ((p_f - p0).mean(), (p_m - p0).mean())


def test_track_smoothing_steadies_a_video_edit(fm, val_faces):
    crops, _ = val_faces
    rng = np.random.default_rng(0)
    frames = np.clip(crops[0][None].astype(np.int16) + rng.normal(0, 8, (12,) + crops[0].shape), 0, 255)
    x = to_tensor(frames.astype(np.uint8))

    def jitter(keys):
        ed = FaceEditor(resolve("age"), fm, amount=30.0)
        changes = [ed(x[i : i + 1], keys) - x[i : i + 1] for i in range(len(x))]
        return float(torch.stack([(a - b).abs().mean() for a, b in zip(changes[1:], changes[:-1])]).mean())

    assert jitter([7]) < 0.8 * jitter(None)  # one track: its code is smoothed over frames


def test_cli_age_on_a_photo_edits_faces_only(tmp_path):
    src = SCENES / "pyfeat_multi_face.jpg"
    out = tmp_path / "older.png"
    r = run_json("submit", src, "--task", "age", "--amount", "30", "--output", out)
    assert r["faces"] >= 2 and out.is_file()
    import cv2

    a = cv2.imread(str(src))[..., ::-1]
    b = cv2.imread(str(out))[..., ::-1]
    assert a.shape == b.shape
    outside = ~face_mask([a], grow=0.5)[0]
    diff = np.abs(a.astype(int) - b.astype(int)).max(-1)
    assert diff[outside].max() <= 1  # PNG from JPEG: only rounding of the decode, nothing pasted
    assert diff[~outside].mean() > 0.5  # the faces changed


def test_cli_age_on_video_keeps_frames_and_audio(tmp_path):
    clip = cut(VIDEOS / "closeup_pexels.mp4", tmp_path / "clip.mp4", 1.0)
    r = run_json("submit", clip, "--task", "age", "--amount", "-20", "--preset", "ultrafast")
    out = Path(r["output"])
    assert out.name == "clip.age.mp4"
    a, b = probe(clip), probe(out)
    assert b["frames"] == a["frames"] and r["faces"] >= a["frames"] * 0.9
    assert b["audio"] == a["audio"] and len(a["audio"][0]) > 0


def test_cli_morph_mp4_and_gif(tmp_path):
    a, b = SCENES / "pyfeat_single_face.jpg", SCENES / "facerec_lin-manuel-miranda.png"
    r = run_json("submit", a, "--task", "morph", "--to", b, "--frames", "12", "--output", tmp_path / "m.mp4")
    assert r["kind"] == "morph" and r["frames"] == 12
    p = probe(tmp_path / "m.mp4")
    assert p["frames"] == 12
    frames = decode_rgb(tmp_path / "m.mp4")
    import cv2

    first = cv2.imread(str(a))[..., ::-1][: frames[0].shape[0], : frames[0].shape[1]]
    assert psnr(first, frames[0]) > 30  # the morph starts at the first photo
    assert psnr(frames[0], frames[-1]) < 20  # and ends somewhere else
    run_json("submit", a, "--task", "morph", "--to", b, "--frames", "6", "--output", tmp_path / "m.gif")
    from PIL import Image

    with Image.open(tmp_path / "m.gif") as im:
        assert im.n_frames == 6 and im.size == (first.shape[1], first.shape[0])


def test_cli_morph_bad_inputs(tmp_path):
    a = SCENES / "pyfeat_single_face.jpg"
    p = run_cli("submit", a, "--task", "morph", "--output", tmp_path / "m.mp4")
    assert p.returncode == 3 and "--to" in p.stderr
    p = run_cli("submit", a, "--task", "morph", "--to", VIDEOS / "closeup_pexels.mp4", "--output", tmp_path / "m.mp4")
    assert p.returncode == 3 and "closeup_pexels.mp4" in p.stderr
    p = run_cli("submit", a, "--task", "morph", "--to", a, "--output", tmp_path / "m.png")
    assert p.returncode == 4 and "m.png" in p.stderr
    noface = tmp_path / "wall.png"
    import cv2

    cv2.imwrite(str(noface), np.full((200, 300, 3), 120, np.uint8))
    p = run_cli("submit", a, "--task", "morph", "--to", noface, "--output", tmp_path / "m.mp4")
    assert p.returncode == 3 and "wall.png: no face found" in p.stderr
    assert not any(tmp_path.glob("*.mp4")) and not any(tmp_path.glob(".*partial*"))
    p = run_cli("submit", a, "--task", "denoise", "--amount", "3")
    assert p.returncode == 3 and "--amount" in p.stderr


def test_cli_generate_grid_is_deterministic(tmp_path):
    import cv2

    p = run_cli("generate", "--count", "6", "--output", tmp_path / "g.png", "--face-size", "64", "--columns", "3")
    assert p.returncode == 0, p.stderr
    g = cv2.imread(str(tmp_path / "g.png"))
    assert g.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    run_cli("generate", "--count", "6", "--output", tmp_path / "h.png", "--face-size", "64", "--columns", "3",
            check=True)
    assert np.array_equal(g, cv2.imread(str(tmp_path / "h.png")))  # same seed, same faces
    run_cli("generate", "--count", "6", "--output", tmp_path / "s.png", "--face-size", "64", "--columns", "3",
            "--seed", "1", check=True)
    s = cv2.imread(str(tmp_path / "s.png"))
    assert not np.array_equal(g, s)
    tiles = [g[2 + r * 66 : 66 + r * 66, 2 + c * 66 : 66 + c * 66] for r in range(2) for c in range(3)]
    assert min(psnr(tiles[0], t) for t in tiles[1:]) < 30  # different faces, not one face six times
    p = run_cli("generate", "--output", tmp_path / "g.png")
    assert p.returncode == 4 and "exists" in p.stderr


def test_shipped_files_load_without_pickle():
    from safetensors import safe_open

    wdir = Path(models.__file__).parent / "weights"
    for name in ("facemath.safetensors", "facemath.attrs.safetensors", "age.safetensors"):
        with safe_open(str(wdir / name), framework="pt") as f:
            assert len(list(f.keys())) > 0
        assert (wdir / name).stat().st_size < 20e6
    card = json.loads((wdir / "facemath.json").read_text())
    assert card["training"]["steps"] > 0 and card["validation"]["psnr"] > 0


def test_vae_training_smoke_run_exports_and_resumes(tmp_path, val_faces):
    from models.training.train_vae import VAETrainConfig, pool64, train
    from models.vae import load_vae

    crops, _ = val_faces
    faces = pool64(crops)
    cfg = VAETrainConfig(steps=2, batch=4, out=str(tmp_path / "run"), export=True, export_dir=str(tmp_path),
                         val_count=8, net={"latent": 16, "widths": [8, 16, 32, 64]})
    state = train(cfg, train_faces=faces[:32], val_faces=faces[32:40])
    assert state["step"] == 2 and state["best"] > 0
    vae = load_vae(tmp_path / "facemath.safetensors")
    assert vae.config.latent == 16
    card = json.loads((tmp_path / "facemath.json").read_text())
    assert card["training"]["steps"] == 2
    cfg.steps = 3
    assert train(cfg, train_faces=faces[:32], val_faces=faces[32:40])["step"] == 3  # resumed, one more
    mu, logvar = vae.encode(torch.rand(2, 3, 64, 64))
    assert mu.shape == logvar.shape == (2, 16) and vae.decode(mu).shape == (2, 3, 64, 64)
