"""An exponential moving average of a model's weights, kept beside training (`TrainConfig.ema_decay`).

Averaging the iterates of stochastic gradient descent (Polyak & Juditsky 1992; the exponential
form used by most generative-model trainers) lowers the noise the last steps leave in the
weights. The average covers every floating-point entry of the state dict, buffers included (a
VQ codebook kept by EMA is a buffer and must match the averaged encoder); integer buffers are the
live model's. The effective decay starts low and rises to `decay`, min(decay, (1 + n) / (10 + n))
after n updates, so the first thousands of steps do not drag a near-random initialisation into
the average. The loop evaluates with the average swapped in and leaves it in the model when
training ends; checkpoints hold it beside the live weights (`weight_average.safetensors`), so a
resumed run goes on averaging exactly where it stopped.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHT_AVERAGE_FILE = "weight_average.safetensors"


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        state = model.state_dict()
        # float32 whatever the model's dtype: an average of bf16 weights would round its own updates away
        self.shadow = {name: t.detach().float().clone() for name, t in state.items() if t.is_floating_point()}

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (once per optimizer step)."""
        state = model.state_dict()  # asked afresh each step: a module may replace a buffer, not copy into it
        weight = 1.0 - self.decay_at(self.updates)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [state[n].detach().float() for n in names], weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's floating-point weights with the average (in place, keeping dtypes)."""
        model.load_state_dict(self.shadow, strict=False)

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """The average in the model for the duration, the live weights back afterwards."""
        live = {name: t.detach().clone() for name, t in model.state_dict().items() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                model.load_state_dict(live, strict=False)

    def save(self, checkpoint_dir: Path) -> None:
        metadata = {"updates": str(self.updates), "decay": repr(self.decay)}
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(Path(checkpoint_dir) / WEIGHT_AVERAGE_FILE),
                  metadata=metadata)

    def load(self, checkpoint_dir: Path) -> None:
        """Restore the average saved in a checkpoint; a clear error when it is missing or does not fit."""
        path = Path(checkpoint_dir) / WEIGHT_AVERAGE_FILE
        if not path.is_file():
            raise ValueError(
                f"{checkpoint_dir} holds no {WEIGHT_AVERAGE_FILE}: it was saved with ema_decay=0, "
                "so it cannot resume a run that averages weights (start afresh or set ema_decay=0)"
            )
        with safe_open(str(path), framework="pt") as handle:
            updates = int((handle.metadata() or {}).get("updates", "0"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if set(tensors) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(tensors)), sorted(set(tensors) - set(self.shadow))
            raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, tensor in tensors.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.updates = updates
