"""Autoregressive decode loops for the priors: a KV-cached loop (one token per step after a prefill
of the conditioning token and any prefix) and a reference loop that recomputes the whole forward at
every step. Both consume randomness identically, so with the same generator they draw the same
tokens; the tests rely on that to check the cache.

Rows of the model batch (`r`) are `g * n`: `g = 2` under classifier-free guidance (the first `n` rows
carry the class tokens, the last `n` the null token, both with the same prefix and the same drawn
tokens), else `g = 1`. The loop never reads values back to the host, and the output is preallocated,
so that on CUDA the GPU is never waiting on Python. The model is reached only through a `step`
callable, `step(input_ids (r s), position_ids (r s), cache) -> (r v)` float32 next-token
log-probabilities over the image vocabulary at the last position.

Paper: Vaswani et al. 2017, "Attention Is All You Need" (incremental decoding with cached keys and
values); Ho & Salimans 2021, "Classifier-Free Diffusion Guidance".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor

from priors.sampling import SamplingOptions, apply_guidance, draw, filter_logits

Step = Callable[[Tensor, Tensor, object], Tensor]


@dataclass(frozen=True)
class DecodeRequest:
    """What to decode: `start` `(r s)` = conditioning token then prefix; `output` `(n L)` preallocated,
    its first `prefix_length` columns already holding the prefix."""

    start: Tensor
    output: Tensor
    prefix_length: int
    guided: bool
    options: SamplingOptions
    generator: torch.Generator | None

    @property
    def groups(self) -> int:
        return 2 if self.guided else 1

    @property
    def seq_len(self) -> int:
        return self.output.shape[1]


def choose_next(log_probs: Tensor, request: DecodeRequest) -> Tensor:
    """`(r v)` log-probabilities -> `(n,)` tokens: guidance (if any), filtering, then one exact draw."""
    if request.guided:
        cond, uncond = rearrange(log_probs, "(g n) v -> g n v", g=2)
        log_probs = apply_guidance(cond, uncond, request.options.guidance_scale)
    return draw(filter_logits(log_probs, request.options), request.generator)


def _positions(rows: int, start: int, length: int, device) -> Tensor:
    return repeat(torch.arange(start, start + length, device=device), "s -> r s", r=rows)


def decode_cached(step: Step, cache, request: DecodeRequest, decode_step: Step | None = None,
                  mark_step: Callable[[], None] | None = None) -> Tensor:
    """Fill `request.output` token by token with a KV cache; returns it.

    `step` runs the prefill (any length). `decode_step` (default: `step`) runs the one-token steps; it
    may be a compiled, CUDA-graphed version of `step`, in which case `mark_step` tells the graph
    trees that the previous step's outputs are consumed and may be overwritten.
    """
    decode_step = decode_step or step
    output, prefix_length, rows = request.output, request.prefix_length, request.start.shape[0]
    device = output.device
    log_probs = step(request.start, _positions(rows, 0, request.start.shape[1], device), cache)
    for t in range(prefix_length, request.seq_len):
        token = choose_next(log_probs, request)
        output[:, t] = token
        if t + 1 == request.seq_len:
            break
        # Token t of the output sits at model position t + 1 (position 0 is the conditioning token).
        step_ids = repeat(token, "n -> (g n) 1", g=request.groups)
        if mark_step is not None:
            mark_step()
        log_probs = decode_step(step_ids, torch.full((rows, 1), t + 1, device=device, dtype=torch.long), cache)
    return output


def decode_recompute(step: Step, request: DecodeRequest) -> Tensor:
    """Reference loop: the full forward over everything so far at every step, no cache."""
    output, prefix_length, rows = request.output, request.prefix_length, request.start.shape[0]
    for t in range(prefix_length, request.seq_len):
        generated = repeat(output[:, prefix_length:t], "n s -> (g n) s", g=request.groups)
        input_ids = torch.cat([request.start, generated], dim=1)
        log_probs = step(input_ids, _positions(rows, 0, input_ids.shape[1], output.device), None)
        output[:, t] = choose_next(log_probs, request)
    return output
