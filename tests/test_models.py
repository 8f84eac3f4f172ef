"""Checks of models/: networks, weight files, degradations, training and evaluation.

Crops are built here from a handful of real UTKFace photos with the pipeline's own detector and
alignment; nothing depends on a local crop cache.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from models.training import data as D
from models.training.degrade import degrade, degrade_batch, degrade_eval
from models.training.evaluate import evaluate, whole_unmask
from models.nets import NetConfig, ResUNet, grow_net, load_net, read_metadata, save_net
from models.registry import WEIGHTS_DIR
from models.training.train import PRESETS, TrainConfig, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UTKFACE = SHARED / "faces" / "utkface"
TASKS = ("denoise", "enhance", "restore", "unmask")


def _photos(val: bool, n: int) -> list[Path]:
    names = sorted(p.name for p in UTKFACE.iterdir() if D.parse_utkface_name(p.name))
    return [UTKFACE / name for name in names if D.is_val(name) == val][:n]


@pytest.fixture(scope="module")
def detector():
    from pipeline.faces import FaceDetector

    return FaceDetector(min_face=40, batch_size=32)


@pytest.fixture(scope="module")
def train_crops(detector) -> np.ndarray:
    crops, _ = D.make_crops(_photos(False, 10), detector=detector)
    assert len(crops) >= 8, "MTCNN should find faces in UTKFace photos"
    return crops


@pytest.fixture(scope="module")
def val_crops(detector) -> np.ndarray:
    crops, _ = D.make_crops(_photos(True, 26), detector=detector)
    assert len(crops) >= 20
    return crops[:20]


# ----------------------------------------------------------------------------------- data


def test_utkface_names_parse_and_split():
    assert D.parse_utkface_name("26_1_2_20170116174525125.jpg.chip.jpg") == D.Labels(26, 1, 2)
    assert D.parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg") is None  # no race
    assert D.parse_utkface_name("x_1_2_20170116174525125.jpg.chip.jpg") is None
    names = sorted(p.name for p in UTKFACE.iterdir())[:2000]
    frac = np.mean([D.is_val(n) for n in names])
    assert 0.03 < frac < 0.07, f"validation fraction {frac:.3f} should be about 5%"
    assert [D.is_val(n) for n in names[:50]] == [D.is_val(n) for n in names[:50]]


def test_crops_are_aligned_uint8(train_crops):
    assert train_crops.dtype == np.uint8 and train_crops.shape[1:] == (128, 128, 3)
    assert train_crops.std() > 20, "crops should hold image content"


# ----------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("size", [128, 192])
def test_net_shapes_and_dtypes(task, size):
    net = ResUNet(PRESETS[task]["net"]).eval()
    assert isinstance(net.multiple, int) and size % net.multiple == 0
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, x), "an untrained net (zero tail) must be the identity"


def test_net_rejects_bad_input():
    net = ResUNet(NetConfig())
    with pytest.raises(AssertionError, match="multiples of 8"):
        net(torch.rand(1, 3, 100, 128))
    with pytest.raises(AssertionError, match="expected"):
        net(torch.rand(1, 4, 128, 128))


def test_save_load_roundtrip_is_fp16_safetensors(tmp_path):
    torch.manual_seed(0)
    net = ResUNet(NetConfig(widths=(8, 16), enc_blocks=(1, 1), dec_blocks=(1,))).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_net(net, tmp_path / "n.safetensors", metadata={"note": "test", "n": 3})
    meta = read_metadata(path)
    assert json.loads(meta["config"])["widths"] == [8, 16] and meta["note"] == "test"
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(str(path)).values())
    back = load_net(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(back(x), net(x), atol=2e-2)
    with pytest.raises(ValueError, match="safetensors"):
        load_net(tmp_path / "n.pt")


def test_a_grown_net_starts_as_the_file_and_only_adds_blocks(tmp_path):
    torch.manual_seed(0)
    net = ResUNet(NetConfig(widths=(8, 16), enc_blocks=(1, 1), dec_blocks=(1,))).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_net(net, tmp_path / "n.safetensors")
    grown = grow_net(path, {"enc_blocks": [1, 3], "dec_blocks": [2]})
    assert grown.config.enc_blocks == (1, 3) and grown.num_params() > net.num_params()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the file's fp16 weights, and the new blocks add nothing yet
        assert torch.allclose(grown(x), load_net(path)(x), atol=1e-6)
    with pytest.raises(ValueError, match="can only add blocks"):
        grow_net(path, {"enc_blocks": [1, 0]})
    with pytest.raises(ValueError, match="can only add blocks"):
        grow_net(path, {"widths": [8, 32]})


@pytest.mark.parametrize("task", ["denoise", "enhance", "deblur", "restore", "unmask"])
def test_shipped_weights_load_through_the_registry(task):
    model = models.load(task)
    assert model.multiple in (8, 16, 32)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    card = json.loads((WEIGHTS_DIR / f"{model.task}.json").read_text())
    assert card["task"] == model.task and card["training"]["steps"] > 0
    size = (WEIGHTS_DIR / f"{model.task}.safetensors").stat().st_size
    assert size <= 20 * 2**20


# ----------------------------------------------------------------------------------- degradations


@pytest.mark.parametrize("task", TASKS)
def test_degradations_are_deterministic(task, train_crops):
    crop = train_crops[0]
    for fn in (degrade, degrade_eval):
        a = fn(task, crop, np.random.default_rng(7))
        b = fn(task, crop, np.random.default_rng(7))
        c = fn(task, crop, np.random.default_rng(8))
        assert a.image.dtype == np.uint8 and a.image.shape == crop.shape
        assert a.image.tobytes() == b.image.tobytes()
        if not (fn is degrade_eval and task == "enhance"):  # x4 down/up has no randomness
            assert a.image.tobytes() != c.image.tobytes()
        assert not np.array_equal(a.image, crop)
    x, _ = degrade_batch(task, train_crops[:4], seed=3, evaluation=True)
    y, _ = degrade_batch(task, train_crops[:4], seed=3, evaluation=True)
    assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("codec", ["libx264", "mpeg2video", "mpeg4"])
def test_video_codec_degradation_is_a_real_encode_deterministic_per_seed(codec, train_crops):
    """The codec degradation runs the real encoder and decoder (PyAV): harder settings lose
    more, the same seed gives the same bytes, another seed moves the block grid."""
    from models.training.degrade import video_codec

    crop = np.ascontiguousarray(train_crops[0][:64, :64])
    q_soft, q_hard = (28, 45) if codec == "libx264" else (4, 31)

    def psnr(x):
        return 10 * np.log10(255.0**2 / np.mean((x.astype(float) - crop) ** 2))

    soft = video_codec(crop, np.random.default_rng(1), codec, q_soft)
    hard = video_codec(crop, np.random.default_rng(1), codec, q_hard)
    assert soft.shape == crop.shape and soft.dtype == np.uint8
    assert 22 < psnr(hard) < psnr(soft) < 50
    assert np.array_equal(hard, video_codec(crop, np.random.default_rng(1), codec, q_hard))
    assert not np.array_equal(hard, video_codec(crop, np.random.default_rng(2), codec, q_hard))


def test_denoise_training_mixes_noise_jpeg_and_video_codecs(train_crops):
    """About half of denoise's training inputs are compressed (JPEG or a video codec) rather
    than noisy: their error is blocky (low-frequency), a pure noise input's is not."""
    crop = np.ascontiguousarray(train_crops[1][:64, :64])
    smooth = 0
    for seed in range(40):
        bad = degrade("denoise", crop, np.random.default_rng(seed)).image.astype(np.float32)
        err = bad - crop
        # the share of the error that survives a 3x3 box blur: near 1/9 for white noise
        kept = np.mean(cv2.blur(err, (3, 3)) ** 2) / max(np.mean(err**2), 1e-6)
        smooth += kept > 0.3
    assert 10 <= smooth <= 32, smooth


def test_restore_training_chains_degradations_in_the_order_they_happen(train_crops, monkeypatch):
    """restore's training inputs combine blur, down-up, noise and a real encoder (video or
    JPEG), each drawn on its own, always in that order; the fixed evaluation input is the
    MIX chain: x2 down-up, sigma 10, libx264 at CRF 32."""
    from models.training import degrade as D

    calls: list[str] = []
    for name in ("motion_blur", "down_up", "gaussian_noise", "poisson_noise", "video_codec", "jpeg_anywhere"):
        fn = getattr(D, name)
        monkeypatch.setattr(D, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    stage = {"motion_blur": 0, "down_up": 1, "gaussian_noise": 2, "poisson_noise": 2, "video_codec": 3,
             "jpeg_anywhere": 3}
    crop = np.ascontiguousarray(train_crops[2][:64, :64])
    seen: dict[str, int] = {}
    for seed in range(60):
        calls.clear()
        D.degrade("restore", crop, np.random.default_rng(seed))
        order = [stage[c] for c in calls]
        assert order == sorted(order), calls
        for c in set(calls):
            seen[c] = seen.get(c, 0) + 1
        seen["combined"] = seen.get("combined", 0) + (len(set(order)) >= 2)
    assert seen["video_codec"] >= 15 and seen["jpeg_anywhere"] >= 6 and seen["down_up"] >= 15, seen
    assert seen["gaussian_noise"] >= 15 and seen["poisson_noise"] >= 3 and seen["combined"] >= 25, seen
    calls.clear()
    D.degrade_eval("restore", crop, np.random.default_rng(0))
    assert calls == ["down_up", "gaussian_noise", "video_codec"]


def test_denoise_eval_is_noise_jpeg_and_h264_in_equal_shares(train_crops):
    """denoise's fixed evaluation: per crop, Gaussian sigma 25, JPEG q20 or a real libx264 encode
    at CRF 40, about a third each, the same for the same seed."""
    from models.training.degrade import jpeg, video_codec

    flat = np.full((128, 128, 3), 128, np.uint8)
    kinds = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        kind = rng.random()
        img = train_crops[seed % len(train_crops)]
        out = degrade_eval("denoise", img, np.random.default_rng(seed)).image
        assert np.array_equal(out, degrade_eval("denoise", img, np.random.default_rng(seed)).image)
        if kind < 1 / 3:
            noisy = degrade_eval("denoise", flat, np.random.default_rng(seed)).image.astype(float)
            assert abs(noisy.std() - 25) < 0.5
            kinds.append("noise")
        elif kind < 2 / 3:
            assert np.array_equal(out, jpeg(img, 20))
            kinds.append("jpeg")
        else:
            assert np.array_equal(out, video_codec(img, rng, codec="libx264", quality=40.0))  # rng: after the draw
            kinds.append("h264")
    assert all(12 <= kinds.count(k) <= 28 for k in ("noise", "jpeg", "h264")), kinds


def test_masks_cover_nose_and_mouth(train_crops):
    from pipeline.align import template

    t = np.round(template(128)).astype(int)
    for seed in range(20):
        d = degrade("unmask", train_crops[seed % len(train_crops)], np.random.default_rng(seed))
        assert d.mask is not None and d.mask.shape == (128, 128)
        for x, y in t[2:]:  # nose tip, mouth corners
            assert d.mask[y, x] == 255, f"seed {seed}: landmark ({x}, {y}) not covered"
        for x, y in t[:2]:  # eyes stay visible
            assert d.mask[y, x] == 0, f"seed {seed}: eye ({x}, {y}) covered"


def test_lower_face_occluders_cover_mouth_and_chin_not_the_nose_bridge(train_crops):
    """--occluders P: a share of unmask's training masks are flat lower-face polygons whose top
    lies between the nose tip and the lips (the data README's kind of mask), drawn from the same
    seeded generator: same seed, same occluder; the Batches share comes out as given."""
    from models.training.batches import Batches
    from models.training.degrade import apply_mask
    from pipeline.align import template

    t = template(128)
    ed = np.linalg.norm(t[1] - t[0])
    mouth_y = (t[3][1] + t[4][1]) / 2
    bridge = np.round([(t[0][0] + t[1][0]) / 2, t[2][1] - 0.3 * ed]).astype(int)
    chin = np.round([(t[0][0] + t[1][0]) / 2, mouth_y + 0.25 * ed]).astype(int)
    tops = []
    for seed in range(24):
        crop = train_crops[seed % len(train_crops)]
        d = apply_mask(crop, np.random.default_rng(seed), occluder=True)
        again = apply_mask(crop, np.random.default_rng(seed), occluder=True)
        assert np.array_equal(d.image, again.image) and np.array_equal(d.mask, again.mask)
        assert d.mask[chin[1], chin[0]] == 255, f"seed {seed}: chin not covered"
        assert d.mask[bridge[1], bridge[0]] == 0, f"seed {seed}: nose bridge covered"
        for x, y in np.round(t[:2]).astype(int):
            assert d.mask[y, x] == 0, f"seed {seed}: eye covered"
        diff = np.abs(d.image.astype(int) - crop).max(axis=2)
        assert (diff[d.mask == 255] > 0).mean() > 0.9 and diff[d.mask == 0].max() <= 8  # soft edge
        tops.append(np.nonzero(d.mask[:, 40:88].any(axis=1))[0].min())
    assert np.ptp(tops) > 0.3 * (mouth_y - t[2][1])  # the top edge varies, nose tip to lips
    clean, bad, mask = Batches("unmask", train_crops, 128, 64, seed=0, occluders=0.5).next()
    covers_bridge = mask[:, bridge[1], bridge[0]] == 255
    assert 16 <= (~covers_bridge).sum() <= 48  # about half are occluders, the rest reach the bridge


def test_alignment_jitter_moves_face_and_mask_together(train_crops):
    """Unmask's alignment jitter warps the clean crop, the masked crop and the mask with one
    transform: the mask leaves its template place, and it still marks exactly the pixels where
    the masked crop differs from the clean one."""
    from models.training.batches import jitter_alignment

    moved = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        crop = train_crops[seed % len(train_crops)]
        d = degrade("unmask", crop, rng)
        clean, bad, mask = jitter_alignment(crop, d.image, d.mask, rng)
        assert clean.shape == bad.shape == crop.shape and mask.shape == d.mask.shape
        assert clean.dtype == bad.dtype == mask.dtype == np.uint8
        diff = np.abs(clean.astype(int) - bad.astype(int)).max(axis=2)
        inside, outside = mask == 255, mask == 0
        assert (diff[inside] > 0).mean() > 0.9, seed  # the mask covers changed pixels...
        assert diff[outside].max() <= 8, seed  # ...and outside it only its soft edge (< 6 levels)
        ys, xs = np.nonzero(d.mask == 255)
        ys2, xs2 = np.nonzero(inside)
        moved += np.hypot(xs.mean() - xs2.mean(), ys.mean() - ys2.mean()) > 1.0
    assert moved >= 8  # the mask is off its template place in most draws


def test_a_small_face_is_softened_with_its_mask_by_one_draw(train_crops, monkeypatch):
    """``--small``: a face in a video frame is enlarged to the crop with the mask on it, so the
    clean face, the masked face and the mask are softened by the same draw: the two faces still
    agree away from the mask, the mask's edges are as soft as the face, and the share asked
    for comes out softened."""
    from models.training.batches import Batches, soften_together

    def lap(img) -> float:  # high-frequency energy
        return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())

    for seed in range(6):
        rng = np.random.default_rng(seed)
        crop = train_crops[seed % len(train_crops)]
        d = degrade("unmask", crop, rng)
        clean, bad, mask = soften_together(rng, crop, d.image, d.mask)
        assert clean.shape == crop.shape and bad.shape == crop.shape and mask.shape == d.mask.shape
        far = cv2.dilate((d.mask > 0).astype(np.uint8), np.ones((25, 25), np.uint8)) == 0
        assert np.abs(clean.astype(int) - bad.astype(int)).max(axis=2)[far].max() <= 2, seed  # one draw
        assert lap(clean) < 0.7 * lap(crop) and lap(bad) < 0.7 * lap(d.image), seed  # softened
        assert 0 < ((mask > 0) & (mask < 255)).sum() > ((d.mask > 0) & (d.mask < 255)).sum(), seed  # soft edges
    from models.training import batches

    calls = []

    def counted(rng, *images):
        calls.append(len(images))
        return soften_together(rng, *images)

    monkeypatch.setattr(batches, "soften_together", counted)
    Batches("unmask", train_crops, 128, 64, seed=0, small=0.5).next()
    assert 16 <= len(calls) <= 48 and set(calls) == {3}  # about half the faces, each with its mask


def test_photo_edge_reflects_the_masked_face_below_the_photos_last_row(train_crops):
    """A face at a photo's bottom edge, as the product crops it: warp_face fills the crop below
    the photo by reflection, and the mask, being on the photo, is reflected with it. photo_edge
    gives the clean crop, the masked crop and the mask exactly OpenCV's BORDER_REFLECT101 of
    their rows above a random last row under the mouth; Batches applies it to the share
    asked."""
    from models.training.batches import EDGE_FROM, Batches, photo_edge

    rows, mirrored = set(), 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        crop = train_crops[seed % len(train_crops)]
        d = degrade("unmask", crop, rng)
        state = rng.bit_generator.state
        clean, bad, mask = photo_edge(crop, d.image, d.mask, rng)
        rng.bit_generator.state = state
        r = int(rng.integers(int(EDGE_FROM * 128), 128))  # the last row it drew
        rows.add(r)
        for got, src in ((clean, crop), (bad, d.image), (mask, d.mask)):
            want = cv2.copyMakeBorder(src[:r], 0, 128 - r, 0, 0, cv2.BORDER_REFLECT_101)
            assert np.array_equal(got, want), seed
        mirrored += bool(mask[r:].any())  # the mask shows again under the photo's edge
    assert len(rows) >= 4 and mirrored >= 4
    clean, _, _ = Batches("unmask", train_crops, 128, 64, seed=0, edge=0.5).next()

    def cut(c: np.ndarray) -> bool:
        return any(np.array_equal(c, cv2.copyMakeBorder(c[:r], 0, 128 - r, 0, 0, cv2.BORDER_REFLECT_101))
                   for r in range(int(EDGE_FROM * 128), 127))

    assert 16 <= sum(map(cut, clean)) <= 48  # about half of the faces are cut


def test_a_crop_pack_round_trips_and_trains(train_crops, tmp_path):
    """``models.training.data pack``: validation crops first, then as many training crops as
    fit the size limit, as near-lossless JPEGs; training reads a pack like the cache."""
    crops = np.concatenate([train_crops, train_crops[:, :, ::-1]])  # 2x the faces, mirrored
    items = [{"file": f"f{i}.jpg", "val": i % 4 == 0} for i in range(len(crops))]
    n_val = sum(it["val"] for it in items)
    small = D.pack_crops(crops, items, tmp_path / "small.npz", max_mib=0.06 + 0.008 * n_val + 0.04)
    full = D.pack_crops(crops, items, tmp_path / "full.npz", max_mib=5)
    assert full["val"] == n_val and full["train"] == full["of_train"] == len(crops) - n_val
    assert 0 < small["train"] < full["train"] and small["mib"] <= 0.06 + 0.008 * n_val + 0.04
    got, got_items = D.load_pack(tmp_path / "full.npz")
    assert got.shape == crops.shape and got.dtype == np.uint8
    order = [i for i, it in enumerate(items) if it["val"]] + [i for i, it in enumerate(items) if not it["val"]]
    assert [it["file"] for it in got_items] == [items[i]["file"] for i in order]
    err = (got.astype(float) - crops[order]) ** 2
    assert 10 * np.log10(255**2 / err.mean()) > 38  # near-lossless training targets
    val, _ = D.load_cache("val", tmp_path / "full.npz")
    assert len(val) == n_val
    cfg = TrainConfig(task="enhance", steps=2, out=str(tmp_path / "run"), val_count=4, threads=2,
                      crops=str(tmp_path / "full.npz"))
    assert train(cfg)["step"] == 2
    from models.training.train import main as train_main

    with pytest.raises(SystemExit, match="no such crop pack"):  # one line, nothing written
        train_main(["--task", "enhance", "--steps", "1", "--crops", str(tmp_path / "none.npz"),
                    "--out", str(tmp_path / "run2")])
    assert not list((tmp_path / "run2").glob("*.pt"))


def test_unmask_training_keeps_a_share_of_faces_unmasked(train_crops):
    """--clean P: a share of unmask's training faces carry no mask and must come out as they
    went in, so the network learns to leave a face without a mask alone."""
    from models.training.batches import Batches

    clean, bad, mask = Batches("unmask", train_crops, 128, 64, seed=0, clean=0.25).next()
    same = np.array([np.array_equal(c, b) for c, b in zip(clean, bad)])
    assert 5 <= same.sum() <= 30  # about a quarter of 64
    assert not mask[same].any() and all(m.any() for m in mask[~same])


def test_unmask_trains_on_crops_of_several_sizes_from_a_larger_cache(detector):
    """--sizes W,...: from a cache of 256 x 320 crops (the face at about its own resolution in
    a 200 px UTKFace photo), each batch's crops are area-shrunk to one of the widths, their
    rows cut to a multiple of the network's stride: the network learns to paint a face at the
    crop size the pipeline picks for it (128, 192 or 256)."""
    from models.training.batches import Batches

    big, _ = D.make_crops(_photos(False, 6), size=256, height=320, detector=detector)
    assert big.shape[1:] == (320, 256, 3)
    b = Batches("unmask", big, 256, 4, seed=0, sizes=(128, 192, 256))
    shapes = {b.next()[0].shape[1:3] for _ in range(12)}
    assert shapes == {(160, 128), (224, 192), (320, 256)}
    clean, bad, mask = Batches("unmask", big, 256, 4, seed=1, sizes=(128,)).next()
    small, _ = D.make_crops(_photos(False, 6), size=128, height=160, detector=detector)
    assert clean.shape[1:] == small.shape[1:] and mask.shape[1:] == small.shape[1:3]
    assert mask.any() and not np.array_equal(clean, bad)


def test_local_training_keeps_a_share_of_faces_undamaged(train_crops):
    """--clean P for a local task (enhance): a share of the faces go in undamaged and must come
    out as they went in, so the network learns to leave a face that needs nothing alone."""
    from models.training.batches import Batches

    clean, bad, _ = Batches("enhance", train_crops, 64, 64, seed=0, clean=0.25).next()
    same = np.array([np.array_equal(c, b) for c, b in zip(clean, bad)])
    assert 5 <= same.sum() <= 30  # about a quarter of 64 (an x1 down-up also leaves a few alone)
    plain, bad0, _ = Batches("enhance", train_crops, 64, 64, seed=0).next()
    assert sum(np.array_equal(c, b) for c, b in zip(plain, bad0)) < same.sum()


def test_unmask_training_softens_a_share_of_faces_as_video_shows_them(train_crops):
    """--soft P: a share of unmask's training faces are softened (down-up, some motion-blurred)
    before the mask is drawn, the target softened alike: the network learns to paint a soft face
    where it would leave the mask. Same seed, same batch; the mask still drawn sharp."""
    import cv2

    from models.training.batches import Batches

    def sharpness(imgs) -> np.ndarray:
        return np.array([cv2.Laplacian(cv2.cvtColor(i, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for i in imgs])

    plain, _, _ = Batches("unmask", train_crops, 128, 64, seed=0).next()
    half, bad, mask = Batches("unmask", train_crops, 128, 64, seed=0, soft=0.5).next()
    again, _, _ = Batches("unmask", train_crops, 128, 64, seed=0, soft=0.5).next()
    every, _, _ = Batches("unmask", train_crops, 128, 64, seed=0, soft=1.0).next()
    assert np.array_equal(half, again)
    s_plain, s_half, s_every = (np.median(sharpness(b)) for b in (plain, half, every))
    assert s_every < 0.4 * s_plain and s_every < s_half < s_plain
    assert all(m.any() for m in mask)
    soft = half
    outside = mask == 0  # the target is the softened face: outside the mask the input is it
    assert max(np.abs(b[o].astype(int) - c[o]).max() for b, c, o in zip(bad, soft, outside)) <= 6


def test_training_faces_at_other_scales(train_crops):
    """--scale LO,HI: each face is rescaled before its patch is cut and degraded, as video shows
    faces at every size and the pipeline restores a local task's face at its own scale. Patches
    keep the preset size; halved faces carry more detail per pixel, doubled ones less; the same
    seed gives the same batch; a bad range is one line."""
    import cv2

    from models.training.batches import Batches
    from models.training.train import main as train_main

    def detail(imgs) -> float:
        return float(np.median([cv2.Laplacian(cv2.cvtColor(i, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
                                for i in imgs]))

    got = {f: Batches("denoise", train_crops, 64, 48, seed=0, scale=(f, f)).next() for f in (0.5, 1.0, 2.0)}
    for clean, bad, mask in got.values():
        assert clean.shape == bad.shape == (48, 64, 64, 3) and mask is None
    assert detail(got[0.5][0]) > 1.5 * detail(got[1.0][0]) > 1.5 * detail(got[2.0][0])
    again = Batches("denoise", train_crops, 64, 48, seed=0, scale=(0.5, 2.0)).next()
    assert np.array_equal(again[1], Batches("denoise", train_crops, 64, 48, seed=0, scale=(0.5, 2.0)).next()[1])
    with pytest.raises(SystemExit, match="--scale 2,1"):
        train_main(["--task", "denoise", "--steps", "1", "--scale", "2,1"])


def test_unmask_trains_on_the_products_taller_crop(train_crops, detector, tmp_path):
    """The product runs unmask on 128 x 160 crops (the square template crop and 32 rows below
    it, where the chin and the mask's lower edge are). Crops built that tall are the square ones
    with those rows added; a mask drawn in them has the same shape as in the square crop (same
    seed) with its lower edge and the neck under it in view; training reads such crops and says
    so in its card."""
    from models.training.batches import Batches
    from models.training.degrade import apply_mask

    tall, kept = D.make_crops(_photos(False, 10), height=160, detector=detector)
    assert tall.shape[1:] == (160, 128, 3) and len(tall) == len(train_crops)
    assert np.array_equal(tall[:, :128], train_crops)
    below = 0
    for seed in range(12):
        crop = tall[seed % len(tall)]
        for occluder in (False, True):
            d = apply_mask(crop, np.random.default_rng(seed), occluder=occluder)
            sq = apply_mask(crop[:128], np.random.default_rng(seed), occluder=occluder)
            assert d.image.shape == crop.shape and d.mask.shape == (160, 128)
            # the same shape (OpenCV's clipping may step a hard polygon edge by one pixel)
            assert (d.mask[:128] != sq.mask).mean() < 0.005, seed
            diff = np.abs(d.image.astype(int) - crop).max(axis=2)
            assert diff[d.mask == 0].max() <= 8  # pixels change under the mask (and its soft edge)
            rows = np.nonzero(d.mask[:, 56:72].any(axis=1))[0]
            assert rows.max() < 150, seed  # the lower edge is in view, with the neck under it
            below += rows.max() >= 120
    assert below >= 12  # ...and it often lies at or past the square crop's bottom row
    items = [{"file": f"f{i}.jpg", "val": i < 2} for i in range(len(tall))]  # a pack keeps them
    D.pack_crops(tall, items, tmp_path / "tall.npz", max_mib=5)
    assert D.load_pack(tmp_path / "tall.npz")[0].shape == tall.shape
    clean, bad, mask = Batches("unmask", tall, 128, 8, seed=0, jitter=1.0, occluders=0.5).next()
    assert clean.shape == bad.shape == (8, 160, 128, 3) and mask.shape == (8, 160, 128)
    mixed = Batches("unmask", tall, 128, 2, seed=0, square=0.5)  # --square: both shapes
    heights = [mixed.next()[0].shape[1] for _ in range(16)]
    assert set(heights) == {128, 160} and 4 <= heights.count(128) <= 12
    cfg = TrainConfig(task="unmask", steps=2, out=str(tmp_path / "run"), export=True,
                      export_dir=str(tmp_path / "w"), val_count=2, threads=2, jitter=0.5, square=0.5)
    assert train(cfg, train_crops=tall[2:], val_crops=tall[:2])["step"] == 2
    card = json.loads((tmp_path / "w" / "unmask.json").read_text())
    assert card["validation"]["crop"] == "128x160" and "rows below" in card["data"]["source"]
    assert "cut to the square" in card["training"]["augment"]


# ----------------------------------------------------------------------------------- training


@pytest.mark.parametrize("task", TASKS)
def test_two_training_steps_export_loadable_weights(task, train_crops, tmp_path):
    cfg = TrainConfig(task=task, steps=2, out=str(tmp_path / "run"), export=True,
                      export_dir=str(tmp_path / "w"), val_count=4, threads=2,
                      jitter=1.0 if task == "unmask" else 0.0,
                      occluders=0.5 if task == "unmask" else 0.0,
                      l2_weight=10.0 if task == "enhance" else 0.0)
    state = train(cfg, train_crops=train_crops[4:], val_crops=train_crops[:4])
    assert state["step"] == 2
    assert (tmp_path / "run" / "last.pt").is_file()
    net = load_net(tmp_path / "w" / f"{task}.safetensors")
    card = json.loads((tmp_path / "w" / f"{task}.json").read_text())
    assert card["training"]["steps"] == 2 and card["validation"]["n"] == 4
    assert ("alignment jitter" in card["training"]["augment"]) == (task == "unmask")
    assert bool(card["training"]["occluders"]) == (task == "unmask")
    assert ("squared error" in card["training"]["loss"]) == (task == "enhance")
    with torch.no_grad():
        assert net(torch.rand(1, 3, 128, 128)).shape == (1, 3, 128, 128)
    from models.training.card import check_file_fields, sha256_file

    assert card["weights_sha256"] == sha256_file(tmp_path / "w" / f"{task}.safetensors")
    assert len(card["history"]) == 1 and check_file_fields(card) == []
    if task == "denoise":  # resuming continues from the checkpoint, the same run in the history
        cfg.steps = 3
        assert train(cfg, train_crops=train_crops[4:], val_crops=train_crops[:4])["step"] == 3
        card = json.loads((tmp_path / "w" / f"{task}.json").read_text())
        assert len(card["history"]) == 1 and card["history"][0]["change"] == "trained 3 steps"


def test_adversarial_term_sees_only_the_painted_area():
    from models.training.adversarial import PatchDiscriminator, d_loss, g_loss

    torch.manual_seed(0)
    disc = PatchDiscriminator()
    real, fake = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64, requires_grad=True)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 32:, 16:48] = 1  # the lower face
    adv, fm = g_loss(disc, real, fake, mask)
    (adv + fm).backward()
    g = fake.grad.abs().sum(1)
    assert g[:, 32:, 16:48].sum() > 0  # the painted area is pushed
    assert g[:, :12].sum() == 0  # rows farther than the receptive field above it are not
    none = torch.zeros_like(mask)  # a face left unmasked teaches neither side
    assert d_loss(disc, real, fake, none).item() == 0.0 and g_loss(disc, real, fake, none)[1].item() == 0.0


def test_unmask_trains_with_a_discriminator_and_resumes_it(train_crops, tmp_path):
    cfg = TrainConfig(task="unmask", steps=2, out=str(tmp_path / "run"), export=True,
                      export_dir=str(tmp_path / "w"), val_count=4, threads=2, adv_weight=0.02,
                      fm_weight=1.0, snapshots=True)
    assert train(cfg, train_crops=train_crops[4:], val_crops=train_crops[:4])["step"] == 2
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    disc = saved["extra"]["disc"]
    assert saved["extra"]["opt_d"]["state"]  # the discriminator was stepped
    card = json.loads((tmp_path / "w" / "unmask.json").read_text())
    assert "hinge adversarial" in card["training"]["loss"]
    assert 0 < card["validation"]["sharpness"] < 5
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["step2.safetensors"]
    cfg.steps = 3
    assert train(cfg, train_crops=train_crops[4:], val_crops=train_crops[:4])["step"] == 3
    resumed = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["extra"]["disc"]
    assert any(not torch.equal(disc[k], resumed[k]) for k in disc)  # and it went on learning
    with pytest.raises(SystemExit, match="unmask only"):
        train(TrainConfig(task="denoise", steps=1, out=str(tmp_path / "d"), adv_weight=0.1),
              train_crops=train_crops[4:], val_crops=train_crops[:4])


# ----------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("task", TASKS)
def test_shipped_model_beats_degraded_input_on_held_out_faces(task, val_crops):
    r = evaluate(task, val_crops)
    assert r["n"] == 20 and r["size"] == 128
    assert r["model"]["psnr"] > r["input"]["psnr"], r


def test_model_cards_follow_one_schema():
    """Every restoration network's card has the same structured fields
    (models.training.card.check_card); every card file beside weights holds the sha256 of the
    .safetensors file as it is and a short dated history, and otherwise equals the card (or
    summary) in the weights' header; no card tells a diary."""
    from models.training.card import HISTORY_WORDS, check_card, check_file_fields, header_card, sha256_file

    restoring = [s for s in models.TASKS.values() if s.weights and not s.latent]
    assert {s.name for s in restoring} >= {"denoise", "enhance", "restore", "unmask"}
    for spec in restoring:
        card = json.loads((WEIGHTS_DIR / spec.weights).with_suffix(".json").read_text())
        assert check_card(card) == [], (spec.name, check_card(card))
    for plan in WEIGHTS_DIR.glob("*.int8.json"):  # int8 plans (models.quantize), not cards
        assert not [w for w in HISTORY_WORDS if w in plan.read_text().lower()], plan.name
    cards = sorted(p for p in WEIGHTS_DIR.glob("*.json") if not p.name.endswith(".int8.json"))
    assert {p.stem for p in cards} >= {"denoise", "enhance", "restore", "unmask", "facemath", "age"}
    for path in cards:
        text = path.read_text().lower()
        assert not [w for w in HISTORY_WORDS if w in text], path.name
        card = json.loads(path.read_text())
        weights = path.with_suffix(".safetensors")
        assert check_file_fields(card) == [], (path.name, check_file_fields(card))
        assert card["weights_sha256"] == sha256_file(weights), path.name
        meta = read_metadata(weights)
        assert json.loads(meta.get("card") or meta["summary"]) == header_card(card), path.name
    assert check_card({"task": "x", "training": {"note": "fine-tuned in session 4"}})  # it can fail
    good = {"weights_sha256": "0" * 64, "history": [{"date": "2026-11-21", "change": "trained", "score": 1.0}]}
    assert check_file_fields(good) == []
    for bad in ({**good, "weights_sha256": "abc"}, {**good, "history": []},
                {**good, "history": [{"date": "21.11.2026", "change": "trained", "score": 1.0}]},
                {**good, "history": [{"date": "2026-11-21", "change": "x" * 300, "score": 1.0}]},
                {**good, "history": [{"date": "2026-11-21", "change": "trained", "score": 1.0, "why": ""}]},
                {**good, "history": good["history"] * 7}):
        assert check_file_fields(bad), bad


def test_unmask_averages_its_network_over_the_crop_and_its_mirror(val_crops):
    """Unmask guesses what a mask hides; the product averages the network's guess on the
    aligned crop and on its mirror image (the template is left-right symmetric), so a mirrored
    masked face comes back as the mirror of the restored one, and the average scores better
    than the network's single pass."""
    model = models.load("unmask")
    bad, _ = degrade_batch("unmask", val_crops, seed=0, evaluation=True)
    x = torch.from_numpy(bad).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        y, y_mirrored = model(x), model(x.flip(-1)).flip(-1)
        single = model.net(x).clamp(0, 1)
    assert torch.allclose(y, y_mirrored, atol=1e-5)
    assert (y - single).abs().max() > 0.05  # the network alone is not symmetric

    def psnr(out):
        err = ((out.permute(0, 2, 3, 1).numpy() * 255 - val_crops) ** 2).mean(axis=(1, 2, 3))
        return float(np.mean(10 * np.log10(255.0**2 / err)))

    assert psnr(y) > psnr(single), (psnr(y), psnr(single))


@pytest.mark.parametrize("mask", ["generator", "reference"])
def test_unmask_on_whole_photos_runs_the_product_path(tmp_path, mask):
    """--whole for unmask: masks warped onto whole photos (or the README's flat polygon), then
    detection on the masked photo, alignment, the shipped network and paste-back, scored
    against the clean photo."""
    for p in _photos(True, 8):
        shutil.copy(p, tmp_path / p.name)
    r = whole_unmask(tmp_path, None, mask=mask)
    assert r["framing"] == "whole" and r["n"] >= 6 and r["size"] == 128
    assert r["input"]["psnr"] < 25, r  # the masks were drawn
    assert 0 < r["detected_masked"] <= r["n"], r
    assert r["model"]["psnr"] > r["input"]["psnr"], r


def test_unmask_paints_a_face_at_the_photos_edge_without_the_mirrored_mask():
    """Unmask's crop runs under the chin; for a face at a photo's bottom edge it reaches past the
    photo, where warp_face reflects the photo, mask included. The restorer then runs the network
    a second time with those rows refilled from the photo with the first pass pasted in: the
    network no longer sees the mask under the edge, the pixels inside the photo are the ones it
    was given the first time, and a face whose crop lies inside the photo gets one pass."""
    from models.training.evaluate import REFERENCE_COLOUR, reference_mask_photo
    from pipeline import align
    from pipeline.faces import FaceDetector
    from pipeline.restore import FaceRestorer

    rest = FaceRestorer(models.load("unmask"))
    calls = []
    run = rest._run
    rest._run = lambda crops, keys=None: calls.append([c.copy() for c in crops]) or run(crops, keys)
    detector = FaceDetector(min_face=24, **FaceDetector.MASKED)
    checked = 0
    for p in _photos(True, 6):
        photo = cv2.resize(D.read_rgb(p), (128, 128), interpolation=cv2.INTER_AREA)
        masked, _ = reference_mask_photo(photo)
        faces = detector.detect_image(masked)
        if not faces:
            continue
        a = rest.aside  # the crop: the 128 px template square, ``a`` columns each side, rows below
        m = align.aside(align.estimate_transform(faces[0].landmarks, 128), a)
        outside = align.outside_frame(m, 128 + 2 * a, 128 + rest.below, masked.shape)
        assert outside[-1].all() and not outside[40:100, a + 32 : a + 96].any()  # under the chin, not the face
        calls.clear()
        assert rest.deltas([masked], [faces[:1]])[0]
        assert len(calls) == 2
        first, second = calls[0][0], calls[1][0]
        assert np.array_equal(first[~outside], second[~outside])
        flat = lambda c: int((np.abs(c[outside].astype(int) - REFERENCE_COLOUR).max(-1) <= 6).sum())
        assert flat(first) > 300 and flat(second) < flat(first) / 50, (flat(first), flat(second))
        # the same face in a larger picture (the photo reflected around it before the mask), with
        # room for the crops of all unmask's zooms (TaskSpec.zooms)
        calls.clear()
        big = cv2.copyMakeBorder(photo, 96, 96, 96, 96, cv2.BORDER_REFLECT_101)
        big[96:224, 96:224] = masked
        face = dataclasses.replace(faces[0], box=faces[0].box + 96, landmarks=faces[0].landmarks + 96)
        assert rest.deltas([big], [[face]])[0]
        assert len(calls) == 1
        checked += 1
    assert checked >= 4


def test_a_cards_bench_rows_are_written_into_the_card_file_alone(tmp_path):
    """bench.quality's rows move with the pipeline, not with the weights: writing them into a
    card leaves the .safetensors file byte for byte as it was, and out of its header."""
    from models.training.card import check_card, quality_rows, sha256_file, write_card

    weights = tmp_path / "denoise.safetensors"
    shutil.copy(WEIGHTS_DIR / "denoise.safetensors", weights)
    shutil.copy(WEIGHTS_DIR / "denoise.json", tmp_path / "denoise.json")
    before = weights.read_bytes()
    row = {"source": "closeup", "task": "denoise", "degradation": "noise20", "input": {"psnr": 24.9, "faces": 12},
           "classical": {"psnr": 32.0, "name": "nlmeans"}, "facemend": {"psnr": 34.1, "ssim": 0.9},
           "ceiling": {"psnr": 34.0}}
    rows = quality_rows("denoise", {"command": "python -m bench.quality --json", "rows": [row]})
    card = json.loads(write_card(weights, {"quality": rows}).read_text())
    assert weights.read_bytes() == before
    assert card["quality"]["rows"][0]["facemend"] == 34.1 and card["weights_sha256"] == sha256_file(weights)
    assert "quality" not in json.loads(read_metadata(weights)["card"])
    assert check_card(card) == [] and list(card)[-1] == "history"


def test_model_card_scores_are_written_into_the_card_and_the_weights_stay(tmp_path):
    """models.training.card scores a network as the product runs it, every way its card
    reports, and --write merges the figures into the card file and the card in the safetensors
    header, leaving the tensors as they were."""
    from safetensors.torch import load_file

    from models.training.card import card_scores, header_card, sha256_file, write_card
    from models.nets import load_net
    from models.registry import Restorer
    from models.tasks import resolve

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in _photos(True, 8):
        shutil.copy(p, photos / p.name)
    weights = tmp_path / "unmask.safetensors"
    shutil.copy(WEIGHTS_DIR / "unmask.safetensors", weights)
    model = Restorer(resolve("unmask"), load_net(weights)).eval()
    r = card_scores("unmask", model, data=photos)
    assert {"evaluation", "evaluation_reference_framing", "evaluation_reference_polygon",
            "unmasked_faces"} <= set(r)
    for key in ("evaluation", "evaluation_reference_polygon"):
        assert r[key]["n"] >= 6 and r[key]["model"]["psnr"] > r[key]["baseline"]["psnr"], r[key]
    assert r["unmasked_faces"]["psnr"] > 35  # a face without a mask is left nearly as it was
    card = json.loads(write_card(weights, r).read_text())
    assert card["evaluation_reference_polygon"] == r["evaluation_reference_polygon"]
    assert card["training"] == json.loads((WEIGHTS_DIR / "unmask.json").read_text())["training"]
    assert json.loads(read_metadata(weights)["card"]) == header_card(card)
    assert card["weights_sha256"] == sha256_file(weights)  # the rewritten header's file
    before, after = load_file(str(WEIGHTS_DIR / "unmask.safetensors")), load_file(str(weights))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("whole", [False, True])
def test_evaluate_on_a_folder_without_photos_is_a_one_line_error(tmp_path, whole):
    from models.training.evaluate import main

    (tmp_path / "notes.txt").write_text("no photos here")
    for data in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit) as e:
            main(["--task", "unmask", "--data", str(data)] + (["--whole"] if whole else []))
        assert str(data) in str(e.value) and "\n" not in str(e.value)
