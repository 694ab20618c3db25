"""Turning a prior's next-token log-probabilities into a drawn token: temperature, top-k, nucleus
(top-p) filtering, classifier-free guidance and an exact categorical draw from an explicit generator.

The functions are model-agnostic and work on `(b v)` logits, so every prior (transformer, RNN,
baselines) samples the same way. The draw uses the exponential race (Gumbel-max in another guise):
`argmax(log p - log E)` with `E ~ Exp(1)` is an exact sample from `softmax(log p)`, needs no host
synchronisation on CUDA (unlike rejection checks inside `torch.multinomial`) and consumes a fixed
amount of randomness per call, so a cached and a recomputing decode loop stay in lock-step.

Papers: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (nucleus sampling);
Ho & Salimans 2021, "Classifier-Free Diffusion Guidance" (guidance, here on token log-probabilities
as in Gafni et al. 2022 "Make-A-Scene" and Chang et al. 2023 "Muse").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingOptions:
    """How next tokens are drawn. The defaults draw exactly from the model's distribution."""

    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1.0 keeps every token
    guidance_scale: float = 1.0  # 1.0 is the plain conditional model

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_exact(self) -> bool:
        """True when samples come from the model's own distribution (no reshaping of any kind)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0 and self.guidance_scale == 1.0


def apply_guidance(cond_log_probs: Tensor, uncond_log_probs: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on log-probabilities `(b v)`: `uncond + scale * (cond - uncond)`.

    The result is unnormalised; `draw` and `filter_logits` only need it up to a constant per row.
    Inputs should already be log-softmaxed so that the difference is a log-likelihood ratio.
    """
    if scale == 1.0:
        # Exactly the conditional model, without the rounding of `uncond + (cond - uncond)`.
        return cond_log_probs
    return uncond_log_probs + scale * (cond_log_probs - uncond_log_probs)


def _top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def _top_p(logits: Tensor, p: float) -> Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the mass strictly before it already reaches p; the most likely token always stays.
    remove_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: Tensor, options: SamplingOptions) -> Tensor:
    """Temperature, then top-k, then top-p on `(b v)` logits; filtered tokens get `-inf`. Float32 out."""
    logits = logits.float()
    if options.temperature != 1.0:
        logits = logits / options.temperature
    logits = _top_k(logits, options.top_k)
    return _top_p(logits, options.top_p)


def draw(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One exact sample per row of `(b v)` logits (any normalisation) -> `(b,)` int64.

    `argmax(logits - log E)` with i.i.d. `E ~ Exp(1)` picks token i with probability `softmax(logits)_i`.
    A row whose best logit is unique and all others `-inf` (top_k=1) is therefore deterministic.
    """
    noise_device = generator.device if generator is not None else logits.device
    noise = torch.empty(logits.shape, dtype=torch.float32, device=noise_device).exponential_(generator=generator)
    # exponential_ may return exactly 0 in float32; a zero would give +inf and a NaN against -inf logits.
    noise = noise.clamp_min_(torch.finfo(torch.float32).tiny).to(logits.device, non_blocking=True)
    return (logits.float() - noise.log()).argmax(dim=-1)
