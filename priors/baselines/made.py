"""MADE: a masked autoencoder whose masks make its outputs the conditionals of an autoregressive model.

Germain, Gregor, Murray & Larochelle 2015, "MADE: Masked Autoencoder for Distribution
Estimation". The masks (made_masks.py) give each output only the inputs generated before it, so
one pass of the masked MLP gives all L conditionals exactly. Inputs are the tokens themselves
when binary (Bernoulli outputs, as in the paper) and one-hot codes otherwise (a softmax over V per
position). Class conditioning adds a learned per-class bias to the first hidden layer (row C: the
null class, trained by label dropout, which also gives guidance). The paper samples with one full
pass per position; here each drawn token adds its column of the first layer's weight to a running
pre-activation (as NADE does), so a sample with one hidden layer costs O(L H) rather than O(L^2 H).

`direct_connections` adds a masked linear map straight from the inputs to the outputs (an FVSBN
inside the MADE), as the authors' released MNIST command does (`direct_input_connect = Output`):
the hidden layers then model what a per-pixel logistic regression on earlier pixels misses.

`num_masks = K > 1` is the paper's connectivity-agnostic training (section 4.2, its best MNIST
results): training step s uses mask s mod K (one set of weights, K connectivities; with
`order_agnostic` also K orderings), and the model's density is the uniform mixture of the K
autoregressive models, p(x) = (1/K) sum_k p_k(x), exact and normalised like each of them.
Sampling draws a component, then samples in its ordering. With a prefix it draws the component
from its posterior given the prefix, p(k | prefix) ~ p_k(prefix), which is exact when every
component generates the prefix first: always with the natural ordering, so a prefix is refused
for an order-agnostic ensemble.
"""

from __future__ import annotations

import logging
import math
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
from priors.baselines.fvsbn import encode_inputs
from priors.baselines.made_masks import connectivity_masks, mask_degrees
from priors.sampling import draw
from priors.token_nll import nll_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MADEConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    hidden_sizes: tuple[int, ...] = (500,)  # one or two hidden layers, as in the paper
    label_dropout: float = 0.1
    direct_connections: bool = False  # inputs -> outputs masked linear term (off: older checkpoints load)
    num_masks: int = 1  # K > 1: connectivity-agnostic training and a K-component mixture density
    order_agnostic: bool = False  # masks 1..K-1 also get a random ordering of the positions
    mask_seed: int = 0  # seeds the degrees (and orderings) of masks 1..K-1
    # training only: direct_l1_penalty * sum |direct weight| joins the mean NLL per token. The direct
    # term is an FVSBN, and an FVSBN fits binarized MNIST best under an L1 penalty (BENCHMARKS.md).
    direct_l1_penalty: float = 0.0
    # training only: dropout on the hidden units (Srivastava et al. 2014). The 4000-unit MADE fits the
    # train split 7 nats better than validation; the paper's masks ensemble was its regulariser.
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.hidden_sizes, list):  # JSON / TOML give lists
            object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if not 1 <= len(self.hidden_sizes) <= 2 or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be one or two positive sizes, got {self.hidden_sizes}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
        if self.order_agnostic and self.num_masks == 1:
            raise ValueError("order_agnostic needs num_masks > 1: mask 0 always uses the natural ordering")
        if self.direct_l1_penalty < 0.0 or (self.direct_l1_penalty > 0.0 and not self.direct_connections):
            raise ValueError(f"direct_l1_penalty must be >= 0 and needs direct_connections = true, got "
                             f"{self.direct_l1_penalty} with direct_connections = {self.direct_connections}")

    @classmethod
    def from_dict(cls, data: dict) -> "MADEConfig":
        return config_from_dict(cls, data)


class MADE(AutoregressiveDensityModel):
    """Masked MLP (ReLU hidden layers) from (L K_in) inputs to (L K_out) logits; K = 1 binary, V otherwise.

    `token_logits` gives the conditionals of the mask in use (`use_mask`), in that mask's ordering;
    `log_prob` and `sample` are those of the whole K-mask mixture.
    """

    kind: ClassVar[str] = "made"
    config_class: ClassVar[type] = MADEConfig

    def __init__(self, config: MADEConfig):
        super().__init__(config)
        self.block = 1 if config.vocab_size == 2 else config.vocab_size
        self.mask_degrees = mask_degrees(config.seq_len, config.hidden_sizes, config.num_masks,
                                         config.order_agnostic, config.mask_seed)
        masks, direct_mask = connectivity_masks(self.mask_degrees[0], self.block)
        self.hidden_layers = nn.ModuleList(MaskedLinear(mask) for mask in masks[:-1])
        self.output_layer = MaskedLinear(masks[-1])
        self.direct = None
        if config.direct_connections:
            self.direct = MaskedLinear(direct_mask, bias=False)
            nn.init.zeros_(self.direct.weight)  # starts as the plain MADE; the term is convex in its weight
        self.class_bias = nn.Embedding(config.num_classes + 1, config.hidden_sizes[0])
        nn.init.zeros_(self.class_bias.weight)
        self.mask_index = 0

    # ---- masks ----------------------------------------------------------------------------
    @property
    def num_masks(self) -> int:
        return self.config.num_masks

    def ordering(self, index: int) -> Tensor:
        """(L,) the positions in the order mask `index` generates them."""
        return self.mask_degrees[index].ordering

    def use_mask(self, index: int) -> None:
        """Load connectivity `index` into the masked layers (weights are shared by every mask)."""
        if index == self.mask_index:
            return
        masks, direct = connectivity_masks(self.mask_degrees[index], self.block)
        for layer, mask in zip((*self.hidden_layers, self.output_layer), masks):
            layer.mask.copy_(mask)
        if self.direct is not None:
            self.direct.mask.copy_(direct)
        self.mask_index = index

    # ---- density --------------------------------------------------------------------------
    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        inputs = encode_inputs(input_ids, self.config.vocab_size, self.output_layer.weight.dtype)
        hidden = inputs
        for index, layer in enumerate(self.hidden_layers):
            pre_activation = layer(hidden)
            if index == 0:
                pre_activation = pre_activation + self.class_bias(class_index)
            hidden = F.dropout(torch.relu(pre_activation), self.config.dropout, self.training)
        flat = self.output_layer(hidden)
        if self.direct is not None:
            flat = flat + self.direct(inputs)
        if self.block == 1:
            return binary_to_categorical_logits(flat)
        return rearrange(flat, "b (l v) -> b l v", v=self.block)

    def component_log_probs(self, input_ids: Tensor, label: Tensor | int | None = None,
                            mask: Tensor | None = None) -> Tensor:
        """(b L) -> (b K): log p_k(x) of every mask's autoregressive model, in nats."""
        previous = self.mask_index
        try:
            columns = []
            for index in range(self.num_masks):
                self.use_mask(index)
                columns.append(super().log_prob(input_ids, label, mask))
        finally:
            self.use_mask(previous)
        return torch.stack(columns, dim=-1)

    def log_prob(self, input_ids: Tensor, label: Tensor | int | None = None, mask: Tensor | None = None) -> Tensor:
        """(b L) -> (b,) exact log-likelihood in nats of the K-mask mixture, log (1/K) sum_k p_k(x)."""
        if self.num_masks == 1:
            return super().log_prob(input_ids, label, mask)
        return torch.logsumexp(self.component_log_probs(input_ids, label, mask), dim=-1) - math.log(self.num_masks)

    # ---- training -------------------------------------------------------------------------
    def loss(self, batch: dict, phase: str, step: int):
        """Training: the NLL per token under mask `step mod K` (K masks cycle over the steps, so a resumed
        run picks up the same one), plus the direct term's L1 penalty. Eval mode (validation, early
        stopping): the mixture's NLL per token."""
        if self.training or self.num_masks == 1:
            self.use_mask(step % self.num_masks)
            nll, metrics = super().loss(batch, phase, step)
            if not self.training or self.config.direct_l1_penalty == 0.0:
                return nll, metrics
            penalty = self.config.direct_l1_penalty * self.direct.masked_weight().abs().sum()
            return nll + penalty, {**metrics, "direct_l1_penalty": penalty.detach()}
        mask = batch.get("loss_mask")
        label = batch.get("label") if self.config.num_classes > 0 else None
        log_probs = self.log_prob(batch["input_ids"], label, mask)
        tokens = log_probs.new_tensor(batch["input_ids"].numel() if mask is None else float(mask.sum()))
        nll = -log_probs.sum() / tokens.clamp_min(1.0)
        return nll, nll_metrics(nll)

    # ---- sampling -------------------------------------------------------------------------
    def prefix_log_probs(self, tokens: Tensor, classes: Tensor, prefix_len: int) -> Tensor:
        """(n L) tokens, (n,) class indices -> (n K) log p_k(x_<P | c), the prefix's log-likelihood under each mask.

        Exact only when every mask generates the prefix first (the natural ordering); 0 for an empty prefix.
        """
        if prefix_len == 0:
            return torch.zeros(tokens.shape[0], self.num_masks, device=tokens.device)
        prefix_mask = torch.zeros_like(tokens, dtype=torch.bool)
        prefix_mask[:, :prefix_len] = True
        # sampling's class indices are all the null class (no label) or all labels
        label = None if bool((classes == self.null_class).all()) else classes
        return self.component_log_probs(tokens, label, prefix_mask)

    def decode(self, tokens: Tensor, classes: Tensor, prefix_len: int, guided: bool, options, generator) -> None:
        """Fill `tokens[:, prefix_len:]` (r L) in place: one mixture component per sample, then its ordering.

        When every component generates in the natural order and there is one hidden layer, all rows go
        through the positions together, each with its own component's hidden degrees; otherwise each
        component's rows are sampled apart (one pass over the positions per component drawn).
        """
        if self.num_masks == 1:
            return self.decode_in_ordering(tokens, classes, prefix_len, guided, options, generator)
        if prefix_len and self.config.order_agnostic:
            raise ValueError(
                "an order-agnostic MADE ensemble cannot sample after a prefix: its components do not all generate "
                "the prefix first, so p(component | prefix) is not available; use order_agnostic = false"
            )
        n = tokens.shape[0] // 2 if guided else tokens.shape[0]
        components = draw(self.prefix_log_probs(tokens[:n], classes[:n], prefix_len), generator)
        if not self.config.order_agnostic and len(self.hidden_layers) == 1:
            row_components = torch.cat([components, components]) if guided else components
            return self.decode_in_ordering(tokens, classes, prefix_len, guided, options, generator, row_components)
        previous = self.mask_index
        try:
            for index in components.unique().tolist():
                rows = torch.nonzero(components == index).squeeze(-1)
                rows = torch.cat([rows, rows + n]) if guided else rows
                self.use_mask(index)
                part = tokens[rows]
                self.decode_in_ordering(part, classes[rows], prefix_len, guided, options, generator)
                tokens[rows] = part
        finally:
            self.use_mask(previous)

    def decode_in_ordering(self, tokens: Tensor, classes: Tensor, prefix_len: int, guided: bool, options,
                           generator, components: Tensor | None = None) -> None:
        """Fill `tokens[:, prefix_len:]` in place in the ordering of the mask in use, carrying the first
        layer's pre-activation forward.

        Setting x_p adds one column block of the masked first-layer weight to the pre-activation, and
        the conditional of the next position needs only its own rows of the output layer, so a sample
        costs O(L H) with one hidden layer (O(L H^2) with two; direct connections add O(L^2)) instead
        of a whole network pass per position. Positions not yet drawn contribute nothing; the masks
        keep every drawn conditional blind to them anyway, so the draws are those of recomputing from
        the tokens. Inputs and outputs come in blocks of K per position (K = 1 binary, V otherwise).
        `components` (r,), one hidden layer and natural-order masks only: row i uses the hidden degrees
        of mask `components[i]` (the masks then differ in nothing else).
        """
        first, *deeper = self.hidden_layers
        if components is not None and deeper:
            raise ValueError("per-row mixture components need a MADE with one hidden layer")
        block = self.block
        if components is None:  # one mask for every row: mask the weights once
            degrees, first_weight, output_weight = None, first.masked_weight(), self.output_layer.masked_weight()
        else:  # a mask per row: the weights stay whole and each row masks its own hidden units
            degrees = torch.stack([mask.hidden[0] for mask in self.mask_degrees])[components.cpu()].to(tokens.device)
            first_weight, output_weight = first.weight, self.output_layer.weight  # (H1, L K), (L K, H1)
        deeper_weights = [layer.masked_weight() for layer in deeper]
        direct_weight = None if self.direct is None else self.direct.masked_weight()
        inputs = encode_inputs(tokens, self.config.vocab_size, first.weight.dtype)
        inputs[:, prefix_len * block :] = 0.0  # only the prefix is known yet
        pre_activation = first.bias + self.class_bias(classes)
        for rank, position in enumerate(self.ordering(self.mask_index).tolist()):
            columns = slice(position * block, (position + 1) * block)
            if position >= prefix_len:
                hidden = torch.relu(pre_activation)
                for layer, weight in zip(deeper, deeper_weights):
                    hidden = torch.relu(F.linear(hidden, weight, layer.bias))
                if degrees is not None:  # the output of rank r reads hidden units of degree < r + 1
                    hidden = hidden * (degrees < rank + 1)
                flat = F.linear(hidden, output_weight[columns], self.output_layer.bias[columns])
                if direct_weight is not None:
                    flat = flat + F.linear(inputs, direct_weight[columns])
                logits = binary_to_categorical_logits(flat[:, 0]) if block == 1 else flat
                chosen = self.choose_tokens(logits, options, generator, guided)
                tokens[:, position] = chosen
                inputs[:, columns] = encode_inputs(chosen[:, None], self.config.vocab_size, first.weight.dtype)
            contribution = F.linear(inputs[:, columns], first_weight[:, columns])
            if degrees is not None:  # a hidden unit of degree m reads the inputs of ranks < m
                contribution = contribution * (degrees >= rank + 1)
            pre_activation = pre_activation + contribution
