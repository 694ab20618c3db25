"""Comparison density models over token sequences: histograms, FVSBN, NADE and MADE.

Each is an exact autoregressive density with the stage-two prior API (see `common.py`); the
histograms are fitted by counting (`fit_by_counting = True`), the others by the gradient loop.
"""

from priors.baselines.common import AutoregressiveDensityModel
from priors.baselines.fvsbn import FVSBN, FVSBNConfig
from priors.baselines.gan import GAN, GANConfig
from priors.baselines.histogram import HistogramConfig, HistogramPrior
from priors.baselines.made import MADE, MADEConfig
from priors.baselines.nade import NADE, NADEConfig
from priors.baselines.vae import VAE, VAEConfig

__all__ = [
    "AutoregressiveDensityModel",
    "FVSBN",
    "FVSBNConfig",
    "HistogramConfig",
    "HistogramPrior",
    "MADE",
    "MADEConfig",
    "NADE",
    "NADEConfig",
    "GAN",
    "GANConfig",
    "VAE",
    "VAEConfig",
]
