"""Strided 1-D convolutional encoder and decoder for audio, `(b c t)` <-> `(b d t/hop)`.

The SEANet shape used by SoundStream (Zeghidour et al. 2021, "SoundStream: An End-to-End Neural
Audio Codec") and EnCodec (Defossez et al. 2022, "High Fidelity Neural Audio Compression"): a
7-tap input convolution, then per entry of `strides` a block of residual units with dilations
1, 3, 9 (ELU, dilated 7-tap conv, ELU, 1x1 conv, identity skip) followed by a strided convolution
of kernel 2*stride that doubles the channels; an ELU and a 7-tap convolution to the latent size
close it. The hop (samples per latent frame) is the product of the strides. The decoder mirrors it
with transposed convolutions of kernel 2*stride. Departures from EnCodec: non-causal (centred)
padding with zeros only, and no LSTM, so that the encoder is a pure convolution with a finite
receptive field (`receptive_field`), which is what chunked encoding relies on. For the context an
LSTM gives, `latent_dilations` adds residual units at the latent frame rate (after the encoder's last
downsampling, before the decoder's first upsampling): a unit of dilation d sees 6d frames more.
Inputs must have a length divisible by the hop (the tokenizer pads and trims); then the encoder
gives exactly t / hop frames and the decoder exactly frames * hop samples. Weight normalisation
(Salimans & Kingma 2016), as in both codecs, is optional. So is the activation: ELU as in SEANet, or Snake,
x + sin^2(alpha x) / alpha with a learned alpha per channel (Ziyin et al. 2020; used by BigVGAN and
DAC, Kumar et al. 2023, "High-Fidelity Audio Compression with Improved RVQGAN"), whose periodic
bias suits the periodic waveforms of voiced speech.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as apply_weight_norm

DILATIONS = (1, 3, 9)
KERNEL_SIZE = 7  # input, output and residual-unit convolutions
ACTIVATIONS = ("elu", "snake")


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """x + sin^2(alpha x) / alpha, with alpha broadcast over (b c t); the eager reference."""
    # as in DAC: the 1e-9 keeps 1 / alpha finite at alpha = 0, where sin^2(alpha x) is 0 too
    return x + torch.sin(alpha * x).square() / (alpha + 1e-9)


# Eager, Snake is five elementwise kernels forward and more backward, each a pass over the largest
# activations: on an H200 the 64-channel codec encoded 2.6x slower with Snake than with ELU
# (BENCHMARKS.md). Compiled, inductor fuses each chain into one kernel (Triton on CUDA, C++ on the
# CPU). By default only CUDA tensors take it. On one CPU thread it makes a training step of the FSDD
# codecs 1.27x (8 channels) to 1.42x (16 channels) faster, but compiling costs 10-20 s a process and
# needs a C++ compiler, which short CPU jobs and the tests should not pay: "1" opts the CPU in.
FUSED_SNAKE_ENV = "TOKGEN_FUSED_SNAKE"  # unset or "auto": CUDA only; "1": CUDA and CPU; "0": never


SNAKE_GRAPH_LIMIT = 32  # Dynamo's default of 8 is too few for Snake: see fused_snake


@functools.cache
def _compiled_snake():
    """`snake` compiled once, dynamic in (b, c, t), allowed SNAKE_GRAPH_LIMIT graphs. Set here, not
    around each call: entering a Dynamo config patch cost ~0.1 ms (timed on a CPU host), and a step of the
    64-channel codec calls Snake 44 times (its 44 activations, in the forward pass)."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # a limit of its own (recent torch)
        return torch.compile(snake, dynamic=True, recompile_limit=SNAKE_GRAPH_LIMIT)
    # older torch has only the process-wide limit (cache_size_limit before 2.6): raise it, never lower it
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(SNAKE_GRAPH_LIMIT, getattr(config, name)))
    return torch.compile(snake, dynamic=True)


_fused_snake_failed = False


def fused_snake(x: Tensor, alpha: Tensor) -> Tensor:
    """`snake` through torch.compile; falls back to eager (warning once) if compiling fails."""
    global _fused_snake_failed
    if not _fused_snake_failed:
        try:
            # Dynamo keeps a Parameter's shape static and guards on the autocast state: called with the
            # Parameter itself, under and outside autocast, each width of the codec (64 to 512 channels,
            # encoder and decoder) was a graph of its own, and past Dynamo's 8 graphs the rest ran eager
            # (H200, 2026-12-04: 1.01x). A view is a plain tensor, so the width is dynamic too; and Snake
            # has no autocast op (bf16 x times fp32 alpha promotes to fp32 either way), so autocast off
            # inside changes no value. What is left to guard on multiplies to up to 16 graphs: x's
            # dtype (fp32, bf16), contiguity (trimmed transposed-convolution outputs are not), gradients
            # on or off, and a size threshold of AOT autograd's; hence SNAKE_GRAPH_LIMIT.
            with torch.autocast(x.device.type, enabled=False):
                return _compiled_snake()(x, alpha.view(alpha.shape))
        except torch.cuda.OutOfMemoryError:
            raise  # eager would need more memory, not less
        except Exception as error:  # a missing Triton or compiler: slower, not wrong
            _fused_snake_failed = True
            warnings.warn(f"compiled Snake unavailable ({type(error).__name__}: {error}); using eager", stacklevel=2)
    return snake(x, alpha)


def use_fused_snake(x: Tensor) -> bool:
    setting = os.environ.get(FUSED_SNAKE_ENV, "auto").strip().lower()
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{FUSED_SNAKE_ENV} must be 'auto', '1' or '0', got {setting!r}")
    return setting == "1" or (setting == "auto" and x.is_cuda)


class Snake1d(nn.Module):
    """x + sin^2(alpha x) / alpha per channel of (b c t), alpha learned and initialised to 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return fused_snake(x, self.alpha) if use_fused_snake(x) else snake(x, self.alpha)


def make_activation(kind: str, channels: int) -> nn.Module:
    if kind == "elu":
        return nn.ELU()
    if kind == "snake":
        return Snake1d(channels)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def _maybe_weight_norm(module: nn.Module, enabled: bool) -> nn.Module:
    return apply_weight_norm(module) if enabled else module


def hop_length(strides: Sequence[int]) -> int:
    """Samples per latent frame: the product of the strides."""
    return math.prod(strides)


def check_strides(strides: Sequence[int]) -> None:
    if len(strides) < 1 or any(int(stride) != stride or stride < 1 for stride in strides):
        raise ValueError(f"strides must be a non-empty tuple of positive ints, got {strides}")


def check_dilations(dilations: Sequence[int]) -> None:
    if any(int(dilation) != dilation or dilation < 1 for dilation in dilations):
        raise ValueError(f"latent dilations must be positive ints, got {tuple(dilations)}")


class ResidualUnit1d(nn.Module):
    """x + conv1x1(act(conv7_dilated(act(x)))), channels unchanged (SoundStream's residual unit)."""

    def __init__(self, channels: int, dilation: int, weight_norm: bool, activation: str = "elu"):
        super().__init__()
        self.dilation = dilation
        self.residual = nn.Sequential(
            make_activation(activation, channels),
            _maybe_weight_norm(nn.Conv1d(channels, channels, KERNEL_SIZE, dilation=dilation,
                                         padding=dilation * (KERNEL_SIZE - 1) // 2), weight_norm),
            make_activation(activation, channels),
            _maybe_weight_norm(nn.Conv1d(channels, channels, 1), weight_norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


def residual_units(channels: int, dilations: Sequence[int], weight_norm: bool, activation: str) -> list[nn.Module]:
    """One ResidualUnit1d per dilation, in order: a stack whose context grows with each unit."""
    return [ResidualUnit1d(channels, dilation, weight_norm, activation) for dilation in dilations]


def _same_length_conv(in_channels: int, out_channels: int, weight_norm: bool) -> nn.Module:
    """The codec's input and output convs: kernel KERNEL_SIZE, padded so the length is kept."""
    return _maybe_weight_norm(nn.Conv1d(in_channels, out_channels, KERNEL_SIZE, padding=KERNEL_SIZE // 2), weight_norm)


class Downsample1d(nn.Module):
    """Conv of kernel 2s, stride s, padded (ceil(s/2), floor(s/2)): t -> t / s exactly when s divides t."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, weight_norm: bool):
        super().__init__()
        self.stride = stride
        self.pad = nn.ConstantPad1d(((stride + 1) // 2, stride // 2), 0.0)
        self.conv = _maybe_weight_norm(nn.Conv1d(in_channels, out_channels, 2 * stride, stride=stride), weight_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pad(x))


class Upsample1d(nn.Module):
    """Transposed conv of kernel 2s, stride s; its (t + 1) * s outputs are trimmed to t * s, centred."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, weight_norm: bool):
        super().__init__()
        self.stride = stride
        self.conv = _maybe_weight_norm(
            nn.ConvTranspose1d(in_channels, out_channels, 2 * stride, stride=stride), weight_norm
        )

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[-1] * self.stride
        left = (self.stride + 1) // 2  # mirrors the encoder's padding, so the two align
        return self.conv(x)[..., left : left + length]


class Encoder1d(nn.Module):
    """(b in_channels t) -> (b out_channels t / hop), hop = prod(strides), for t divisible by hop."""

    def __init__(self, in_channels: int, hidden_channels: int, strides: Sequence[int], out_channels: int,
                 weight_norm: bool = True, activation: str = "elu", latent_dilations: Sequence[int] = ()):
        super().__init__()
        check_strides(strides)
        check_dilations(latent_dilations)
        if hidden_channels < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels, hidden_channels and out_channels must be positive")
        self.hop_length = hop_length(strides)
        channels = hidden_channels
        layers: list[nn.Module] = [_same_length_conv(in_channels, channels, weight_norm)]
        for stride in strides:
            layers += residual_units(channels, DILATIONS, weight_norm, activation)
            layers += [make_activation(activation, channels), Downsample1d(channels, 2 * channels, stride, weight_norm)]
            channels *= 2
        layers += residual_units(channels, latent_dilations, weight_norm, activation)
        layers += [make_activation(activation, channels), _same_length_conv(channels, out_channels, weight_norm)]
        self.layers = nn.Sequential(*layers)
        self.receptive_field = receptive_field(self.layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.hop_length:
            raise ValueError(f"input length {x.shape[-1]} is not a multiple of the hop {self.hop_length}; pad it")
        return self.layers(x)


class Decoder1d(nn.Module):
    """(b in_channels frames) -> (b out_channels frames * hop): the encoder's mirror image."""

    def __init__(self, in_channels: int, hidden_channels: int, strides: Sequence[int], out_channels: int,
                 weight_norm: bool = True, activation: str = "elu", latent_dilations: Sequence[int] = ()):
        super().__init__()
        check_strides(strides)
        check_dilations(latent_dilations)
        self.hop_length = hop_length(strides)
        channels = hidden_channels * 2 ** len(strides)
        layers: list[nn.Module] = [_same_length_conv(in_channels, channels, weight_norm)]
        layers += residual_units(channels, latent_dilations, weight_norm, activation)
        for stride in reversed(strides):
            layers += [make_activation(activation, channels), Upsample1d(channels, channels // 2, stride, weight_norm)]
            channels //= 2
            layers += residual_units(channels, DILATIONS, weight_norm, activation)
        layers += [make_activation(activation, channels), _same_length_conv(channels, out_channels, weight_norm)]
        self.layers = nn.Sequential(*layers)
        self.input_margins = input_margins(self.layers, self.hop_length)
        self.reach_frames = self.input_margins[0]

    def forward(self, z: Tensor, keep: tuple[int, int] | None = None) -> Tensor:
        """With `keep` = (start, stop) frames: only the samples of those frames, equal to the whole
        decode's there. Each layer's input is cropped to what those samples depend on
        (`input_margins`), so a short span of a long window costs little more than its own decode;
        most of the decoder's work is at full rate (BENCHMARKS.md)."""
        if keep is None:
            return self.layers(z)
        start, stop = keep
        if not 0 <= start < stop <= z.shape[-1]:
            raise ValueError(f"keep must be frames (start, stop) with 0 <= start < stop <= {z.shape[-1]}, got {keep}")
        x, offset, rate = z, 0, 1  # x holds positions [offset, offset + length) at `rate` per frame
        for layer, margin in zip(self.layers, self.input_margins):
            low, high = max(start * rate - margin, offset), min(stop * rate + margin, offset + x.shape[-1])
            x, offset = layer(x[..., low - offset : high - offset]), low
            if isinstance(layer, Upsample1d):
                offset, rate = offset * layer.stride, rate * layer.stride
        return x[..., start * rate - offset : stop * rate - offset]


def receptive_field(layers: nn.Sequential) -> int:
    """Input samples one output frame of `layers` depends on (a residual unit adds its branch's span).

    Walks the stack keeping the spacing `jump` of the current layer's positions in input samples:
    a convolution of kernel k and dilation d widens the field by (k - 1) * d * jump.
    """
    field, jump = 1, 1
    for layer in layers:
        if isinstance(layer, ResidualUnit1d):
            field += (KERNEL_SIZE - 1) * layer.dilation * jump
        elif isinstance(layer, Downsample1d):
            field += (2 * layer.stride - 1) * jump
            jump *= layer.stride
        elif isinstance(layer, nn.Conv1d):
            field += (layer.kernel_size[0] - 1) * layer.dilation[0] * jump
    return field


def input_margins(layers: nn.Sequential, hop: int) -> list[int]:
    """For each layer of a decoder stack, the positions of its input on either side of a frame's own that
    the stack's output over that frame may depend on, in the layer's own input rate. Cropping every
    layer's input to a span of frames widened by these leaves the output over the span exact: what the
    crop spoils lies within the margin, and is cropped away later. The first is the decoder's reach: the
    code frames on either side of its own that one output sample may depend on.

    Walks the stack from the output back, keeping the interval of the current layer's input positions
    that the output samples of one frame depend on: a centred convolution of kernel k and dilation d
    widens it by (k - 1) * d / 2 each side; a trimmed transposed convolution of stride s maps output
    position u to the inputs i with 0 <= u + left - i * s < 2s.
    """
    frame = 4 * hop  # any frame will do (the walk ignores edges); the interval is found relative to it
    rate, low, high = hop, frame * hop, frame * hop + hop - 1  # rate: the current layer's positions a frame
    margins = []
    for layer in reversed(layers):
        if isinstance(layer, ResidualUnit1d):
            layer = layer.residual[1]
        if isinstance(layer, Upsample1d):
            stride, left = layer.stride, (layer.stride + 1) // 2
            low, high = -((-(low + left - 2 * stride + 1)) // stride), (high + left) // stride
            rate //= stride
        elif isinstance(layer, nn.Conv1d):
            span = (layer.kernel_size[0] - 1) * layer.dilation[0] // 2
            low, high = low - span, high + span
        elif not isinstance(layer, (Snake1d, nn.ELU)):
            raise TypeError(f"input_margins: no rule for {type(layer).__name__}")
        margins.append(max(frame * rate - low, high - (frame * rate + rate - 1)))
    return margins[::-1]
