"""Early stopping by checkpoint selection: keep the prior weights with the lowest validation loss.

Used by the prior stage when `prior_training.eval_every > 0`: every `eval_every` steps (and at the
end) the training loop calls this object as its `eval_fn`; it scores the whole validation split
with the model's own training loss in eval mode (mean NLL per token for the autoregressive priors,
the mixture's for a MADE mask ensemble, the negative ELBO per token for a VAE without its KL
warm-up; no label dropout) and keeps a CPU copy of the weights when
the loss improves. After training, `restore` puts the best weights back, so the saved prior is the
one validation chose (Larochelle & Murray 2011 and Germain et al. 2015 select their binarized-MNIST
models this way). The copy lives in memory: a run resumed with `--resume` selects among the
evaluations made after the resume (the weights saved before an interruption are the last ones).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class BestValidationWeights:
    """`eval_fn(model, step)` for `pipelines.loop.train` that remembers the best-scoring weights."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int):
        if len(dataset) == 0:
            raise ValueError("early stopping needs a non-empty validation split")
        self.dataset = dataset
        self.batch_size = batch_size
        self.best_loss = float("inf")
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def validation_loss(self, model: nn.Module, step: int) -> float:
        """Mean training loss per scored token over the whole split (model in eval mode, no grad)."""
        device = next(model.parameters()).device
        phase = model.phases(step)[0]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
        total, weight = 0.0, 0.0
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            loss, _ = model.loss(batch, phase, step)
            # The loss is a mean per scored token; weight each batch by its token count.
            mask = batch.get("loss_mask")
            tokens = float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
            total += float(loss) * tokens
            weight += tokens
        return total / max(weight, 1.0)

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        loss = self.validation_loss(model, step)
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.best_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
        return {"val_loss": loss, "best_val_loss": self.best_loss}

    def restore(self, model: nn.Module, final_step: int) -> dict[str, float]:
        """Load the best weights into `model`; returns what was chosen, for the stage record."""
        if self.best_state is None:
            return {}
        if self.best_step != final_step:
            model.load_state_dict(self.best_state)
            logger.info("early stopping: keeping the weights of step %d (validation loss %.5f per token), not step %d",
                        self.best_step, self.best_loss, final_step)
        return {"selected_step": self.best_step, "best_val_loss": self.best_loss}
