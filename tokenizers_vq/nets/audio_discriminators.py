"""Discriminators for adversarial audio tokenizers, and the feature-matching loss.

Two families, each a set of sub-discriminators returning logits and intermediate feature maps:
the multi-scale STFT discriminator of EnCodec (Defossez et al. 2022, "High Fidelity Neural Audio
Compression", section 3.4), where each scale sees the real and imaginary parts of one STFT as a
two-channel image and applies 2-D convolutions dilated in time and strided in frequency; and the
multi-period discriminator of HiFi-GAN (Kong et al. 2020, "HiFi-GAN"), which folds the waveform
into (t / p, p) for a few prime periods p and applies (5, 1) convolutions strided along t, so each
sub-discriminator sees samples spaced p apart. Feature matching (Kumar et al. 2019, "MelGAN";
EnCodec's relative form) is the mean over sub-discriminators and layers of
||f(x) - f(x^)||_1 / mean |f(x)|. Convolutions carry weight normalisation as in both papers, and
initialisation draws from an optional `torch.Generator`. These take waveforms `(b c t)` and return
a list of `DiscriminatorOutput`, so they live in their own registry `AUDIO_DISCRIMINATORS`, apart
from the image `DISCRIMINATORS` whose modules return one logit tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from tokenizers_vq.quantizers.base import config_from_dict


class DiscriminatorOutput(NamedTuple):
    """logits: any-shaped real/fake scores of one sub-discriminator; features: its hidden activations."""

    logits: Tensor
    features: list[Tensor]


@dataclass(frozen=True)
class AudioDiscriminatorConfig:
    """Sizes of an audio discriminator; the input channels come from the tokenizer that owns it."""

    kind: str = "ms_stft"  # a key of AUDIO_DISCRIMINATORS
    base_channels: int = 32
    fft_sizes: tuple[int, ...] = (512, 256, 128)  # ms_stft: one scale each (hop = n / 4); EnCodec 2048..128 at 24 kHz
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)  # mpd: HiFi-GAN's primes
    max_channels: int = 512  # mpd: channels grow 4x per layer up to this
    leaky_relu_slope: float = 0.2

    def __post_init__(self):
        for name in ("fft_sizes", "periods"):
            if isinstance(getattr(self, name), list):  # tolerate JSON/TOML lists
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.kind not in AUDIO_DISCRIMINATORS:
            raise ValueError(f"audio discriminator kind {self.kind!r} is unknown; "
                             f"valid kinds: {sorted(AUDIO_DISCRIMINATORS)}")
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError("base_channels must be positive and max_channels >= base_channels")
        if self.kind == "ms_stft" and (not self.fft_sizes or min(self.fft_sizes) < 8):
            raise ValueError(f"fft_sizes must be a non-empty tuple of sizes >= 8, got {self.fft_sizes}")
        if self.kind == "mpd" and (not self.periods or min(self.periods) < 1):
            raise ValueError(f"periods must be a non-empty tuple of positive ints, got {self.periods}")

    @classmethod
    def from_dict(cls, data: dict) -> "AudioDiscriminatorConfig":
        return config_from_dict(cls, data)


class STFTDiscriminator(nn.Module):
    """EnCodec's one-scale discriminator: (b c t) -> logits (b 1 frames freq'), plus features."""

    def __init__(self, in_channels: int, channels: int, fft_size: int, slope: float):
        super().__init__()
        self.fft_size, self.hop = fft_size, fft_size // 4
        self.slope = slope
        self.register_buffer("window", torch.hann_window(fft_size), persistent=False)
        convs = [nn.Conv2d(2 * in_channels, channels, (3, 9), padding=(1, 4))]
        for dilation in (1, 2, 4):  # dilated in time, strided by 2 in frequency
            convs.append(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(dilation, 1),
                                   padding=(dilation, 4)))
        convs.append(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)))
        self.convs = nn.ModuleList(weight_norm(conv) for conv in convs)
        self.output = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        batch = x.shape[0]
        spectrum = torch.stft(rearrange(x.float(), "b c t -> (b c) t"), self.fft_size, hop_length=self.hop,
                              window=self.window, center=True, pad_mode="constant", return_complex=True)
        h = rearrange(torch.view_as_real(spectrum), "(b c) f frames ri -> b (c ri) frames f", b=batch).to(x.dtype)
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), self.slope)
            features.append(h)
        return DiscriminatorOutput(self.output(h), features)


class MultiScaleSTFTDiscriminator(nn.Module):
    """One `STFTDiscriminator` per FFT size."""

    def __init__(self, config: AudioDiscriminatorConfig, in_channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(in_channels, config.base_channels, size, config.leaky_relu_slope)
            for size in config.fft_sizes
        )
        reset_parameters(self, generator)

    def forward(self, x: Tensor) -> list[DiscriminatorOutput]:
        return [discriminator(x) for discriminator in self.discriminators]


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's sub-discriminator for period p: (b c t) -> (b c (t/p) p) -> 2-D convs -> logits."""

    def __init__(self, in_channels: int, period: int, base_channels: int, max_channels: int, slope: float):
        super().__init__()
        self.period, self.slope = period, slope
        sizes = [in_channels] + [min(base_channels * 4**i, max_channels) for i in range(4)]
        convs = [nn.Conv2d(a, b, (5, 1), stride=(3, 1), padding=(2, 0)) for a, b in zip(sizes[:-1], sizes[1:])]
        convs.append(nn.Conv2d(sizes[-1], sizes[-1], (5, 1), padding=(2, 0)))
        self.convs = nn.ModuleList(weight_norm(conv) for conv in convs)
        self.output = weight_norm(nn.Conv2d(sizes[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        remainder = x.shape[-1] % self.period
        if remainder:  # HiFi-GAN reflects the tail; zeros match the masked padding of the batch
            x = F.pad(x, (0, self.period - remainder))
        h = rearrange(x, "b c (t p) -> b c t p", p=self.period)
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), self.slope)
            features.append(h)
        return DiscriminatorOutput(self.output(h), features)


class MultiPeriodDiscriminator(nn.Module):
    """One `PeriodDiscriminator` per period."""

    def __init__(self, config: AudioDiscriminatorConfig, in_channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.discriminators = nn.ModuleList(
            PeriodDiscriminator(in_channels, period, config.base_channels, config.max_channels,
                                config.leaky_relu_slope)
            for period in config.periods
        )
        reset_parameters(self, generator)

    def forward(self, x: Tensor) -> list[DiscriminatorOutput]:
        return [discriminator(x) for discriminator in self.discriminators]


@torch.no_grad()
def reset_parameters(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Kaiming-uniform directions (PyTorch's conv default) drawn from `generator`, zero biases.

    Under weight normalisation the direction `v` is redrawn and the norm `g` reset to ||v||, so
    the effective weight equals v at initialisation.
    """
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        parametrized = hasattr(conv, "parametrizations")
        direction = conv.parametrizations.weight.original1 if parametrized else conv.weight
        fan_in = direction[0].numel()
        bound = (1.0 / fan_in) ** 0.5  # kaiming_uniform with a = sqrt(5), as nn.Conv2d's default
        direction.copy_(torch.rand(direction.shape, generator=generator) * 2 * bound - bound)
        if parametrized:
            norm = direction.flatten(1).norm(dim=1)
            conv.parametrizations.weight.original0.copy_(norm.reshape(conv.parametrizations.weight.original0.shape))
        if conv.bias is not None:
            conv.bias.zero_()


def feature_matching_loss(real: list[DiscriminatorOutput], fake: list[DiscriminatorOutput]) -> Tensor:
    """Mean over sub-discriminators and layers of mean|f_real - f_fake| / mean|f_real| (real detached)."""
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real and {len(fake)} fake discriminator outputs")
    terms = []
    for real_output, fake_output in zip(real, fake):
        for real_feature, fake_feature in zip(real_output.features, fake_output.features):
            real_feature = real_feature.detach().float()
            terms.append(F.l1_loss(fake_feature.float(), real_feature) / real_feature.abs().mean().clamp_min(1e-8))
    return torch.stack(terms).mean()


# kind -> module class; constructors take (config, in_channels, generator=None) and return a list of outputs.
AUDIO_DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "ms_stft": MultiScaleSTFTDiscriminator,
    "mpd": MultiPeriodDiscriminator,
}


def build_audio_discriminator(config: AudioDiscriminatorConfig, in_channels: int,
                              generator: torch.Generator | None = None) -> nn.Module:
    return AUDIO_DISCRIMINATORS[config.kind](config, in_channels, generator)
