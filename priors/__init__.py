"""Stage two of tokgen: autoregressive priors over integer token sequences.

Knows nothing of tokenizers: a prior sees `(b L)` int64 tokens and optional `(b,)` class labels. Each
kind is registered in `PRIORS` (config class, model class); a saved prior folder carries a
`tokgen.json` naming its kind, so `load_prior` can rebuild it without import paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from priors.baselines import (
    FVSBN, GAN, MADE, NADE, VAE, FVSBNConfig, GANConfig, HistogramConfig, HistogramPrior, MADEConfig, NADEConfig,
    VAEConfig,
)
from priors.rnn import RNNPrior, RNNPriorConfig
from priors.sampling import SamplingOptions
from priors.transformer import TransformerPrior, TransformerPriorConfig

PRIORS = {
    "transformer": (TransformerPriorConfig, TransformerPrior),
    "rnn": (RNNPriorConfig, RNNPrior),
    "histogram": (HistogramConfig, HistogramPrior),
    "fvsbn": (FVSBNConfig, FVSBN),
    "nade": (NADEConfig, NADE),
    "made": (MADEConfig, MADE),
    "vae": (VAEConfig, VAE),
    "gan": (GANConfig, GAN),
}


def load_prior(directory):
    """Load any registered prior from its folder (strict, safetensors only)."""
    directory = Path(directory)
    kind = json.loads((directory / "tokgen.json").read_text()).get("kind")
    if kind not in PRIORS:
        raise ValueError(f"unknown prior kind {kind!r} in {directory}; valid kinds: {', '.join(sorted(PRIORS))}")
    _, model_cls = PRIORS[kind]
    return model_cls.from_pretrained(directory)


__all__ = ["PRIORS", "SamplingOptions", "TransformerPrior", "TransformerPriorConfig", "RNNPrior", "RNNPriorConfig",
           "load_prior"]
