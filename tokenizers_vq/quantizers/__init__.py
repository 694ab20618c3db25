"""Quantizers: each maps (b n d) encoder outputs to codes and returns a `QuantizerOutput`.

Registry convention: `QUANTIZERS[kind] = (ConfigClass, ModuleClass)`, built as
`ModuleClass(config, dim)` where `dim` is the code dimension chosen by the owning tokenizer.
Every config carries its registry name in a `kind` field, so `dataclasses.asdict` output can be
turned back into the right config by `quantizer_config_from_dict`. Every module has
`codebook_size` (per level), `num_codebooks` (indices are `(b n)` when 1, `(b n q)` otherwise),
`lookup(indices) -> (b n d)` and `to_indices(z)` (encode only: no state change, no collectives).
"""

from typing import Union

from torch import nn

from tokenizers_vq.quantizers.base import QuantizerOutput, code_counts, usage_and_perplexity
from tokenizers_vq.quantizers.lfq import LFQConfig, LookupFreeQuantizer
from tokenizers_vq.quantizers.residual import ResidualVectorQuantizer, ResidualVQConfig
from tokenizers_vq.quantizers.vq import VectorQuantizer, VQConfig

QUANTIZERS = {
    "vq": (VQConfig, VectorQuantizer),
    "lfq": (LFQConfig, LookupFreeQuantizer),
    "residual_vq": (ResidualVQConfig, ResidualVectorQuantizer),
}

# The type of a tokenizer's `quantizer` field; `config_from_dict` picks the member by `kind`.
QuantizerConfig = Union[VQConfig, LFQConfig, ResidualVQConfig]


def quantizer_config_from_dict(data: dict) -> QuantizerConfig:
    """Rebuild a quantizer config from its `asdict` form; a dict without `kind` is a VQ config."""
    kind = data.get("kind", "vq")
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {kind!r}; valid kinds: {', '.join(sorted(QUANTIZERS))}")
    config_cls, _ = QUANTIZERS[kind]
    return config_cls.from_dict(data)


def build_quantizer(config: QuantizerConfig, dim: int) -> nn.Module:
    """The quantizer module for `config`, taking (b n dim) inputs."""
    kind = getattr(config, "kind", None)
    if kind not in QUANTIZERS or not isinstance(config, QUANTIZERS[kind][0]):
        raise ValueError(f"not a registered quantizer config: {config!r}; valid kinds: {', '.join(sorted(QUANTIZERS))}")
    _, quantizer_cls = QUANTIZERS[kind]
    return quantizer_cls(config, dim)


__all__ = [
    "QUANTIZERS",
    "LFQConfig",
    "LookupFreeQuantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "ResidualVQConfig",
    "ResidualVectorQuantizer",
    "VQConfig",
    "VectorQuantizer",
    "build_quantizer",
    "code_counts",
    "quantizer_config_from_dict",
    "usage_and_perplexity",
]
