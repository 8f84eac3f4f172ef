"""FaceMath's face VAE: a convolutional variational autoencoder on aligned 64x64 face crops.

One short file, like ``nets.py``: the config dataclass, the model, its safetensors format.
The encoder maps an aligned crop (the pipeline's template, warped straight to 64 px) to the mean
and log-variance of a diagonal Gaussian over a ``latent``-dimensional code; the decoder maps a
code back to a crop. Arithmetic on the codes (``models.facemath``) ages faces, changes gender
features and morphs between faces; codes drawn from the prior N(0, I) give new faces.

    vae = load_vae("models/weights/facemath.safetensors")
    mu, logvar = vae.encode(x)          # x: (B, 3, 64, 64) in [0, 1]
    y = vae.decode(mu)                  # (B, 3, 64, 64) in [0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .nets import ResBlock, read_weights, save_net


@dataclass
class VAEConfig:
    size: int = 64  # crop side; a power of two >= 16
    latent: int = 256
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # one per halving

    def __post_init__(self) -> None:
        if self.size % (2 ** len(self.widths)):
            raise ValueError(f"size {self.size} must be a multiple of 2**{len(self.widths)}")

    @property
    def bottom(self) -> int:
        """Side of the smallest feature map (size / 2**len(widths))."""
        return self.size // 2 ** len(self.widths)


class FaceVAE(nn.Module):
    """Encoder: strided 3x3 convs with a residual block per scale (from 1/4 resolution down),
    a linear layer to (mu, logvar). Decoder: the mirror, nearest-neighbour upsampling + conv,
    and a pixel-shuffle output layer."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = c = config
        w = c.widths
        enc: list[nn.Module] = []
        ch = 3
        for i, wi in enumerate(w):
            enc += [nn.Conv2d(ch, wi, 3, stride=2, padding=1), nn.SiLU()]
            if i >= 1:
                enc.append(ResBlock(wi))
            ch = wi
        self.encoder = nn.Sequential(*enc)
        flat = w[-1] * c.bottom * c.bottom
        self.to_stats = nn.Linear(flat, 2 * c.latent)
        self.from_code = nn.Linear(c.latent, flat)
        dec: list[nn.Module] = [ResBlock(w[-1])]
        for i in range(len(w) - 1, 0, -1):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(w[i], w[i - 1], 3, padding=1), nn.SiLU(), ResBlock(w[i - 1])]
        dec += [nn.Conv2d(w[0], 3 * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> mu, logvar, each (B, latent)."""
        h = self.encoder(x * 2.0 - 1.0).flatten(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 2.0)  # std <= e: a wild sample cannot blow up the decoder

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) -> (B, 3, S, S) in [0, 1]."""
        c = self.config
        h = self.from_code(z).view(z.shape[0], c.widths[-1], c.bottom, c.bottom)
        return (self.decoder(h) * 0.5 + 0.5).clamp(0.0, 1.0)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output before clamping (training loss uses this)."""
        c = self.config
        h = self.from_code(z).view(z.shape[0], c.widths[-1], c.bottom, c.bottom)
        return self.decoder(h) * 0.5 + 0.5

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction (unclamped), mu, logvar. sample=False decodes the mean."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decode_raw(z), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per sample, summed over the code, (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def sharpen(x: torch.Tensor, amount: float = 0.8, sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask for decoder output: x + amount * (x - gaussian_blur(x)), clamped to [0, 1]."""
    k = int(2 * round(3 * sigma) + 1)
    t = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    pad = F.pad(x, (k // 2,) * 4, mode="reflect")
    blur = F.conv2d(pad, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    blur = F.conv2d(blur, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return (x + amount * (x - blur)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# safetensors format (no pickle)


def save_vae(vae: FaceVAE, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``vae`` as fp16 safetensors with its config (JSON) in the header."""
    return save_net(vae, path, metadata, fmt="facemend-vae")


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> FaceVAE:
    """A FaceVAE from a safetensors file written by ``save_vae``, float32, eval mode."""
    meta, state = read_weights(path)
    if meta.get("format") != "facemend-vae":
        raise ValueError(f"{path}: not a facemend VAE (format {meta.get('format')!r})")
    vae = FaceVAE(VAEConfig(**meta["config"]))
    vae.load_state_dict(state)
    return vae.eval().to(device)
