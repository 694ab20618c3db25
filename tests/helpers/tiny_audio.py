"""A tiny audio codec config and noisy tones for the audio tokenizer tests: seconds on a CPU."""

import dataclasses
import math

import torch

from tokenizers_vq.audio import AudioVQVAEConfig
from tokenizers_vq.quantizers import ResidualVQConfig, VQConfig


def tiny_config(**overrides) -> AudioVQVAEConfig:
    config = AudioVQVAEConfig(
        hidden_channels=4, strides=(2, 4), embedding_dim=8,
        quantizer=ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=16, seed=1)),
        stft_fft_sizes=(32, 64), mel_fft_size=256, mel_hop=64, num_mels=16,
    )
    return dataclasses.replace(config, **overrides)


def audio(batch=2, length=800, seed=0) -> torch.Tensor:
    """(batch 1 length) tones of random pitch at 8 kHz, with a little noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 8000
    frequencies = 200 + 600 * torch.rand(batch, 1, 1, generator=generator)
    return 0.5 * torch.sin(2 * math.pi * frequencies * t) + 0.05 * torch.randn(batch, 1, length, generator=generator)
