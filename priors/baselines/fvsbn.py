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

The L conditionals share no parameters, so the strength of the L1 penalty can be chosen for each
position apart. `l1_penalty = [a, b, ...]` trains one "bank" of regressions per strength side by
side (K banks cost K times the compute; the banks are stacked along the output rows of one masked
layer) and, after training, `choose_on_validation` keeps for every position the bank whose
conditional scores the validation split best: per-output model selection, as one would cross-validate
784 separate logistic regressions. The chosen model is an ordinary FVSBN, exact and normalised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from priors.baselines.common import (
    AutoregressiveDensityModel,
    MaskedLinear,
    binary_to_categorical_logits,
    check_sizes,
    config_from_dict,
)
from priors.token_nll import nll_metrics

logger = logging.getLogger(__name__)

LARGE_WEIGHT = 50_000_000  # entries; above this a warning says the model is big


@dataclass(frozen=True)
class FVSBNConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    label_dropout: float = 0.1  # probability of training a row on the null class bias
    # training only: l1_penalty * sum |w| is added to the mean NLL per token. It pushes the weights of
    # far, uninformative earlier positions to zero (a pixel depends mostly on its neighbours). A list
    # trains one bank per value and chooses a value per position on the validation split.
    l1_penalty: float | tuple[float, ...] = 0.0

    def __post_init__(self):
        if isinstance(self.l1_penalty, list):  # JSON / TOML give lists
            object.__setattr__(self, "l1_penalty", tuple(self.l1_penalty))
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
        penalties = self.penalties
        if not penalties or min(penalties) < 0.0:
            raise ValueError(f"l1_penalty must be >= 0 (or a non-empty list of such), got {self.l1_penalty}")
        if len(set(penalties)) != len(penalties):
            raise ValueError(f"l1_penalty lists must hold distinct values, got {self.l1_penalty}")

    @property
    def penalties(self) -> tuple[float, ...]:
        """The L1 strength of every bank: one value, or the list to choose from per position."""
        return tuple(self.l1_penalty) if isinstance(self.l1_penalty, tuple) else (self.l1_penalty,)

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
    """Masked linear layer (block-lower-triangular) + bias + per-class bias -> (b L V) logits.

    With K L1 strengths the layer holds K banks of rows, (K L V_out) in all; `position_bank` (L,)
    says which bank gives each position's conditional (all bank 0 until `choose_on_validation`).
    """

    kind: ClassVar[str] = "fvsbn"
    config_class: ClassVar[type] = FVSBNConfig

    def __init__(self, config: FVSBNConfig):
        super().__init__(config)
        self.block = 1 if config.vocab_size == 2 else config.vocab_size  # V_in = V_out
        self.num_banks = len(config.penalties)
        mask = block_lower_triangular_mask(config.seq_len, self.block, self.block).repeat(self.num_banks, 1)
        if mask.numel() > LARGE_WEIGHT:
            logger.warning("FVSBN weight has %d entries (K (L V)^2 with K=%d, L=%d, V=%d)", mask.numel(),
                           self.num_banks, config.seq_len, config.vocab_size)
        self.regression = MaskedLinear(mask)
        # zero start: every conditional begins uniform, the regression is a convex problem anyway
        nn.init.zeros_(self.regression.weight)
        nn.init.zeros_(self.regression.bias)
        self.class_bias = nn.Embedding(config.num_classes + 1, self.num_banks * config.seq_len * self.block)
        nn.init.zeros_(self.class_bias.weight)
        if self.num_banks > 1:  # one bank needs no choice, and its checkpoints keep their old tensors
            self.register_buffer("position_bank", torch.zeros(config.seq_len, dtype=torch.long))

    @property
    def chooses_on_validation(self) -> bool:
        """Whether training must end with `choose_on_validation` (the stage calls it)."""
        return self.num_banks > 1

    def parameters_in_use(self) -> int:
        """The numbers of the chosen model: one bank's worth (every parameter has K banks)."""
        return sum(p.numel() for p in self.parameters()) // self.num_banks

    def output_logits(self, flat_logits: Tensor) -> Tensor:
        """(... (L V_out)) -> (... L V) categorical logits."""
        if self.block == 1:
            return binary_to_categorical_logits(flat_logits)
        return rearrange(flat_logits, "... (l v) -> ... l v", v=self.block)

    def chosen_rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Indices into the K L V_out rows: the chosen bank's rows of positions [start, stop)."""
        stop = self.config.seq_len if stop is None else stop
        rows = torch.arange(start * self.block, stop * self.block, device=self.regression.weight.device)
        if self.num_banks == 1:
            return rows
        banks = self.position_bank[start:stop].repeat_interleave(self.block)
        return banks * (self.config.seq_len * self.block) + rows

    def chosen_logits(self, input_ids: Tensor, class_index: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """(b L) tokens -> (b (P V_out)) flat logits of positions [start, stop) from their chosen banks."""
        rows = self.chosen_rows(start, stop)
        weight = self.regression.weight[rows] * self.regression.mask[rows]
        inputs = encode_inputs(input_ids, self.config.vocab_size, weight.dtype)
        return F.linear(inputs, weight, self.regression.bias[rows]) + self.class_bias(class_index)[:, rows]

    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        if self.num_banks == 1:  # the plain layer: no row gather
            inputs = encode_inputs(input_ids, self.config.vocab_size, self.regression.weight.dtype)
            return self.output_logits(self.regression(inputs) + self.class_bias(class_index))
        return self.output_logits(self.chosen_logits(input_ids, class_index))

    def bank_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        """(b L) tokens -> (b K L V) logits of every bank (training and the per-position choice)."""
        inputs = encode_inputs(input_ids, self.config.vocab_size, self.regression.weight.dtype)
        flat = self.regression(inputs) + self.class_bias(class_index)
        return self.output_logits(rearrange(flat, "b (k d) -> b k d", k=self.num_banks))

    def loss(self, batch: dict, phase: str, step: int):
        """The mean NLL per token, plus the L1 penalty in training mode only: validation (early
        stopping) and evaluation score the likelihood alone. With K banks the training loss is the
        sum of the K banks' losses (each bank's gradient is that of its own model) and the figures
        are the banks' mean NLL, which early stopping follows until the per-position choice."""
        if self.num_banks == 1:
            nll, metrics = super().loss(batch, phase, step)
            strength = self.config.penalties[0]
            if not self.training or strength == 0.0:
                return nll, metrics
            penalty = strength * self.regression.masked_weight().abs().sum()
            return nll + penalty, {**metrics, "l1_penalty": penalty.detach()}
        token_nll, tokens = self.bank_token_nll(batch)
        nll = token_nll.sum() / (self.num_banks * tokens)  # the banks' mean NLL per scored token
        metrics = nll_metrics(nll)
        if not self.training:
            return nll, metrics
        weights = rearrange(self.regression.masked_weight(), "(k d) i -> k d i", k=self.num_banks)
        strengths = torch.tensor(self.config.penalties, device=weights.device, dtype=weights.dtype)
        penalty = (strengths * weights.abs().sum(dim=(1, 2))).sum()
        return self.num_banks * nll + penalty, {**metrics, "l1_penalty": penalty.detach()}

    def bank_token_nll(self, batch: dict) -> tuple[Tensor, Tensor | float]:
        """(b K L) NLL of every bank's conditional (0 on padding, `loss_mask` False), and the number of
        scored tokens per bank. Labels are dropped in training mode only, as for every prior."""
        input_ids, mask, class_index = self.training_batch(batch)
        logits = self.bank_logits(self.mask_inputs(input_ids, mask), class_index)
        targets = repeat(input_ids, "b l -> b k l 1", k=self.num_banks)
        nll = -F.log_softmax(logits.float(), dim=-1).gather(-1, targets).squeeze(-1)
        if mask is None:
            return nll, float(input_ids.numel())
        return nll * rearrange(mask.to(nll.dtype), "b l -> b 1 l"), mask.sum().clamp_min(1)

    @torch.no_grad()
    def choose_on_validation(self, dataset, batch_size: int) -> dict:
        """Give every position the bank whose conditional has the lowest summed NLL on `dataset`
        (items with "input_ids", optional "label" and "loss_mask"); returns what was chosen."""
        if self.num_banks == 1:
            return {}
        was_training = self.training
        self.eval()
        totals = torch.zeros(self.num_banks, self.config.seq_len, dtype=torch.float64, device=self.device)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
            token_nll, _ = self.bank_token_nll({key: value.to(self.device) for key, value in batch.items()})
            totals += token_nll.sum(dim=0).double()
        self.train(was_training)
        self.position_bank.copy_(totals.argmin(dim=0))
        items = len(dataset)
        chosen = totals.gather(0, self.position_bank[None])[0]
        counts = torch.bincount(self.position_bank, minlength=self.num_banks).tolist()
        counts = {str(value): count for value, count in zip(self.config.penalties, counts)}
        logger.info("FVSBN: positions per L1 strength %s; validation NLL %.4f (banks alone: %s) per item", counts,
                    float(chosen.sum()) / items, [round(float(t) / items, 4) for t in totals.sum(dim=1)])
        return {"positions_per_l1_penalty": counts, "chosen_val_nll_per_item": float(chosen.sum()) / items,
                "bank_val_nll_per_item": [float(t) / items for t in totals.sum(dim=1)]}

    def next_token_logits(self, input_ids: Tensor, position: int, class_index: Tensor) -> Tensor:
        # only the rows of block `position` are needed: O(L V^2) instead of O((L V)^2)
        flat = self.chosen_logits(input_ids, class_index, position, position + 1)
        return self.output_logits(flat)[:, 0]  # (b 1 V) -> (b V)
