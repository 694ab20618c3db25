"""Stage one: tokenizers that turn images into grids of integer tokens and back.

Plain PyTorch + einops; no Accelerate, no CLI. `TOKENIZERS` maps a config `kind` to its
(config class, model class); `load_tokenizer` reopens any saved tokenizer folder by its kind.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers_vq.quantizers import (
    QUANTIZERS,
    QuantizerOutput,
    build_quantizer,
    code_counts,
    quantizer_config_from_dict,
    usage_and_perplexity,
)
from tokenizers_vq.audio import AudioVQVAE, AudioVQVAEConfig
from tokenizers_vq.pixels import PixelsConfig, PixelTokenizer
from tokenizers_vq.vqgan import VQGAN, VQGANConfig
from tokenizers_vq.vqvae import LFQVAE, VQVAE, LFQVAEConfig, TokenizerOutput, VQVAEConfig

TOKENIZERS = {"vqvae": (VQVAEConfig, VQVAE), "lfq": (LFQVAEConfig, LFQVAE), "vqgan": (VQGANConfig, VQGAN),
              "pixels": (PixelsConfig, PixelTokenizer), "audio_vqvae": (AudioVQVAEConfig, AudioVQVAE)}


def load_tokenizer(directory: str | Path):
    """Load the tokenizer saved in `directory`, dispatching on `config.json["kind"]`."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist; is {directory} a saved tokenizer folder?")
    kind = json.loads(config_path.read_text()).get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"{config_path} names tokenizer kind {kind!r}; known kinds: {sorted(TOKENIZERS)}")
    _, model_cls = TOKENIZERS[kind]
    return model_cls.from_pretrained(directory)


__all__ = [
    "VQGAN",
    "VQGANConfig",
    "LFQVAE",
    "QUANTIZERS",
    "TOKENIZERS",
    "LFQVAEConfig",
    "QuantizerOutput",
    "TokenizerOutput",
    "VQVAE",
    "VQVAEConfig",
    "build_quantizer",
    "code_counts",
    "load_tokenizer",
    "quantizer_config_from_dict",
    "usage_and_perplexity",
]
