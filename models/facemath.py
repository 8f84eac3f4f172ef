"""FaceMath: arithmetic on the face VAE's codes: ageing, gender features, morphs, random faces.

Attribute vectors come from UTKFace's labels (age and gender from the file names), averaged over
the codes of the training split and stored beside the weights in
``models/weights/facemath.attrs.safetensors``:

    python -m models.facemath attributes     # recompute them after (re)training the VAE
    python -m models.facemath measure --json # the age/gender shift and identity figures

Ageing is the seed's formula ``z - mean(z | age a) + mean(z | age b)``: ``a`` is the face's age
as read off its code (a least-squares probe fitted on the same labels), ``b = a + amount``, and
``mean(z | age)`` is interpolated between age-bin means. Gender adds ``amount`` times the
difference of the female and male means (positive: toward the female mean).

The editor never pastes the decoder's (blurry) face: it adds ``decode(z') - decode(z)``, the
change the arithmetic makes, to the real crop, so every detail the edit does not touch stays.
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from .tasks import TaskSpec, resolve
from .vae import FaceVAE, load_vae, sharpen

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VAE_FILE = WEIGHTS_DIR / "facemath.safetensors"
ATTRS_FILE = WEIGHTS_DIR / "facemath.attrs.safetensors"
# age bins (years): [0,3) [3,10) [10,16) [16,20) [20,25) [25,30) [30,40) ... [80,121)
AGE_EDGES = (0, 3, 10, 16, 20, 25, 30, 40, 50, 60, 70, 80, 121)


class FaceMath:
    """The VAE and its attribute vectors on one device."""

    def __init__(self, vae: FaceVAE, attrs: dict[str, torch.Tensor]) -> None:
        self.vae = vae
        self.device = next(vae.parameters()).device
        self.attrs = {k: v.to(self.device) for k, v in attrs.items()}
        self.size = vae.config.size

    @classmethod
    def load(cls, device: str | torch.device = "cpu", vae_path: Path = VAE_FILE,
             attrs_path: Path = ATTRS_FILE) -> "FaceMath":
        if not Path(vae_path).is_file():
            raise FileNotFoundError(f"{vae_path}: FaceMath VAE weights are missing")
        if not Path(attrs_path).is_file():
            raise FileNotFoundError(f"{attrs_path}: attribute vectors missing; run python -m models.facemath attributes")
        with safe_open(str(attrs_path), framework="pt") as f:
            attrs = {k: f.get_tensor(k).float() for k in f.keys()}
        return cls(load_vae(vae_path, device), attrs)

    # -- codes ------------------------------------------------------------------------------
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Crops (B, 3, S, S) of any size that is a multiple of the VAE's -> its size, by area."""
        return x if x.shape[-1] == self.size else F.adaptive_avg_pool2d(x, self.size)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Crops in [0, 1] -> codes (the posterior means), (B, latent)."""
        return self.vae.encode(self.pool(x.float()))[0]

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, crisp: bool = False) -> torch.Tensor:
        y = self.vae.decode(z)
        return sharpen(y) if crisp else y

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, temperature: float = 0.8, crisp: bool = False,
               prior: str = "fitted") -> torch.Tensor:
        """``n`` new faces, (n, 3, S, S) in [0, 1], decoded from random codes.

        prior "fitted" (default): a Gaussian fitted to the training faces' codes (mean and full
        covariance, stored with the attributes). With the light KL weight this VAE is trained
        with, the codes of real faces do not fill N(0, I), and codes drawn from the fitted
        Gaussian decode to faces where N(0, I) draws often do not (ex-post density estimation,
        Ghosh et al. 2020). prior "standard": N(0, I). ``temperature`` scales the spread."""
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(n, self.vae.config.latent, generator=g) * temperature
        if prior == "standard":
            z = eps
        elif prior == "fitted":
            z = self.attrs["code_mean"].cpu() + eps @ self.attrs["code_chol"].cpu().T
        else:
            raise ValueError(f"unknown prior {prior!r}; choose fitted or standard")
        return self.decode(z.to(self.device), crisp=crisp)

    # -- attributes -------------------------------------------------------------------------
    def age_of(self, z: torch.Tensor) -> torch.Tensor:
        """The age (years) the linear probe reads off each code, (B,)."""
        a = self.attrs
        return z @ a["age_probe_w"] + a["age_probe_b"]

    def mean_at_age(self, age: torch.Tensor) -> torch.Tensor:
        """mean(z | age), interpolated linearly between the age bins' centres, (B, latent)."""
        c, m = self.attrs["age_centres"], self.attrs["age_means"]
        age = age.clamp(float(c[0]), float(c[-1]))
        hi = torch.searchsorted(c, age.contiguous()).clamp(1, len(c) - 1)
        lo = hi - 1
        t = ((age - c[lo]) / (c[hi] - c[lo])).unsqueeze(1)
        return m[lo] * (1 - t) + m[hi] * t

    def age_delta(self, z: torch.Tensor, years: float) -> torch.Tensor:
        """gain * (mean(z | age b) - mean(z | age a)), a = the code's age, b = a + years.

        ``age_gain`` (stored with the attributes) undoes the shrinkage of bin means: it is set
        so that, over the training codes, the probe reads the edited codes as ``years`` older."""
        c = self.attrs["age_centres"]
        a = self.age_of(z).clamp(float(c[0]), float(c[-1]))
        gain = self.attrs.get("age_gain", torch.tensor(1.0))
        return gain * (self.mean_at_age(a + years) - self.mean_at_age(a))

    def gender_delta(self, z: torch.Tensor, amount: float) -> torch.Tensor:
        g = self.attrs["gender_means"]
        return (amount * (g[1] - g[0])).expand_as(z)

    def edit(self, z: torch.Tensor, task: str, amount: float) -> torch.Tensor:
        if task == "age":
            return z + self.age_delta(z, amount)
        if task == "gender":
            return z + self.gender_delta(z, amount)
        raise ValueError(f"task {task!r} is not a FaceMath edit; choose age or gender")


class FaceEditor(nn.Module):
    """A latent edit (``age`` or ``gender``) shaped like a ``models.Restorer``: crops in, crops out.

    ``forward(x, keys)`` takes (B, 3, S, S) crops in [0, 1] and returns them plus the upsampled
    change ``decode(edit(z)) - decode(z)``. ``keys`` (a face-track id per crop, -1 for none)
    smooths each track's code over time with an exponential moving average, so an edited video
    does not flicker; ``reset()`` forgets the tracks (call it per video).
    """

    uses_tracks = True

    def __init__(self, spec: TaskSpec, fm: FaceMath, *, amount: float, crisp: bool = False,
                 smoothing: float = 0.6) -> None:
        super().__init__()
        self.spec, self.fm, self.amount, self.crisp, self.smoothing = spec, fm, float(amount), crisp, smoothing
        self.net = fm.vae  # not None: the pipeline treats this as a learned task
        self._codes: dict = {}

    @property
    def task(self) -> str:
        return self.spec.name

    multiple = 1

    def reset(self) -> None:
        self._codes.clear()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, keys: list | None = None) -> torch.Tensor:
        x = x.float()
        z = self.fm.encode(x)
        if keys is not None and self.smoothing > 0:
            rows = []
            for i, k in enumerate(keys):
                if k is not None and k != -1:
                    prev = self._codes.get(k)
                    zi = z[i] if prev is None else self.smoothing * prev + (1 - self.smoothing) * z[i]
                    self._codes[k] = zi
                    rows.append(zi)
                else:
                    rows.append(z[i])
            z = torch.stack(rows)
        z2 = self.fm.edit(z, self.spec.name, self.amount)
        after, before = self.fm.decode(torch.cat([z2, z]), crisp=self.crisp).chunk(2)
        change = after - before
        if change.shape[-1] != x.shape[-1]:
            change = F.interpolate(change, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (x + change).clamp(0.0, 1.0)


def load_editor(task: str, device="cpu", *, amount: float | None = None, sharpen: bool = False) -> FaceEditor:
    spec = resolve(task)
    if amount is None:
        amount = spec.default_amount
    return FaceEditor(spec, FaceMath.load(device), amount=amount, crisp=sharpen)


# ---------------------------------------------------------------------------------------------
# attribute vectors


@torch.no_grad()
def encode_all(vae: FaceVAE, faces64: np.ndarray, batch: int = 256) -> torch.Tensor:
    from .train_vae import to_tensor

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
    from .train_vae import load_faces

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
        "command": "python -m models.facemath attributes",
    }
    tmp = out.with_name(out.name + ".partial.tmp")
    save_file({k: v.contiguous() for k, v in attrs.items()}, str(tmp), metadata={"summary": json.dumps(summary)})
    tmp.replace(out)
    out.with_name(out.name.replace(".safetensors", ".json")).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# the measurement: does the arithmetic do what it says?


@torch.no_grad()
def measure(limit: int | None = None, amounts=(30.0, -30.0)) -> dict:
    """On the validation split: VAE reconstruction PSNR, the judge's own error, and the judge's
    mean age change after ``--task age --amount A`` (the pipeline's own editor on 128 px crops)."""
    from . import data as D
    from .age import load_age, predict, predict_gender
    from .train_vae import pool64, reconstruction_scores, to_tensor

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
        "judge": "models/age.py, trained on the training split only; never used to make an edit",
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="FaceMath attribute vectors and measurements.")
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
