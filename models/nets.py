"""Residual U-Net for face restoration, and its safetensors file format.

One short file, nanoGPT style: building blocks, then the config dataclass, then the model.
The network is fully convolutional: any (B, 3, H, W) input with H and W multiples of
``net.multiple`` works. It predicts a residual that is added to its input, so an untrained
(zero-initialised tail) network is the identity.

Weights are stored as safetensors (fp16) with the config as JSON in the file's metadata; no
pickle is ever read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# ---------------------------------------------------------------------------------------------
# building blocks


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, added to the input. The second conv starts at zero."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))  # (B, C, H, W)


class Down(nn.Module):
    """Strided 3x3 convolution: halves H and W, c_in -> c_out channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))  # (B, c_out, H/2, W/2)


class Up(nn.Module):
    """1x1 convolution to 4 * c_out channels then pixel shuffle: doubles H and W."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out * 4, 1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))  # (B, c_out, 2H, 2W)


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class NetConfig:
    unshuffle: int = 2  # the stem pixel-unshuffles by this factor: all work runs at H/2 or less
    widths: tuple[int, ...] = (32, 64, 128)  # channels per level; each level below halves H, W
    enc_blocks: tuple[int, ...] = (2, 2, 4)  # residual blocks per level on the way down
    dec_blocks: tuple[int, ...] = (2, 2)  # residual blocks per level on the way up (not bottom)
    extra: dict = field(default_factory=dict)  # free-form notes (never used by the model)

    def __post_init__(self) -> None:
        self.widths, self.enc_blocks = tuple(self.widths), tuple(self.enc_blocks)
        self.dec_blocks = tuple(self.dec_blocks)
        assert len(self.enc_blocks) == len(self.widths), "one enc_blocks entry per level"
        assert len(self.dec_blocks) == len(self.widths) - 1, "one dec_blocks entry per level above the bottom"
        assert self.unshuffle >= 1, f"unshuffle must be >= 1, got {self.unshuffle}"


# ---------------------------------------------------------------------------------------------
# model


class ResUNet(nn.Module):
    """Residual U-Net: pixel-unshuffle stem, strided-conv encoder, pixel-shuffle decoder with
    additive skip connections, pixel-shuffle tail predicting a residual image."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = c = config
        u, w = c.unshuffle, c.widths
        self.multiple = int(u * 2 ** (len(w) - 1))
        self.stem = nn.Sequential(nn.PixelUnshuffle(u), nn.Conv2d(3 * u * u, w[0], 3, padding=1))
        self.enc = nn.ModuleList(
            nn.Sequential(*[ResBlock(w[i]) for _ in range(c.enc_blocks[i])]) for i in range(len(w))
        )
        self.down = nn.ModuleList(Down(w[i], w[i + 1]) for i in range(len(w) - 1))
        self.up = nn.ModuleList(Up(w[i + 1], w[i]) for i in range(len(w) - 1))
        self.dec = nn.ModuleList(
            nn.Sequential(*[ResBlock(w[i]) for _ in range(c.dec_blocks[i])]) for i in range(len(w) - 1)
        )
        tail = nn.Conv2d(w[0], 3 * u * u, 3, padding=1)
        nn.init.zeros_(tail.weight)
        nn.init.zeros_(tail.bias)
        self.tail = nn.Sequential(tail, nn.PixelShuffle(u))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(x.shape)}"
        h, w = x.shape[-2:]
        m = self.multiple
        assert h % m == 0 and w % m == 0, f"H and W must be multiples of {m}, got {h}x{w}"
        f = self.stem(x)  # (B, w0, H/u, W/u)
        skips = []
        for i, blocks in enumerate(self.enc):
            f = blocks(f)  # (B, w_i, H/(u 2^i), W/(u 2^i))
            if i < len(self.down):
                skips.append(f)
                f = self.down[i](f)  # (B, w_{i+1}, half size)
        for i in reversed(range(len(self.up))):
            f = self.up[i](f) + skips[i]  # (B, w_i, H/(u 2^i), W/(u 2^i))
            f = self.dec[i](f)
        return x + self.tail(f)  # (B, 3, H, W) residual added to the input

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# files


def save_net(net: nn.Module, path: str | Path, metadata: dict | None = None,
             fmt: str = "facemend-resunet") -> Path:
    """Write ``net`` (any module with a dataclass ``config``) as fp16 safetensors; its config,
    ``fmt`` and ``metadata`` go in the header as JSON. Written under a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    meta = {"format": fmt, "config": json.dumps(asdict(net.config))}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tmp = path.with_name(path.name + ".partial.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header metadata with its config parsed, float32 tensors) of a ``save_net`` file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors weights are loaded (never pickles)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if "config" not in meta:
            raise ValueError(f"{path}: no 'config' in the safetensors metadata")
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    meta["config"] = json.loads(meta["config"])
    return meta, state


def grow_net(path: str | Path, blocks: dict) -> ResUNet:
    """The ``save_net`` file's network with more residual blocks per level: ``blocks`` sets
    ``enc_blocks`` and/or ``dec_blocks`` (each count at least the file's). The file's weights
    fill the blocks it has; the new ones follow them and start as the identity (their second
    convolution is zero), so the grown network computes exactly what the file's did."""
    meta, state = read_weights(path)
    config = dict(meta["config"])
    for key, counts in blocks.items():
        old = config.get(key)
        if key not in ("enc_blocks", "dec_blocks") or len(counts) != len(old) or any(
                n < o for n, o in zip(counts, old)):
            raise ValueError(f"{path}: can only add blocks: {key}={counts} against the file's {old}")
        config[key] = counts
    net = ResUNet(NetConfig(**config))
    missing, unexpected = net.load_state_dict(state, strict=False)
    for key in missing:  # only the added blocks, enc.LEVEL.BLOCK.* / dec.LEVEL.BLOCK.*
        part, level, block = key.split(".")[:3]
        assert part in ("enc", "dec") and int(block) >= meta["config"][f"{part}_blocks"][int(level)], key
    assert not unexpected, unexpected
    return net.eval()


def load_net(path: str | Path, device: str | torch.device = "cpu") -> ResUNet:
    """A ResUNet from a safetensors file written by ``save_net``, float32, eval mode."""
    meta, state = read_weights(path)
    net = ResUNet(NetConfig(**meta["config"]))
    net.load_state_dict(state)
    return net.eval().to(device)
