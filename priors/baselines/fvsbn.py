"""FVSBN: the fully visible sigmoid belief network, one regression per position on all earlier tokens.

Frey 1998 ("Graphical Models for Machine Learning and Digital Communication"), as benchmarked by
Larochelle & Murray 2011 ("The Neural Autoregressive Distribution Estimator"): p(x_t = 1 | x_<t)
= sigmoid(b_t + sum_{s<t} w_ts x_s) for binary tokens. For a vocabulary V > 2 each position is a
softmax regression on the one-hot codes of all earlier tokens. The whole model is one masked
linear layer from the (L V_in) inputs to the (L V_out) logits whose mask is strictly
block-lower-triangular (output block t sees input blocks s < t), so one matrix product gives all
L conditionals and the likelihood is exact. Binary models use V_in = V_out = 1 (the token itself
and one logit), exactly the paper's FVSBN. Class conditioning adds a learned per-class bias to
every logit (row C: the null class, trained by label dropout, which also gives guidance). The
weight has (L V)^2 entries: fine for binarized pixels (L = 784, V = 2) but large for big vocabularies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from priors.baselines.common import (
    AutoregressiveDensityModel,
    MaskedLinear,
    binary_to_categorical_logits,
    check_sizes,
    config_from_dict,
)

logger = logging.getLogger(__name__)

LARGE_WEIGHT = 50_000_000  # entries; above this a warning says the model is big


@dataclass(frozen=True)
class FVSBNConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    label_dropout: float = 0.1  # probability of training a row on the null class bias
    # training only: l1_penalty * sum |w| is added to the mean NLL per token. It pushes the weights of
    # far, uninformative earlier positions to zero (a pixel depends mostly on its neighbours).
    l1_penalty: float = 0.0

    def __post_init__(self):
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
        if self.l1_penalty < 0.0:
            raise ValueError(f"l1_penalty must be >= 0, got {self.l1_penalty}")

    @classmethod
    def from_dict(cls, data: dict) -> "FVSBNConfig":
        return config_from_dict(cls, data)


def block_lower_triangular_mask(seq_len: int, out_block: int, in_block: int) -> Tensor:
    """(L*out_block, L*in_block) mask, 1 where output position t reads input position s < t."""
    positions = torch.arange(seq_len)
    allowed = (rearrange(positions, "t -> t 1") > rearrange(positions, "s -> 1 s")).float()
    return allowed.repeat_interleave(out_block, dim=0).repeat_interleave(in_block, dim=1)


def encode_inputs(input_ids: Tensor, vocab_size: int, weight_dtype: torch.dtype) -> Tensor:
    """(b L) tokens -> (b (L V_in)) inputs: the tokens themselves when binary, one-hot codes otherwise."""
    if vocab_size == 2:
        return input_ids.to(weight_dtype)
    return rearrange(F.one_hot(input_ids, vocab_size).to(weight_dtype), "b l v -> b (l v)")


class FVSBN(AutoregressiveDensityModel):
    """Masked linear layer (block-lower-triangular) + bias + per-class bias -> (b L V) logits."""

    kind: ClassVar[str] = "fvsbn"
    config_class: ClassVar[type] = FVSBNConfig

    def __init__(self, config: FVSBNConfig):
        super().__init__(config)
        self.block = 1 if config.vocab_size == 2 else config.vocab_size  # V_in = V_out
        mask = block_lower_triangular_mask(config.seq_len, self.block, self.block)
        if mask.numel() > LARGE_WEIGHT:
            logger.warning("FVSBN weight has %d entries ((L V)^2 with L=%d, V=%d)", mask.numel(), config.seq_len,
                           config.vocab_size)
        self.regression = MaskedLinear(mask)
        # zero start: every conditional begins uniform, the regression is a convex problem anyway
        nn.init.zeros_(self.regression.weight)
        nn.init.zeros_(self.regression.bias)
        self.class_bias = nn.Embedding(config.num_classes + 1, config.seq_len * self.block)
        nn.init.zeros_(self.class_bias.weight)

    def output_logits(self, flat_logits: Tensor) -> Tensor:
        """(... (L V_out)) -> (... L V) categorical logits."""
        if self.block == 1:
            return binary_to_categorical_logits(flat_logits)
        return rearrange(flat_logits, "... (l v) -> ... l v", v=self.block)

    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        inputs = encode_inputs(input_ids, self.config.vocab_size, self.regression.weight.dtype)
        return self.output_logits(self.regression(inputs) + self.class_bias(class_index))

    def loss(self, batch: dict, phase: str, step: int):
        """The mean NLL per token, plus the L1 penalty in training mode only: validation (early
        stopping) and evaluation score the likelihood alone."""
        nll, metrics = super().loss(batch, phase, step)
        if not self.training or self.config.l1_penalty == 0.0:
            return nll, metrics
        penalty = self.config.l1_penalty * self.regression.masked_weight().abs().sum()
        return nll + penalty, {**metrics, "l1_penalty": penalty.detach()}

    def next_token_logits(self, input_ids: Tensor, position: int, class_index: Tensor) -> Tensor:
        # only the rows of block `position` are needed: O(L V^2) instead of O((L V)^2)
        rows = slice(position * self.block, (position + 1) * self.block)
        weight = self.regression.weight[rows] * self.regression.mask[rows]
        inputs = encode_inputs(input_ids, self.config.vocab_size, weight.dtype)
        flat = F.linear(inputs, weight, self.regression.bias[rows]) + self.class_bias(class_index)[:, rows]
        return self.output_logits(flat)[:, 0]  # (b 1 V) -> (b V)
