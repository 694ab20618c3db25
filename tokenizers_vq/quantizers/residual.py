"""Residual vector quantisation: a stack of VQ layers, each quantising what the previous left over.

Implements the residual vector quantiser of Zeghidour et al. 2021, "SoundStream: An End-to-End
Neural Audio Codec": level 0 quantises the input, level q quantises the residual
`z - sum_{j<q} code_j`, and the output is the sum of all levels' codes, so a token is a tuple of
`num_quantizers` indices, each in [0, codebook_size) of its own codebook. Each level is a full
`VectorQuantizer` (EMA, restarts, k-means on its own residuals) whose commitment term pulls its
residual towards its code; the gradient reaches the input straight through the total (or, under the
levels' `rotation_trick`, through one rotation and rescaling of the input onto the total, so a
single level gets exactly a `VectorQuantizer`'s rotation-trick gradient). Quantizer
dropout (SoundStream section 3.3) trains the stack to work with any prefix of levels: with
probability `quantizer_dropout` a training batch uses only its first k levels, k uniform in
[1, num_quantizers], so one model serves several bitrates. The choice is drawn from the module's
generator seeded by (seed, training_steps), the same on every process without a collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import QuantizerOutput, check_kind, config_from_dict, usage_and_perplexity
from tokenizers_vq.quantizers.vq import VectorQuantizer, VQConfig, rotate_onto

LEVEL_METRICS = ("usage", "perplexity", "dead_codes")


@dataclass(frozen=True)
class ResidualVQConfig:
    """Settings of a `ResidualVectorQuantizer`; every level uses `quantizer` (its seed + level)."""

    kind: str = "residual_vq"
    num_quantizers: int = 4
    quantizer: VQConfig = field(default_factory=VQConfig)
    quantizer_dropout: float = 0.0  # probability that a training batch uses a random prefix of levels

    def __post_init__(self):
        check_kind(self, "residual_vq")
        if self.num_quantizers < 1:
            raise ValueError(f"num_quantizers must be at least 1, got {self.num_quantizers}")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must lie in [0, 1], got {self.quantizer_dropout}")
        if not isinstance(self.quantizer, VQConfig):
            raise ValueError(f"quantizer must be a VQConfig, got {type(self.quantizer).__name__}")

    @classmethod
    def from_dict(cls, data: dict) -> "ResidualVQConfig":
        return config_from_dict(cls, data)


class ResidualVectorQuantizer(nn.Module):
    """(b n d) -> QuantizerOutput with (b n q) indices; `lookup((b n q)) -> (b n d)` sums the codes.

    Indices of levels switched off by quantizer dropout are -1, and `lookup` skips them, so
    `lookup(output.indices)` equals `output.quantized` in value (with the codebooks the forward
    pass used: a training step may move them afterwards). Metrics: usage,
    perplexity and dead_codes averaged over the levels that ran, plus `usage_q0`, `perplexity_q0`,
    `dead_codes_q0`, ... for every level (a level that did not run reports zero counts).
    State: `levels.<q>.*` (each level's VQ state) and `training_steps`.
    """

    def __init__(self, config: ResidualVQConfig, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        self.codebook_size = config.quantizer.codebook_size  # per level
        self.num_codebooks = config.num_quantizers
        # Distinct seeds, so the levels start from different codebooks.
        self.levels = nn.ModuleList(
            VectorQuantizer(dataclasses.replace(config.quantizer, seed=config.quantizer.seed + level), dim)
            for level in range(config.num_quantizers)
        )
        self.generator = torch.Generator().manual_seed(config.quantizer.seed)
        self.register_buffer("training_steps", torch.tensor(0, dtype=torch.int64))

    # --- inference ------------------------------------------------------------------------------

    def _with_level_axis(self, indices: Tensor) -> Tensor:
        """One level's `(b n)` indices as `(b n 1)`; `(b n q)` as they are."""
        return rearrange(indices, "b n -> b n 1") if self.num_codebooks == 1 and indices.ndim == 2 else indices

    def _public_indices(self, indices: Tensor) -> Tensor:
        """`(b n q)` -> what every quantizer returns: `(b n)` at one level (as VQ and LFQ), else `(b n q)`."""
        return indices[..., 0] if self.num_codebooks == 1 else indices

    def lookup(self, indices: Tensor) -> Tensor:
        """(b n q) int64, or (b n) at one level -> (b n d) float32, the sum over levels; -1 marks a level left out."""
        indices = self._with_level_axis(indices)
        if indices.ndim != 3 or indices.shape[-1] != self.num_codebooks:
            raise ValueError(f"expected (b n q) indices with q={self.num_codebooks}, got shape {tuple(indices.shape)}")
        total = None
        for level, quantizer in enumerate(self.levels):
            level_indices = indices[..., level]
            present = rearrange(level_indices >= 0, "b n -> b n 1")
            codes = quantizer.lookup(level_indices.clamp_min(0)) * present
            total = codes if total is None else total + codes
        return total

    @torch.no_grad()
    def to_indices(self, z: Tensor) -> Tensor:
        """(b n d) -> (b n q) greedy residual indices ((b n) at one level), with no statistics update and
        no collectives."""
        residual = z.float()
        indices = []
        for quantizer in self.levels:
            level_indices = quantizer.to_indices(residual)
            residual = residual - quantizer.lookup(level_indices)
            indices.append(level_indices)
        return self._public_indices(torch.stack(indices, dim=-1))

    # --- training -------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"expected (b n d) input with d={self.dim}, got shape {tuple(z.shape)}")
        num_active = self._active_levels()
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.float()
            total = torch.zeros_like(residual)
            aux_loss = residual.new_zeros(())
            indices = torch.full((*z.shape[:2], self.num_codebooks), -1, dtype=torch.int64, device=z.device)
            metrics: dict[str, Tensor] = {}
            for level, quantizer in enumerate(self.levels):
                if level < num_active:
                    output = quantizer(residual)
                    codes = output.quantized.detach()  # the value of the level's codes
                    # The next level sees a detached residual: each level's commitment term trains
                    # the input through its own residual only, as in SoundStream.
                    residual = residual - codes
                    total = total + codes
                    aux_loss = aux_loss + output.aux_loss
                    indices[..., level] = output.indices
                    level_metrics = output.metrics
                else:
                    level_metrics = self._idle_metrics(quantizer)
                for name in LEVEL_METRICS:
                    metrics[f"{name}_q{level}"] = level_metrics[name]
            for name in LEVEL_METRICS:
                active = torch.stack([metrics[f"{name}_q{level}"] for level in range(num_active)])
                metrics[name] = reduce(active, "q ->", "mean")
            if self.config.quantizer.rotation_trick:  # one rotation and rescaling from the input to the total
                quantized = rotate_onto(z.float(), total).to(z.dtype)
            else:  # straight through the total
                quantized = z + (total.to(z.dtype) - z).detach()
        if self.training:
            self.training_steps.add_(1)
        return QuantizerOutput(quantized, self._public_indices(indices), aux_loss, metrics)

    def _active_levels(self) -> int:
        """How many leading levels run: all of them, except under quantizer dropout in training."""
        if not self.training or self.config.quantizer_dropout == 0.0 or self.num_codebooks == 1:
            return self.num_codebooks
        # Seeded like a level one past the last, so the draw is uncorrelated with the levels' restarts.
        seed = self.config.quantizer.seed + self.num_codebooks
        self.generator.manual_seed(seed * 1_000_003 + int(self.training_steps))
        if torch.rand((), generator=self.generator) >= self.config.quantizer_dropout:
            return self.num_codebooks
        return int(torch.randint(1, self.num_codebooks + 1, (), generator=self.generator))

    def _idle_metrics(self, quantizer: VectorQuantizer) -> dict[str, Tensor]:
        usage, perplexity = usage_and_perplexity(torch.zeros(quantizer.codebook_size))
        dead_codes = (quantizer.cluster_size < quantizer.config.dead_code_threshold).sum().float()
        return {"usage": usage, "perplexity": perplexity, "dead_codes": dead_codes}
