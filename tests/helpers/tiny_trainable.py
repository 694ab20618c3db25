"""Tiny Trainables and data for the training-loop tests: a dropout MLP on random regression data.

Small enough that a whole training run takes a fraction of a second on one CPU core, yet with
every feature the loop must get right: dropout (RNG re-seeding on resume), one or two parameter
groups, GAN-like alternating phases in which one group is unused, and failures injected at a chosen
step (a non-finite loss, or a crash that simulates an interrupted run).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


class SimulatedCrash(RuntimeError):
    """Raised from inside `loss` to interrupt a run the way a killed job would."""


class RegressionDataset(Dataset):
    """`size` examples {"x": (in_features,), "y": (1,)} of a fixed random linear map plus noise."""

    def __init__(self, size: int = 40, in_features: int = 4, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, in_features, generator=generator)
        weight = torch.randn(in_features, 1, generator=generator)
        self.y = self.x @ weight + 0.05 * torch.randn(size, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class TinyRegressor(nn.Module):
    """A 2-layer MLP with dropout; one param group "main" trained by mean squared error."""

    def __init__(self, in_features=4, hidden=16, dropout=0.2, seed=0, nan_at_step=None, crash_at_step=None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.nan_at_step, self.crash_at_step = nan_at_step, crash_at_step

    def param_groups(self):
        return {"main": list(self.parameters())}

    def phases(self, step):
        return ["main"]

    def loss(self, batch, phase, step):
        if step == self.crash_at_step:
            raise SimulatedCrash(f"simulated crash at step {step}")
        loss = F.mse_loss(self.net(batch["x"]), batch["y"])
        if step == self.nan_at_step:
            loss = loss * float("nan")
        return loss, {"abs_error": (self.net(batch["x"]) - batch["y"]).abs().mean().detach()}


class TwoGroupModel(nn.Module):
    """A "generator" group and a "critic" group, GAN-style: each phase's loss uses both networks,
    but the critic phase runs the generator without gradients, so its parameters go unused there."""

    def __init__(self, in_features=4, hidden=8, seed=0, phase_schedule=None):
        super().__init__()
        torch.manual_seed(seed)
        self.generator = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.critic = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.phase_schedule = phase_schedule or (lambda step: ["generator", "critic"])
        self.calls: list[tuple[str, int]] = []

    def param_groups(self):
        return {"generator": list(self.generator.parameters()), "critic": list(self.critic.parameters())}

    def phases(self, step):
        return self.phase_schedule(step)

    def loss(self, batch, phase, step):
        self.calls.append((phase, step))
        if phase == "generator":
            fake = self.generator(batch["x"])
            loss = F.mse_loss(fake, batch["y"]) - 0.1 * self.critic(fake).mean()
        else:
            with torch.no_grad():
                fake = self.generator(batch["x"])
            loss = F.softplus(self.critic(fake)).mean() + F.softplus(-self.critic(batch["y"])).mean()
        return loss, {}


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
