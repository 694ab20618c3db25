"""Discriminators for adversarial tokenizer training; today the PatchGAN for images `(b c h w)`.

Implements the "PatchGAN" of Isola et al. 2017 ("Image-to-Image Translation with Conditional
Adversarial Networks", pix2pix) in the form used by Esser et al. 2021 ("Taming Transformers for
High-Resolution Image Synthesis", VQ-GAN): 4x4 convolutions with stride 2, LeakyReLU(0.2), a
normalisation between them, then two stride-1 convolutions ending in one channel. Every output
logit sees one receptive-field patch of the image, so the discriminator judges local texture and
leaves global structure to the reconstruction loss. Two departures from taming-transformers: the
normalisation is GroupNorm (or none), not BatchNorm, because BatchNorm's running statistics differ
per process under DDP and make the real and fake batches interact; and initialisation takes an
optional `torch.Generator`. The 1-D / multi-scale STFT discriminators for audio belong in this file
too (register them in `DISCRIMINATORS` under their own `kind`); they are not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import config_from_dict

NORMS = ("group", "none")
KERNEL_SIZE, PADDING = 4, 1  # pix2pix's 4x4 kernels: a stride-2 conv halves an even size exactly


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes of a discriminator; the input channels come from the tokenizer that owns it."""

    kind: str = "patchgan"  # a key of DISCRIMINATORS
    base_channels: int = 64  # ndf in pix2pix
    num_layers: int = 3  # stride-2 convolutions; a 256x256 image gives a 30x30 grid of patch logits
    max_channel_multiplier: int = 8  # channels grow base * 2^i up to base * this
    norm: str = "group"  # "group" | "none"
    leaky_relu_slope: float = 0.2

    def __post_init__(self):
        if self.kind not in DISCRIMINATORS:
            raise ValueError(f"discriminator kind {self.kind!r} is unknown; valid kinds: {sorted(DISCRIMINATORS)}")
        if self.base_channels < 1 or self.num_layers < 1 or self.max_channel_multiplier < 1:
            raise ValueError("base_channels, num_layers and max_channel_multiplier must be positive")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.leaky_relu_slope < 0:
            raise ValueError(f"leaky_relu_slope must be >= 0, got {self.leaky_relu_slope}")

    @classmethod
    def from_dict(cls, data: dict) -> "DiscriminatorConfig":
        return config_from_dict(cls, data)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    # The largest group count <= 32 that divides `channels` (GroupNorm needs an exact division).
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class PatchGANDiscriminator(nn.Module):
    """(b in_channels h w) -> (b 1 h' w') real/fake logits, one per image patch.

    With `num_layers` = n the grid shrinks by 2^n through the strided convolutions, and each of the
    two final 4x4 stride-1 convolutions (padding 1) takes one more pixel off: an input side s that
    2^n divides gives s / 2^n - 2 logits. Images must be at least 3 * 2^n pixels on a side.
    """

    def __init__(self, config: DiscriminatorConfig, in_channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.in_channels = in_channels
        slope = config.leaky_relu_slope
        base = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base, KERNEL_SIZE, stride=2, padding=PADDING),  # no norm on the first layer
            nn.LeakyReLU(slope),
        ]
        channels = base
        # Layers 1 .. n-1 downsample; layer n (stride 1) widens once more before the output conv.
        for index in range(1, config.num_layers + 1):
            out_channels = base * min(2**index, config.max_channel_multiplier)
            stride = 2 if index < config.num_layers else 1
            with_norm = config.norm != "none"  # a norm's shift makes the conv bias redundant
            layers += [
                nn.Conv2d(channels, out_channels, KERNEL_SIZE, stride=stride, padding=PADDING, bias=not with_norm),
                _norm(config.norm, out_channels),
                nn.LeakyReLU(slope),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, KERNEL_SIZE, stride=1, padding=PADDING))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """pix2pix / taming initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.02, generator=generator)
                module.bias.zero_()

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an input -> (h', w') of its logit grid (0 where the image is too small)."""

        def side(size: int) -> int:
            for module in self.layers:
                if isinstance(module, nn.Conv2d):
                    size = (size + 2 * PADDING - KERNEL_SIZE) // module.stride[0] + 1
            return max(size, 0)

        return side(height), side(width)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (b {self.in_channels} h w), got shape {tuple(x.shape)}")
        if min(self.output_size(x.shape[2], x.shape[3])) < 1:
            raise ValueError(
                f"images of {x.shape[2]}x{x.shape[3]} pixels are too small for a PatchGAN with "
                f"num_layers={self.config.num_layers}; lower num_layers"
            )
        return self.layers(x)


# kind -> module class; constructors take (config, in_channels, generator=None).
DISCRIMINATORS: dict[str, type[nn.Module]] = {"patchgan": PatchGANDiscriminator}


def build_discriminator(config: DiscriminatorConfig, in_channels: int,
                        generator: torch.Generator | None = None) -> nn.Module:
    return DISCRIMINATORS[config.kind](config, in_channels, generator)
