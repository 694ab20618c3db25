"""The identity tokenizer: each quantised pixel value is a token, so stage two models pixels directly.

The pixel-space baselines of the density-modelling literature (NADE on binarized MNIST, Larochelle
& Murray 2011; PixelRNN/PixelCNN on 8-bit images, van den Oord et al. 2016, "Pixel Recurrent Neural
Networks") are priors over raw quantised pixels. Plugging this tokenizer into the pipeline makes
every prior of `priors` such a baseline, with no learned stage one and an exact round trip. An image
`(b c h w)` in [-1, 1] is quantised to `levels` evenly spaced values that include both ends
(-1 -> 0, +1 -> levels - 1): `levels=2` is binarisation at 0 (a pixel > 0 is 1, ink in binarized
MNIST), `levels=256` reproduces the 8-bit values of `uint8 / 127.5 - 1` exactly. Token layout: a
one-channel image gives a `(b h w)` grid; `c > 1` channels give `(b h w c)`, channels last, with
`num_codebooks = c`, so an export flattens it as `(i * w + j) * c + k` (pixel-major, the channels of
a pixel adjacent, the order of PixelRNN's R, G, B sub-pixels) exactly like a residual tokenizer's
codebook axis. Nothing is learned: `needs_training = False`, no parameters and no optimizer groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from tokenizers_vq.checkpoint import PretrainedTokenizer
from tokenizers_vq.quantizers.base import config_from_dict

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class PixelsConfig:
    """Channels, quantisation levels and the image size the tokenizer accepts (28x28 binarized MNIST)."""

    kind: ClassVar[str] = "pixels"

    in_channels: int = 1
    levels: int = 2
    image_size: tuple[int, int] = (28, 28)  # (h, w): the token grid is the image itself

    def __post_init__(self):
        if isinstance(self.image_size, list):  # tolerate JSON/TOML lists in direct construction
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {self.in_channels}")
        if not 2 <= self.levels <= 65536:
            raise ValueError(f"levels must lie in [2, 65536], got {self.levels}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width) with positive sizes, got {self.image_size}")

    @classmethod
    def from_dict(cls, data: dict) -> "PixelsConfig":
        return config_from_dict(cls, data)


class PixelTokenizer(PretrainedTokenizer, nn.Module):
    """Images <-> quantised pixel tokens, with the tokenizer API of `VQVAE` (nothing to train).

    The module holds one empty buffer, `anchor`, so that `.to(device)` moves it and `device` says
    where it lives; it is what `model.safetensors` stores, keeping the folder format of every tokenizer.
    """

    config_class: ClassVar[type[PixelsConfig]] = PixelsConfig
    needs_training: ClassVar[bool] = False  # the pipeline skips the tokenizer's training stage

    def __init__(self, config: PixelsConfig):
        super().__init__()
        self.config = config
        self.register_buffer("anchor", torch.zeros(0))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def vocab_size(self) -> int:
        return self.config.levels

    @property
    def num_codebooks(self) -> int:
        """Tokens per grid cell: one per channel, so `(b h w)` for grey images and `(b h w c)` otherwise."""
        return self.config.in_channels

    def token_grid(self, input_shape: tuple[int, int, int]) -> tuple[int, int]:
        """(c, h, w) of one image -> (h, w): one grid cell per pixel."""
        channels, height, width = input_shape
        if channels != self.config.in_channels:
            raise ValueError(f"the tokenizer takes {self.config.in_channels}-channel images, got {channels} channel(s)")
        if (height, width) != tuple(self.config.image_size):
            raise ValueError(f"the tokenizer takes {tuple(self.config.image_size)} images, got {(height, width)}; "
                             f"set image_size to the data's size")
        return height, width

    # --- the two directions ---------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(b c h w) in [-1, 1] -> (b h w) int64 tokens in [0, levels), or (b h w c) with c > 1 channels."""
        if x.ndim != 4:
            raise ValueError(f"expected images (b c h w), got shape {tuple(x.shape)}")
        self.token_grid(tuple(x.shape[1:]))
        steps = self.config.levels - 1
        scaled = (x.float().clamp(-1.0, 1.0) + 1.0) * (steps / 2.0)  # in [0, steps]
        # Round half down: ceil(v - 1/2) sends a value exactly midway to the lower level, so with two
        # levels a pixel must be strictly above 0 to become 1 (binarized MNIST's "ink").
        tokens = torch.ceil(scaled - 0.5).clamp(0, steps).long()
        if self.num_codebooks == 1:
            return rearrange(tokens, "b 1 h w -> b h w")
        return rearrange(tokens, "b c h w -> b h w c")

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """(b h w) int64 tokens, or (b h w c) with c channels -> (b c h w) float32 in [-1, 1]."""
        expected_ndim = 3 if self.num_codebooks == 1 else 4
        if tokens.ndim != expected_ndim or (expected_ndim == 4 and tokens.shape[-1] != self.num_codebooks):
            expected = "(b h w)" if expected_ndim == 3 else f"(b h w c) with c={self.num_codebooks}"
            raise ValueError(f"expected a token grid {expected}, got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")
        if expected_ndim == 3:
            tokens = rearrange(tokens, "b h w -> b h w 1")
        # divided, not multiplied by 2 / (levels - 1), to match `uint8 / 127.5 - 1` bit for bit at 256 levels
        images = tokens.float() / ((self.config.levels - 1) / 2.0) - 1.0
        return rearrange(images, "b h w c -> b c h w")

    def forward(self, x: Tensor) -> Tensor:
        """(b c h w) -> the quantised images: what a learned tokenizer's reconstruction would be."""
        return self.decode(self.encode(x))

    # --- Trainable (nothing to train) -----------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def phases(self, step: int) -> list[str]:
        return []

    def loss(self, batch: dict, phase: str, step: int):
        raise RuntimeError("the pixels tokenizer has nothing to train (needs_training = False); skip its training")
