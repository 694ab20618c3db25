"""Histogram priors: counting baselines, position-wise ("independent") or over whole sequences ("joint").

The independent histogram is the product of per-position categoricals, p(x | c) = prod_t
p_t(x_t | c), each the additively smoothed (Laplace / Lidstone) frequency of token x_t at
position t among the training sequences of class c: the simplest density a prior must beat. The
joint histogram counts whole sequences, p(x | c) = (n_c(x) + s) / (N_c + s V^L); it is exact on
the training set's frequencies and shows overfitting plainly, because any held-out sequence unseen
in training only gets the smoothing mass s / (N_c + s V^L). It is refused when V^L > 2^20. Both
are written autoregressively (the conditionals of the smoothed joint are ratios of prefix
counts), so they sample and score through the same code as the neural baselines. Counts live in
float64 buffers and are filled by `fit` (no gradient): these models have `fit_by_counting = True`
and no parameters, and a pipeline calls `fit` over the training tokens instead of the gradient
loop. With classes, the null class C stands for the pooled counts of all classes, which makes
guidance well defined. See e.g. Chen & Goodman 1996 on additive smoothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from priors.baselines.common import AutoregressiveDensityModel, check_sizes, config_from_dict

logger = logging.getLogger(__name__)

MODES = ("independent", "joint")
MAX_JOINT_SEQUENCES = 2**20


@dataclass(frozen=True)
class HistogramConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    smoothing: float = 1.0  # pseudo-count added to every cell; > 0 keeps held-out NLL finite
    mode: str = "independent"  # "independent" | "joint"

    def __post_init__(self):
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.smoothing > 0:
            raise ValueError(f"smoothing must be > 0 (unseen tokens would get -inf nats), got {self.smoothing}")
        if self.mode == "joint" and self.vocab_size**self.seq_len > MAX_JOINT_SEQUENCES:
            raise ValueError(
                f"a joint histogram over vocab_size**seq_len = {self.vocab_size}**{self.seq_len} sequences is too "
                f"large (limit 2**20 = {MAX_JOINT_SEQUENCES}); use mode='independent'"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "HistogramConfig":
        return config_from_dict(cls, data)


class HistogramPrior(AutoregressiveDensityModel):
    """Smoothed counts per class: `counts` is (k L V) in independent mode, (k V^L) in joint mode, k = max(C, 1)."""

    kind: ClassVar[str] = "histogram"
    config_class: ClassVar[type] = HistogramConfig
    fit_by_counting: ClassVar[bool] = True

    def __init__(self, config: HistogramConfig):
        super().__init__(config)
        rows = max(config.num_classes, 1)
        if config.mode == "independent":
            shape = (rows, config.seq_len, config.vocab_size)
        else:
            shape = (rows, config.vocab_size**config.seq_len)
        self.register_buffer("counts", torch.zeros(shape, dtype=torch.float64))
        # place values of the row-major flat index: the first token is the most significant digit,
        # so the sequences sharing a prefix are contiguous and prefix marginals are plain sums
        place = config.vocab_size ** torch.arange(config.seq_len - 1, -1, -1, dtype=torch.float64)
        self.register_buffer("place_values", place.long(), persistent=False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}  # nothing to optimise: use `fit`

    def phases(self, step: int) -> list[str]:
        return []

    def loss(self, batch: dict, phase: str, step: int):
        raise RuntimeError("a histogram prior has no gradient training; call fit(input_ids, label) (fit_by_counting)")

    @torch.no_grad()
    def fit(self, input_ids: Tensor, label: Tensor | None = None) -> None:
        """Add the sequences (b L) (with their labels (b,) when the prior has classes) to the counts.

        Accumulates: call it once per batch of the training set.
        """
        input_ids = self.check_tokens(input_ids.to(self.device))
        batch = input_ids.shape[0]
        if self.config.num_classes > 0 and label is None:
            raise ValueError("a class-conditional histogram needs the labels of the sequences it counts")
        rows = self.class_index(label, batch) if self.config.num_classes > 0 else torch.zeros_like(input_ids[:, 0])
        if self.config.mode == "independent":
            positions = torch.arange(self.config.seq_len, device=self.device).expand(batch, -1)
            index = (rearrange(rows, "b -> b 1"), positions, input_ids)
            self.counts.index_put_(index, torch.ones_like(input_ids, dtype=torch.float64), accumulate=True)
        else:
            flat = (input_ids * self.place_values).sum(dim=1)
            self.counts.index_put_((rows, flat), torch.ones(batch, dtype=torch.float64, device=self.device),
                                   accumulate=True)

    def class_table(self) -> Tensor:
        """Counts with one row per class index: (C+1 ...) with the pooled counts as the null row C."""
        pooled = self.counts.sum(dim=0, keepdim=True)
        return torch.cat([self.counts, pooled]) if self.config.num_classes > 0 else pooled

    def joint_position_logits(self, table: Tensor, input_ids: Tensor, position: int, class_index: Tensor) -> Tensor:
        """(k V^L) counts -> (b V) log(n(x_<t v) + s V^(L-t-1)) for t = position.

        Smoothing every full sequence by s gives each prefix of length t+1 the mass s V^(L-t-1), so
        these are the smoothed joint's conditionals up to the normaliser n(x_<t) + s V^(L-t).
        """
        vocab, seq_len = self.config.vocab_size, self.config.seq_len
        prefix_counts = rearrange(table, "k (p v rest) -> k p v rest", p=vocab**position, v=vocab).sum(dim=-1)
        prefix = (input_ids[:, :position] * self.place_values[seq_len - position :]).sum(dim=1)
        chosen = prefix_counts[class_index, prefix]
        return torch.log(chosen + self.config.smoothing * float(vocab) ** (seq_len - position - 1))

    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        """(b L), (b,) -> (b L V) float64 log of unnormalised smoothed counts; their softmax is exact."""
        table = self.class_table()
        if self.config.mode == "independent":
            return torch.log(table[class_index] + self.config.smoothing)
        positions = range(self.config.seq_len)
        return torch.stack([self.joint_position_logits(table, input_ids, t, class_index) for t in positions], dim=1)

    def next_token_logits(self, input_ids: Tensor, position: int, class_index: Tensor) -> Tensor:
        table = self.class_table()
        if self.config.mode == "independent":
            return torch.log(table[class_index, position] + self.config.smoothing)
        return self.joint_position_logits(table, input_ids, position, class_index)

    def token_log_probs(self, input_ids: Tensor, label: Tensor | None = None) -> Tensor:
        """(b L) -> (b L) nats; normalised in float64 because counts can be large."""
        input_ids = self.check_tokens(input_ids.to(self.device))
        logits = self.token_logits(input_ids, self.class_index(label, input_ids.shape[0]))
        log_probs = F.log_softmax(logits, dim=-1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
        return log_probs.float()
