"""An adversarial and feature-matching term for unmask, so the painted lower face carries skin
and mouth texture instead of the smooth mean an L1/SSIM loss pays for.

A small patch discriminator (spectral-normalised convolutions, hinge loss) judges patches of
about 46 px of the network's output against the clean crops. Only the painted area counts: each
logit and each feature is weighted by the share of masked pixels under it, so a face left
unmasked, or the forehead, teaches neither side anything. The generator's term is the hinge
adversarial loss plus feature matching (L1 between the discriminator's features of the output
and of the clean crop, as pix2pixHD), which keeps it near the target while the discriminator
asks for texture. Everything here is trained from scratch: no pretrained feature network is
downloaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions (LeakyReLU 0.2) down to 1/8 of the input, then a 3x3 convolution
    to one logit per patch. Returns (logits (B, 1, H/8, W/8), the hidden features)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers.append(spectral_norm(nn.Conv2d(c, w, 4, stride=2, padding=1)))
            c = w
        self.convs = nn.ModuleList(layers)
        self.head = spectral_norm(nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        x = x * 2 - 1  # [0, 1] -> [-1, 1]
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x)
        return self.head(x), feats


def _weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The share of masked pixels under each cell of ``like`` (B, 1, h, w)."""
    return F.adaptive_avg_pool2d(mask, like.shape[-2:])


def _mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / (w.sum() * x.shape[1] + 1e-6)


def d_loss(disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss over the masked area: clean crops up, outputs down."""
    lr, _ = disc(real)
    lf, _ = disc(fake.detach())
    w = _weights(mask, lr)
    return _mean(F.relu(1 - lr), w) + _mean(F.relu(1 + lf), w)


def g_loss(disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor,
           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's (adversarial, feature-matching) terms over the masked area."""
    lf, ff = disc(fake)
    with torch.no_grad():
        _, fr = disc(real)
    adv = -_mean(lf, _weights(mask, lf))
    fm = sum(_mean((a - b).abs(), _weights(mask, a)) for a, b in zip(ff, fr)) / len(ff)
    return adv, fm
