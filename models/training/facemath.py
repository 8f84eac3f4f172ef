"""FaceMath's research commands: the attribute vectors and the measurement of the edits.

    python -m models.training.facemath attributes     # recompute them after (re)training the VAE
    python -m models.training.facemath measure --json # the age/gender shift and identity figures

``attributes`` encodes the training split with the shipped VAE and stores, beside the weights in
``models/weights/facemath.attrs.safetensors``, what the editor (``models.facemath``) reads: the
age-bin means, the linear age probe, the gender means, the fitted Gaussian of the codes and the
age gain. ``measure`` runs the product's editor on the validation split and asks the separate
age/gender judge (``models.training.age``) what changed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..facemath import AGE_EDGES, ATTRS_FILE, VAE_FILE, FaceEditor, FaceMath
from ..tasks import resolve
from ..vae import FaceVAE, load_vae
from . import data as D
from .age import load_age, predict, predict_gender
from .card import read_card_history, write_card_file
from .train_vae import load_faces, pool64, reconstruction_scores, to_tensor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# attribute vectors


@torch.no_grad()
def encode_all(vae: FaceVAE, faces64: np.ndarray, batch: int = 256) -> torch.Tensor:
    out = [vae.encode(to_tensor(faces64[i : i + batch]))[0] for i in range(0, len(faces64), batch)]
    return torch.cat(out)


def compute_attributes(codes: torch.Tensor, ages: np.ndarray, genders: np.ndarray) -> dict[str, torch.Tensor]:
    """Attribute tensors from training codes (N, latent) and their labels."""
    ages_t = torch.as_tensor(ages, dtype=torch.float32)
    centres, means, counts = [], [], []
    for lo, hi in zip(AGE_EDGES[:-1], AGE_EDGES[1:]):
        sel = (ages_t >= lo) & (ages_t < hi)
        if int(sel.sum()) < 20:  # too few faces for a stable mean
            continue
        centres.append(float(ages_t[sel].median()))
        means.append(codes[sel].mean(0))
        counts.append(int(sel.sum()))
    g = torch.as_tensor(genders)
    gender_means = torch.stack([codes[g == 0].mean(0), codes[g == 1].mean(0)])
    # ridge least squares: age ~ z . w + b
    x = torch.cat([codes, torch.ones(len(codes), 1)], 1).double()
    reg = 1e-2 * len(codes) * torch.eye(x.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    sol = torch.linalg.solve(x.T @ x + reg, x.T @ ages_t.double())
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, len(codes), (2, 4000), generator=gen)
    stranger = (codes[a] - codes[b]).norm(dim=1)
    return {
        "age_centres": torch.tensor(centres),
        "age_means": torch.stack(means),
        "age_counts": torch.tensor(counts, dtype=torch.float32),
        "age_probe_w": sol[:-1].float(),
        "age_probe_b": sol[-1:].float().reshape(()),
        "gender_means": gender_means,
        "gender_counts": torch.tensor([float((g == 0).sum()), float((g == 1).sum())]),
        "code_mean": codes.mean(0),
        "code_chol": torch.linalg.cholesky(torch.cov(codes.T.double())
                                           + 1e-6 * torch.eye(codes.shape[1], dtype=torch.float64)).float(),
        "stranger_distance": stranger.median().reshape(()),
    }


def attributes_main(out: Path = ATTRS_FILE) -> dict:
    t0 = time.time()
    vae = load_vae(VAE_FILE)
    faces, items = load_faces("train")
    codes = encode_all(vae, faces)
    ages = np.array([it["age"] for it in items], np.float32)
    genders = np.array([it["gender"] for it in items], np.int64)
    attrs = compute_attributes(codes, ages, genders)
    probe = (codes @ attrs["age_probe_w"] + attrs["age_probe_b"]).numpy()
    fm = FaceMath(vae, attrs)
    sub = codes[:: max(1, len(codes) // 4000)]
    read = [float((fm.age_of(fm.edit(sub, "age", y)) - fm.age_of(sub)).abs().mean()) for y in (30.0, -30.0)]
    attrs["age_gain"] = torch.tensor(min(4.0, 30.0 / max(1e-3, float(np.mean(read)))))
    summary = {
        "faces": len(codes), "age_bins": AGE_EDGES,
        "age_centres": [round(float(c), 1) for c in attrs["age_centres"]],
        "age_counts": [int(c) for c in attrs["age_counts"]],
        "gender_counts": [int(c) for c in attrs["gender_counts"]],
        "age_probe_train_mae_years": round(float(np.abs(probe - ages).mean()), 2),
        "age_probe_shift_at_gain_1_for_30_years": [round(r, 2) for r in read],
        "age_gain": round(float(attrs["age_gain"]), 3),
        "stranger_distance": round(float(attrs["stranger_distance"]), 3),
        "seconds": round(time.time() - t0, 1),
        "command": "python -m models.training.facemath attributes",
    }
    tmp = out.with_name(out.name + ".partial.tmp")
    save_file({k: v.contiguous() for k, v in attrs.items()}, str(tmp), metadata={"summary": json.dumps(summary)})
    history = read_card_history(out.with_suffix(".json"))
    tmp.replace(out)
    write_card_file(out, summary, history, "recomputed from the shipped VAE", f"age gain {summary['age_gain']}")
    return summary


# ---------------------------------------------------------------------------------------------
# the measurement: does the arithmetic do what it says?


@torch.no_grad()
def measure(limit: int | None = None, amounts=(30.0, -30.0)) -> dict:
    """On the validation split: VAE reconstruction PSNR, the judge's own error, and the judge's
    mean age change after ``--task age --amount A`` (the pipeline's own editor on 128 px crops)."""
    fm = FaceMath.load()
    judge = load_age()
    crops, items = D.load_cache("val")
    if limit:
        pick = np.linspace(0, len(crops) - 1, min(limit, len(crops))).astype(int)
        crops, items = crops[pick], [items[i] for i in pick]
    faces = pool64(crops)
    ages = np.array([it["age"] for it in items], np.float32)
    genders = np.array([it["gender"] for it in items])
    before = predict(judge, faces)
    out = {"n": len(faces), "reconstruction": reconstruction_scores(fm.vae, faces),
           "judge": {"mae_years": round(float(np.abs(before - ages).mean()), 2)}}
    stranger = float(fm.attrs["stranger_distance"])
    z0 = torch.cat([fm.encode(to_tensor(faces[i : i + 256])) for i in range(0, len(faces), 256)])

    def run(task: str, amount: float) -> tuple[np.ndarray, np.ndarray]:
        ed = FaceEditor(resolve(task), fm, amount=amount)
        edited = []
        for i in range(0, len(crops), 128):
            y = ed(to_tensor(crops[i : i + 128]))
            edited.append(np.clip(np.rint(y.permute(0, 2, 3, 1).numpy() * 255), 0, 255).astype(np.uint8))
        e128 = np.concatenate(edited)
        e64 = pool64(e128)
        z1 = torch.cat([fm.encode(to_tensor(e64[i : i + 256])) for i in range(0, len(e64), 256)])
        d = z1 - z0
        direction = fm.edit(z0, task, amount) - z0  # remove the component along the edit
        unit = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
        d_perp = d - (d * unit).sum(1, keepdim=True) * unit
        ident = (d_perp.norm(dim=1) / stranger).numpy()
        psnr = 10 * np.log10(255.0**2 / np.maximum(((e128.astype(np.float32) - crops) ** 2).mean((1, 2, 3)), 1e-6))
        return e64, np.stack([ident, psnr])

    out["age"] = {}
    for amount in amounts:
        e64, (ident, psnr) = run("age", amount)
        after = predict(judge, e64)
        # faces whose target age lies inside the data's range (0..85): a 20-year-old cannot
        # become 30 years younger, so that subset shows what the edit does when it can
        room = (ages + amount >= 1) & (ages + amount <= 85)
        out["age"][f"{amount:+g}"] = {
            "judge_age_change_mean": round(float((after - before).mean()), 2),
            "judge_age_change_median": round(float(np.median(after - before)), 2),
            "faces_with_room": int(room.sum()),
            "judge_age_change_mean_with_room": round(float((after - before)[room].mean()), 2) if room.any() else None,
            "identity_distance_mean": round(float(ident.mean()), 3),
            "psnr_to_original_db": round(float(psnr.mean()), 2),
        }
    out["gender"] = {}
    p0 = predict_gender(judge, faces)
    for amount in (1.0, -1.0):
        e64, (ident, psnr) = run("gender", amount)
        p1 = predict_gender(judge, e64)
        out["gender"][f"{amount:+g}"] = {
            "judge_female_prob_change_mean": round(float((p1 - p0).mean()), 3),
            "judge_female_prob_change_men": round(float((p1 - p0)[genders == 0].mean()), 3),
            "judge_female_prob_change_women": round(float((p1 - p0)[genders == 1].mean()), 3),
            "identity_distance_mean": round(float(ident.mean()), 3),
            "psnr_to_original_db": round(float(psnr.mean()), 2),
        }
    out["notes"] = {
        "identity_distance": "distance between the codes of the edited and the original face with"
                             " the edit direction projected out, in units of the median distance"
                             " between two different training faces (0 = same, 1 = a stranger);"
                             " a latent proxy, since no face-recognition network ships offline",
        "judge": "models/training/age.py, trained on the training split only; never used to make an edit",
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.training.facemath",
                                description="FaceMath attribute vectors and measurements.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("attributes", help="recompute models/weights/facemath.attrs.* from the shipped VAE")
    m = sub.add_parser("measure", help="age/gender shift and identity figures on the validation split")
    m.add_argument("--limit", type=int, default=None)
    m.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_grad_enabled(False)
    if a.cmd == "attributes":
        print(json.dumps(attributes_main(), indent=2))
    else:
        r = measure(a.limit)
        print(json.dumps(r) if a.json else json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
