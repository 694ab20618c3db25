"""A few plain Adam steps on one fixed batch, for the tests that check a model can learn at all."""

from __future__ import annotations

import torch


def adam_steps(model, batch: dict, steps: int, lr: float) -> tuple[list[float], dict]:
    """`steps` Adam updates of `model.param_groups()["main"]` on `model.loss(batch, "main", step)`.

    Returns every step's loss and the last step's metrics. The caller sets train/eval mode.
    """
    optimizer = torch.optim.Adam(model.param_groups()["main"], lr=lr)
    losses, metrics = [], {}
    for step in range(steps):
        loss, metrics = model.loss(batch, "main", step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, metrics
