"""The training loss every stage-two prior shares: mean NLL per token, with padding left out.

A prior's `loss` returns this NLL (nats per scored token) and the figures the training loop logs,
so the transformer, the RNN and the comparison baselines report on one scale.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def nll_metrics(nll: Tensor) -> dict[str, Tensor]:
    """The logged figures of a mean NLL per token (nats)."""
    detached = nll.detach()
    return {"nll_per_token": detached, "bits_per_token": detached / math.log(2.0)}


def mean_token_nll(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """(b L V) logits, (b L) targets -> the mean NLL (nats) over the tokens where `loss_mask` is 1.

    The cross-entropy runs in float32 whatever the logits' precision (bf16 logits lose the small
    probabilities the NLL is made of); with no mask every token counts.
    """
    flat_logits, flat_targets = logits.float().flatten(0, 1), targets.flatten()
    if loss_mask is None:
        return F.cross_entropy(flat_logits, flat_targets)
    weights = loss_mask.to(flat_logits.device).flatten().float()
    nll = F.cross_entropy(flat_logits, flat_targets, reduction="none")
    return (nll * weights).sum() / weights.sum().clamp_min(1.0)
