"""Residual convolutional encoder and decoder for images, `(b c h w)` <-> `(b d h' w')`.

The shape of van den Oord et al. 2017 ("Neural Discrete Representation Learning", VQ-VAE):
strided convolutions down to a small grid of latent vectors, residual blocks, and a mirrored
decoder; with the pre-activation residual blocks (GroupNorm + SiLU) and per-level channel
multipliers used by later VQ tokenizers (Esser et al. 2021, "Taming Transformers for
High-Resolution Image Synthesis"). Each entry of `channel_multipliers` is one level: residual
blocks at `hidden_channels * multiplier` channels followed by one stride-2 downsampling, so the
grid shrinks by `2 ** len(channel_multipliers)` (28x28 with two levels -> 7x7). The decoder
upsamples by nearest-neighbour interpolation plus a convolution, which avoids the checkerboard
artefacts of transposed convolutions (Odena et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResidualBlock2d(nn.Module):
    """x + f(x) with f = (GroupNorm, SiLU, conv3x3) twice; a 1x1 conv matches channels on the skip."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.residual = nn.Sequential(
            group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.residual(x)


def _residual_stack(in_channels: int, out_channels: int, num_blocks: int) -> list[nn.Module]:
    return [ResidualBlock2d(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)]


def _check_sizes(hidden_channels: int, channel_multipliers: Sequence[int], num_res_blocks: int) -> None:
    if hidden_channels < 1 or num_res_blocks < 1:
        raise ValueError("hidden_channels and num_res_blocks must be positive")
    if len(channel_multipliers) < 1 or any(m < 1 for m in channel_multipliers):
        raise ValueError(f"channel_multipliers must be a non-empty tuple of positive ints, got {channel_multipliers}")


class Encoder2d(nn.Module):
    """(b in_channels h w) -> (b out_channels h/f w/f), f = 2 ** len(channel_multipliers)."""

    def __init__(self, in_channels: int, hidden_channels: int, channel_multipliers: Sequence[int],
                 num_res_blocks: int, out_channels: int):
        super().__init__()
        _check_sizes(hidden_channels, channel_multipliers, num_res_blocks)
        self.downsampling_factor = 2 ** len(channel_multipliers)
        channels = hidden_channels * channel_multipliers[0]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        for multiplier in channel_multipliers:
            level_channels = hidden_channels * multiplier
            layers += _residual_stack(channels, level_channels, num_res_blocks)
            layers.append(nn.Conv2d(level_channels, level_channels, 3, stride=2, padding=1))
            channels = level_channels
        layers += [
            ResidualBlock2d(channels, channels),
            group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Upsample2d(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.upsample(x))


class Decoder2d(nn.Module):
    """(b in_channels h' w') -> (b out_channels h'*f w'*f): the encoder's mirror image."""

    def __init__(self, in_channels: int, hidden_channels: int, channel_multipliers: Sequence[int],
                 num_res_blocks: int, out_channels: int):
        super().__init__()
        _check_sizes(hidden_channels, channel_multipliers, num_res_blocks)
        self.upsampling_factor = 2 ** len(channel_multipliers)
        channels = hidden_channels * channel_multipliers[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), ResidualBlock2d(channels, channels)]
        for multiplier in reversed(channel_multipliers):
            level_channels = hidden_channels * multiplier
            layers.append(Upsample2d(channels))
            layers += _residual_stack(channels, level_channels, num_res_blocks)
            channels = level_channels
        layers += [group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


def downsampled_size(size: int, factor: int) -> int:
    """Grid length for an input length `size`; the decoder restores it only when `factor` divides it."""
    if size % factor:
        raise ValueError(f"input size {size} is not divisible by the downsampling factor {factor}; "
                         f"use a size that is a multiple of {factor} (e.g. {math.ceil(size / factor) * factor})")
    return size // factor
