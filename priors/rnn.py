"""LSTM / GRU prior over token sequences: the recurrent comparison for the transformer prior.

A recurrent network reads the token sequence left to right after a start token and predicts
each next token with a softmax over the V image tokens (Graves 2013, "Generating Sequences With
Recurrent Neural Networks"; the LSTM of Hochreiter & Schmidhuber 1997, the GRU of Cho et al.
2014). Class conditioning follows the transformer prior: the start token is the class token
`V + c`, or the null token `V + C` for unconditional models and for labels dropped in training
(label dropout makes one network both conditional and unconditional, so classifier-free guidance
(Ho & Salimans 2022) needs no second model). The softmax covers only the V image tokens, so the
likelihood is exact. Sampling carries the recurrent state: one step per token, O(L) in all,
with the conditional and null rows of guidance stepped together in one doubled batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from priors.baselines.common import AutoregressiveDensityModel, check_sizes, config_from_dict
from priors.sampling import SamplingOptions

logger = logging.getLogger(__name__)

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass(frozen=True)
class RNNPriorConfig:
    """Sizes of the recurrent prior; vocab_size, seq_len and num_classes come from the token manifest."""

    vocab_size: int
    seq_len: int
    num_classes: int = 0  # 0 = unconditional
    cell: str = "lstm"  # "lstm" | "gru"
    embedding_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.1  # between recurrent layers and before the output layer
    label_dropout: float = 0.1  # probability of training on the null token instead of the label

    def __post_init__(self):
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if min(self.embedding_dim, self.hidden_size, self.num_layers) < 1:
            raise ValueError("embedding_dim, hidden_size and num_layers must be positive")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.label_dropout <= 1.0):
            raise ValueError("dropout must lie in [0, 1) and label_dropout in [0, 1]")

    @classmethod
    def from_dict(cls, data: dict) -> "RNNPriorConfig":
        return config_from_dict(cls, data)


class RNNPrior(AutoregressiveDensityModel):
    """Start token (class or null) + LSTM/GRU over the tokens + linear head to V logits."""

    kind: ClassVar[str] = "rnn"
    config_class: ClassVar[type] = RNNPriorConfig

    def __init__(self, config: RNNPriorConfig):
        super().__init__(config)
        # V image tokens, then C class tokens, then the null token; only image tokens are predicted
        self.embedding = nn.Embedding(config.vocab_size + config.num_classes + 1, config.embedding_dim)
        self.rnn = CELLS[config.cell](
            input_size=config.embedding_dim,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.output_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def start_tokens(self, class_index: Tensor) -> Tensor:
        """(b,) class index in [0, C] -> (b 1) start token ids in [V, V + C]."""
        return rearrange(class_index + self.config.vocab_size, "b -> b 1")

    def run(self, input_ids: Tensor, state=None) -> tuple[Tensor, object]:
        """(b n) token ids (image, class or null) -> (b n V) logits of the following tokens, new state."""
        hidden, state = self.rnn(self.embedding(input_ids), state)
        return self.head(self.output_dropout(hidden)), state

    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        # position t sees the start token and x_<t: the last token only ever feeds a prediction past the end
        inputs = torch.cat([self.start_tokens(class_index), input_ids[:, :-1]], dim=1)
        logits, _ = self.run(inputs)
        return logits

    def decode(self, tokens: Tensor, classes: Tensor, prefix_len: int, guided: bool, options: SamplingOptions,
               generator) -> None:
        """Fill `tokens[:, prefix_len:]` (r L): read the start token and prefix in one call, then carry
        the recurrent state, one step per new token."""
        if prefix_len == self.config.seq_len:
            return
        logits, state = self.run(torch.cat([self.start_tokens(classes), tokens[:, :prefix_len]], dim=1))
        for position in range(prefix_len, self.config.seq_len):
            tokens[:, position] = self.choose_tokens(logits[:, -1], options, generator, guided)
            if position + 1 < self.config.seq_len:
                logits, state = self.run(tokens[:, position : position + 1], state)
