"""FaceMath: arithmetic on the face VAE's codes: ageing, gender features, morphs, random faces.

Attribute vectors come from UTKFace's labels (age and gender from the file names), averaged over
the codes of the training split and stored beside the weights in
``models/weights/facemath.attrs.safetensors``:

    python -m models.training.facemath attributes     # recompute them after (re)training the VAE
    python -m models.training.facemath measure --json # the age/gender shift and identity figures

Ageing is the seed's formula ``z - mean(z | age a) + mean(z | age b)``: ``a`` is the face's age
as read off its code (a least-squares probe fitted on the same labels), ``b = a + amount``, and
``mean(z | age)`` is interpolated between age-bin means. Gender adds ``amount`` times the
difference of the female and male means (positive: toward the female mean).

The editor never pastes the decoder's (blurry) face: it adds ``decode(z') - decode(z)``, the
change the arithmetic makes, to the real crop, so every detail the edit does not touch stays.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
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
            raise FileNotFoundError(f"{attrs_path}: attribute vectors missing; run python -m models.training.facemath attributes")
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
