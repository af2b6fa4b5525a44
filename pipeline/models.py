"""Residual restoration networks: DnCNN (Zhang et al., 2017) and a residual-block network.

Both learn the correction, not the image. DnCNN predicts the noise F(x) of the whole image
and returns x - F(x); the residual-block network stacks blocks y = h + G(h) and adds a
global skip, returning x + F(x). Reads top to bottom: configs, blocks, networks, registry.
Training presets (which architecture, how large) are in pipeline/config.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# --- configs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DnCNNConfig:
    channels: int = 1  # 1 for gray, 3 for colour (alpha is never fed to the model)
    depth: int = 17  # conv layers in all; the paper uses 17 for known-sigma denoising, 20 for blind
    width: int = 64  # feature channels of the hidden layers
    batch_norm: bool = True  # the paper's BN between conv and ReLU in the hidden layers

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"DnCNN channels must be 1 (gray) or 3 (colour), got {self.channels}")
        if self.depth < 3:
            raise ValueError(f"DnCNN depth must be >= 3 (first, hidden and last layer), got {self.depth}")
        if self.width < 1:
            raise ValueError(f"DnCNN width must be positive, got {self.width}")


@dataclass(frozen=True)
class ResNetConfig:
    channels: int = 1  # 1 for gray, 3 for colour
    blocks: int = 8  # residual blocks between the head and tail convolutions
    width: int = 64  # feature channels inside the blocks
    residual_scale: float = 1.0  # scales each block's branch; < 1 steadies very deep stacks (EDSR uses 0.1)
    unshuffle: int = 1  # work at 1/s resolution (pixel-unshuffle, as FFDNet): s^2 less compute, s x wider view
    noise_map: bool = False  # FFDNet's: the image's noise sigma as one more input plane (`forward(x, noise_level)`)

    def __post_init__(self):
        if self.unshuffle not in (1, 2, 4):
            raise ValueError(f"ResNet unshuffle must be 1, 2 or 4, got {self.unshuffle}")
        if self.channels not in (1, 3):
            raise ValueError(f"ResNet channels must be 1 (gray) or 3 (colour), got {self.channels}")
        if self.blocks < 1 or self.width < 1:
            raise ValueError(f"ResNet blocks and width must be positive, got blocks={self.blocks} width={self.width}")
        if not 0 < self.residual_scale <= 1:
            raise ValueError(f"residual_scale must be within (0, 1], got {self.residual_scale}")


# --- blocks ----------------------------------------------------------------------------


def conv3x3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)


class ResidualBlock(nn.Module):
    """y = h + s * conv(relu(conv(h))), no batch norm (it hurts restoration, EDSR)."""

    def __init__(self, width: int, residual_scale: float = 1.0):
        super().__init__()
        self.conv1 = conv3x3(width, width)
        self.conv2 = conv3x3(width, width)
        self.residual_scale = residual_scale
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: fast, stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.residual_scale * self.conv2(torch.relu(self.conv1(h)))  # (B, W, H, W) unchanged


# --- networks --------------------------------------------------------------------------


class DnCNN(nn.Module):
    def __init__(self, config: DnCNNConfig = DnCNNConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [conv3x3(config.channels, config.width), nn.ReLU(inplace=True)]
        for _ in range(config.depth - 2):
            layers.append(conv3x3(config.width, config.width, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(config.width, eps=1e-4, momentum=0.95))
            layers.append(nn.ReLU(inplace=True))
        layers.append(conv3x3(config.width, config.channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) degraded image in [0, 1]; body(x): the predicted noise, same shape
        return x - self.body(x)


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig = ResNetConfig()):
        super().__init__()
        self.config = config
        scale = config.unshuffle
        self.head = conv3x3(config.channels * scale * scale + int(config.noise_map), config.width)
        self.blocks = nn.Sequential(*[ResidualBlock(config.width, config.residual_scale) for _ in range(config.blocks)])
        self.tail = conv3x3(config.width, config.channels * scale * scale)
        nn.init.zeros_(self.tail.weight)  # starts as the identity: the first steps already refine the input
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """`noise_level`: (B,) each image's noise sigma on x's scale (sigma / 255), for a
        noise-map model only."""
        if self.config.noise_map != (noise_level is not None):
            raise ValueError("a noise-map model needs each image's noise level (forward(x, noise_level))"
                             if self.config.noise_map else "this model takes no noise level")
        scale = self.config.unshuffle
        height, width = x.shape[-2:]
        padded = x
        if scale > 1:  # pad odd sizes up to a multiple of the scale, crop back at the end
            pad_h, pad_w = (-height) % scale, (-width) % scale
            if pad_h or pad_w:
                padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            padded = F.pixel_unshuffle(padded, scale)  # (B, C, H, W) -> (B, C*s*s, H/s, W/s)
        if noise_level is not None:  # -> (B, C*s*s + 1, H/s, W/s)
            plane = noise_level.to(padded.dtype).view(-1, 1, 1, 1).expand(-1, 1, *padded.shape[-2:])
            layout = torch.channels_last if padded.is_contiguous(memory_format=torch.channels_last) else None
            padded = torch.cat([padded, plane], dim=1)
            if layout is not None:  # cat returns NCHW: keep the caller's layout (channels-last, oneDNN's fast path)
                padded = padded.contiguous(memory_format=layout)
        features = self.blocks(self.head(padded))  # -> (B, W, H/s, W/s)
        correction = self.tail(features)  # -> (B, C*s*s, H/s, W/s)
        if scale > 1:
            correction = F.pixel_shuffle(correction, scale)[..., :height, :width]  # -> (B, C, H, W)
        return x + correction  # global skip: the network learns only the correction


# --- registry --------------------------------------------------------------------------

MODELS = {"dncnn": (DnCNN, DnCNNConfig), "resnet": (ResNet, ResNetConfig)}


def build_model(name: str, **config) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    network, config_class = MODELS[name]
    try:
        return network(config_class(**config))
    except TypeError as error:
        known = sorted(config_class.__dataclass_fields__)
        raise ValueError(f"bad config for model {name!r}: {error}; fields are {known}") from error


def takes_noise_level(model: nn.Module) -> bool:
    """Whether `model` is told each image's noise level (`ResNetConfig.noise_map`)."""
    return bool(getattr(model.config, "noise_map", False))


def model_config(model: nn.Module) -> tuple[str, dict]:
    """The registry name and config dict that rebuild `model`."""
    for name, (network, _) in MODELS.items():
        if type(model) is network:
            return name, asdict(model.config)
    raise TypeError(f"{type(model).__name__} is not a registered resflow model")
