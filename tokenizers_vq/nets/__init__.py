"""Encoder/decoder networks for the tokenizers (conv2d for images)."""

from tokenizers_vq.nets.conv2d import Decoder2d, Encoder2d, ResidualBlock2d

__all__ = ["Decoder2d", "Encoder2d", "ResidualBlock2d"]
