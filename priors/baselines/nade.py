"""NADE: the neural autoregressive distribution estimator, one hidden layer shared by all conditionals.

Larochelle & Murray 2011, "The Neural Autoregressive Distribution Estimator": position t's
conditional reads a hidden layer h_t = sigmoid(c + W[:, <t] x_<t) whose input weights are shared
across positions, so the pre-activations obey the running sum a_1 = c, a_{t+1} = a_t + W[:, t] x_t
and all L conditionals cost O(L H) instead of O(L^2 H). Output: p(x_t = 1 | x_<t) =
sigmoid(b_t + V_t . h_t) for binary tokens (the paper's model; training computes all a_t by
blocked matmuls, see `binary_pre_activations`), a softmax over V tokens with a
(H V) output matrix per position otherwise (the categorical input x_t is then its one-hot code,
so W has one column per (position, token)); the exact log-likelihood costs O(L H V). Class
conditioning gives each class its own hidden bias c (row C: the null class, trained by label
dropout, which also gives guidance). Sampling carries the running sum a_t from one position to the
next, so a whole sample costs O(L H) like one likelihood pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from priors.baselines.common import (
    AutoregressiveDensityModel,
    binary_to_categorical_logits,
    check_sizes,
    config_from_dict,
)
from priors.baselines import nade_fused
from priors.token_nll import nll_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NADEConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    hidden_size: int = 500  # the paper's H on binarized MNIST
    label_dropout: float = 0.1

    def __post_init__(self):
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")

    @classmethod
    def from_dict(cls, data: dict) -> "NADEConfig":
        return config_from_dict(cls, data)


class NADE(AutoregressiveDensityModel):
    """input_weight (L K_in H), hidden_bias (C+1 H), output_weight (L H K_out), output_bias (L K_out).

    K = 1 for binary tokens (the token value / one Bernoulli logit), K = V otherwise.
    """

    kind: ClassVar[str] = "nade"
    config_class: ClassVar[type] = NADEConfig

    def __init__(self, config: NADEConfig):
        super().__init__(config)
        self.block = 1 if config.vocab_size == 2 else config.vocab_size
        seq_len, hidden = config.seq_len, config.hidden_size
        self.input_weight = nn.Parameter(torch.randn(seq_len, self.block, hidden) / math.sqrt(seq_len))
        self.hidden_bias = nn.Embedding(config.num_classes + 1, hidden)
        nn.init.zeros_(self.hidden_bias.weight)
        self.output_weight = nn.Parameter(torch.randn(seq_len, hidden, self.block) / math.sqrt(hidden))
        self.output_bias = nn.Parameter(torch.zeros(seq_len, self.block))

    def input_contributions(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """(b n) tokens at positions start..start+n-1 -> (b n H): the column W[:, s] x_s of each."""
        stop = start + input_ids.shape[1]
        if self.block == 1:
            return einsum(input_ids.to(self.input_weight.dtype), self.input_weight[start:stop, 0], "b l, l h -> b l h")
        positions = torch.arange(start, stop, device=input_ids.device)
        return self.input_weight[positions, input_ids]  # (b l h) by advanced indexing of (l, token)

    def output_logits(self, hidden: Tensor, positions: slice) -> Tensor:
        """(b l H) hidden units of the positions -> (b l V) categorical logits."""
        logits = einsum(hidden, self.output_weight[positions], "b l h, l h k -> b l k") + self.output_bias[positions]
        if self.block == 1:
            return binary_to_categorical_logits(rearrange(logits, "b l 1 -> b l"))
        return logits

    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        if self.block > 1:
            return self.cumsum_token_logits(input_ids, class_index)
        hidden = torch.sigmoid(self.binary_pre_activations(input_ids, self.hidden_bias(class_index)))  # (L b H)
        logits = einsum(hidden, self.output_weight[:, :, 0], "l b h, l h -> b l") + self.output_bias[:, 0]
        return binary_to_categorical_logits(logits)

    def cumsum_token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        """`token_logits` through `running_pre_activations`: the categorical model's path, and for
        binary tokens the reference that `binary_pre_activations` replaces (benchmarked against it)."""
        bias = rearrange(self.hidden_bias(class_index), "b h -> b 1 h")
        return self.output_logits(torch.sigmoid(self.running_pre_activations(input_ids) + bias), slice(None))

    def running_pre_activations(self, input_ids: Tensor) -> Tensor:
        """(b L) tokens -> (b L H): a_t - c = sum_{s<t} W[:, s] x_s, an exclusive cumulative sum."""
        contributions = self.input_contributions(input_ids)
        return F.pad(contributions[:, :-1].cumsum(dim=1), (0, 0, 1, 0))

    def binary_pre_activations(self, input_ids: Tensor, hidden_bias: Tensor) -> Tensor:
        """(b L) binary tokens, (b H) bias c -> (L b H) a_t, position-major: c + `running_pre_activations`.

        Blocked over positions, blocks of k = ceil(sqrt(L)): inside a block the sum over earlier
        positions is one batched matmul of the block's inputs, masked strictly lower-triangular,
        with its weight rows; the totals of earlier blocks come from a cumulative sum over the
        L / k block totals. That is O(L sqrt(L) H) work rather than O(L H), but as matmuls: the
        cumulative sum over the whole (b L H) tensor and its flipped backward are memory-bound, and
        a training step is faster without them (`benchmarks/bench_baseline_training.py`).
        """
        batch, seq_len = input_ids.shape
        block = math.isqrt(seq_len - 1) + 1
        padding = -seq_len % block  # zero inputs and zero weight rows add nothing
        weight = rearrange(F.pad(self.input_weight[:, 0], (0, 0, 0, padding)), "(n k) h -> n k h", k=block)
        inputs = rearrange(F.pad(input_ids.to(weight.dtype), (0, padding)), "b (n k) -> n b k", k=block)
        earlier = torch.ones(block, block, dtype=weight.dtype, device=weight.device).tril(-1)  # [t, s]: s < t
        masked = rearrange(inputs, "n b s -> n 1 b s") * rearrange(earlier, "t s -> t 1 s")  # (n t b s)
        within = torch.bmm(rearrange(masked, "n t b s -> n (t b) s"), weight)
        totals = torch.bmm(inputs, weight)  # (n b h)
        before = totals.cumsum(dim=0) - totals + hidden_bias  # the bias joins here, on the small tensor
        running = rearrange(within, "n (t b) h -> n t b h", b=batch) + rearrange(before, "n b h -> n 1 b h")
        running = rearrange(running, "n t b h -> (n t) b h")
        return running[:seq_len] if padding else running  # (slicing costs a zero-filled gradient)

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The base class's mean NLL per token; binary tokens on the CPU take `BinaryNADENLL`, which
        computes the same loss and gradients in one cache-sized pass (2.9x faster a step at batch 100) once
        the batch is large enough. On a GPU the blocked matmuls stay: its bandwidth suits them, and a
        loop of small kernels does not."""
        input_elements = batch["input_ids"].numel() * self.config.hidden_size
        if self.block > 1 or self.device.type != "cpu" or input_elements < nade_fused.MIN_ELEMENTS:
            return super().loss(batch, phase, step)
        input_ids, mask, class_index = self.training_batch(batch)
        weights = torch.ones(input_ids.shape) if mask is None else mask.to(self.device).float()
        bias = self.hidden_bias(class_index)
        inputs = self.mask_inputs(input_ids, mask).to(self.input_weight.dtype)
        total = nade_fused.BinaryNADENLL.apply(
            inputs, weights.to(inputs.dtype), bias, self.input_weight[:, 0], self.output_weight[:, :, 0], self.output_bias[:, 0]
        )
        nll = total / weights.sum().clamp_min(1.0)
        return nll, nll_metrics(nll)

    def next_token_logits(self, input_ids: Tensor, position: int, class_index: Tensor) -> Tensor:
        # one position's a_t only: O(t H + H V) rather than the whole sequence
        pre_activation = self.hidden_bias(class_index) + self.input_contributions(input_ids[:, :position]).sum(dim=1)
        hidden = rearrange(torch.sigmoid(pre_activation), "b h -> b 1 h")
        return self.output_logits(hidden, slice(position, position + 1))[:, 0]

    def decode(self, tokens: Tensor, classes: Tensor, prefix_len: int, guided: bool, options, generator) -> None:
        """Fill `tokens[:, prefix_len:]` in place, updating a_t by one column per position (O(L H) per sample)."""
        pre_activation = self.hidden_bias(classes) + self.input_contributions(tokens[:, :prefix_len]).sum(dim=1)
        for position in range(prefix_len, self.config.seq_len):
            hidden = rearrange(torch.sigmoid(pre_activation), "b h -> b 1 h")
            logits = self.output_logits(hidden, slice(position, position + 1))[:, 0]
            chosen = self.choose_tokens(logits, options, generator, guided)
            tokens[:, position] = chosen
            pre_activation = pre_activation + self.input_contributions(chosen[:, None], start=position)[:, 0]
