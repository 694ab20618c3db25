"""MADE: a masked autoencoder whose masks make its outputs the conditionals of an autoregressive model.

Germain, Gregor, Murray & Larochelle 2015, "MADE: Masked Autoencoder for Distribution
Estimation". Every unit gets a degree: input units of position t have degree t+1, hidden units
degrees in [1, L-1], output units of position t degree t+1. A hidden unit of degree m may read
units of degree <= m, and output t may read hidden units of degree < t+1 = only inputs before t,
so one pass of the masked MLP gives all L conditionals p(x_t | x_<t) exactly. We use the natural
ordering and deterministic degrees spread evenly from 1 to L-1 (`linspace(1, L-1, H)` rounded),
so a config always rebuilds the same masks and checkpoints hold only
weights. (Degrees 1 + k mod (L-1) would leave every input above degree H unread when H < L-1:
with 500 units on 784 pixels, the last 284 pixels would condition nothing.) Inputs are the tokens
themselves when binary (Bernoulli outputs, as in the paper) and one-hot codes otherwise (a softmax
over V per position). Class conditioning adds a learned per-class bias to the first hidden layer
(row C: the null class, trained by label dropout, which also gives guidance). Sampling needs one
full pass per position, as the paper notes.

`direct_connections` adds a masked linear map straight from the inputs to the outputs (an FVSBN
inside the MADE), as the authors' released MNIST command does (`direct_input_connect = Output`):
the hidden layers then model what a per-pixel logistic regression on earlier pixels misses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from priors.baselines.common import (
    AutoregressiveDensityModel,
    MaskedLinear,
    binary_to_categorical_logits,
    check_sizes,
    config_from_dict,
)
from priors.baselines.fvsbn import block_lower_triangular_mask, encode_inputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MADEConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    hidden_sizes: tuple[int, ...] = (500,)  # one or two hidden layers, as in the paper
    label_dropout: float = 0.1
    direct_connections: bool = False  # inputs -> outputs masked linear term (off: older checkpoints load)

    def __post_init__(self):
        if isinstance(self.hidden_sizes, list):  # JSON / TOML give lists
            object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if not 1 <= len(self.hidden_sizes) <= 2 or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be one or two positive sizes, got {self.hidden_sizes}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")

    @classmethod
    def from_dict(cls, data: dict) -> "MADEConfig":
        return config_from_dict(cls, data)


def made_masks(seq_len: int, block: int, hidden_sizes: tuple[int, ...]) -> list[Tensor]:
    """The (out, in) masks of every layer, input -> hidden ... -> output, from the unit degrees."""
    input_degrees = torch.arange(1, seq_len + 1).repeat_interleave(block)
    top = max(seq_len - 1, 1)
    hidden_degrees = [torch.linspace(1, top, size).round().long() for size in hidden_sizes]
    masks, previous = [], input_degrees
    for degrees in hidden_degrees:
        masks.append((rearrange(degrees, "o -> o 1") >= rearrange(previous, "i -> 1 i")).float())
        previous = degrees
    # strict inequality at the output: output t never sees input t itself
    masks.append((rearrange(input_degrees, "o -> o 1") > rearrange(previous, "i -> 1 i")).float())
    return masks


class MADE(AutoregressiveDensityModel):
    """Masked MLP (ReLU hidden layers) from (L K_in) inputs to (L K_out) logits; K = 1 binary, V otherwise."""

    kind: ClassVar[str] = "made"
    config_class: ClassVar[type] = MADEConfig

    def __init__(self, config: MADEConfig):
        super().__init__(config)
        self.block = 1 if config.vocab_size == 2 else config.vocab_size
        masks = made_masks(config.seq_len, self.block, config.hidden_sizes)
        self.hidden_layers = nn.ModuleList(MaskedLinear(mask) for mask in masks[:-1])
        self.output_layer = MaskedLinear(masks[-1])
        self.direct = None
        if config.direct_connections:
            direct_mask = block_lower_triangular_mask(config.seq_len, self.block, self.block)
            self.direct = MaskedLinear(direct_mask, bias=False)
            nn.init.zeros_(self.direct.weight)  # starts as the plain MADE; the term is convex in its weight
        self.class_bias = nn.Embedding(config.num_classes + 1, config.hidden_sizes[0])
        nn.init.zeros_(self.class_bias.weight)

    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        inputs = encode_inputs(input_ids, self.config.vocab_size, self.output_layer.weight.dtype)
        hidden = inputs
        for index, layer in enumerate(self.hidden_layers):
            pre_activation = layer(hidden)
            if index == 0:
                pre_activation = pre_activation + self.class_bias(class_index)
            hidden = torch.relu(pre_activation)
        flat = self.output_layer(hidden)
        if self.direct is not None:
            flat = flat + self.direct(inputs)
        if self.block == 1:
            return binary_to_categorical_logits(flat)
        return rearrange(flat, "b (l v) -> b l v", v=self.block)
