"""A tighter two-stage bound: search the tokens of each image for a shorter two-part code.

The two-stage model is p(x) = sum_z p(x | z) p_prior(z). Every single z gives an upper bound on the
NLL, -log p(x) <= -log p(x | z) - log p_prior(z), not only the z the encoder picks. The encoder picks
the nearest code vector at each position and never sees the prior, so another z can cost fewer nats
in all: one whose tokens the prior finds likelier for a small loss in the decoder's term. This is
rate-distortion optimised quantisation as video codecs do it (distortion -log p(x | z), rate
-log p(z), weight 1), here by coordinate ascent: in raster order, each position takes the token that
maximises log p(x | z) + log p_prior(z) with the rest held fixed. A position changes only when the
joint rises, so the bound never gets worse than the encoder's. Any set of distinct codes bounds it
too, -log p(x) <= -log sum_{z in S} p(x | z) p_prior(z), so the search also sums over every code it
scored: the codes beside the best one add their share at no extra cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

MAX_CODES_PER_IMAGE = 50_000  # beyond this the search takes too long and its record of scored codes too much memory
JointLogProb = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (images, tokens, labels) -> (n,) nats


@dataclass
class SearchResult:
    tokens: Tensor  # (n L) the searched codes
    start_log_joint: Tensor  # (n,) log p(x | z) + log p(z) at the encoder's codes (float64)
    log_joint: Tensor  # (n,) the same at the searched codes; never below start_log_joint
    changed_positions: Tensor  # (n,) how many tokens differ from the encoder's
    # (n,) log sum_z p(x, z) over every distinct z the search scored: p(x) is at least that sum, so this
    # bound is tighter still (the codes near the best one add their probability).
    log_sum_joint: Tensor


@torch.no_grad()
def search_codes(log_joint: JointLogProb, images: Tensor, tokens: Tensor, labels: Tensor | None,
                 vocab_size: int, sweeps: int = 1) -> SearchResult:
    """Coordinate ascent on log p(x | z) + log p(z) over the (n L) tokens of a batch of images.

    At each position the vocab_size - 1 other tokens are scored for every image at once (the images
    repeated), so a sweep costs sequence_length * (vocab_size - 1) joint evaluations per image.
    """
    if sweeps < 1:
        raise ValueError(f"code search needs sweeps >= 1, got {sweeps}")
    count, length = tokens.shape
    alternatives = vocab_size - 1
    if sweeps * length * alternatives > MAX_CODES_PER_IMAGE:
        raise ValueError(f"code search would score {sweeps * length * alternatives:,} codes per image "
                         f"({sweeps} sweeps x {length} positions x {alternatives} other tokens), over "
                         f"{MAX_CODES_PER_IMAGE:,}; it is meant for small codebooks (4-16 codes) and short sequences")
    current = tokens.clone()
    start = log_joint(images, current, labels).double()
    best = start.clone()
    visited, visited_scores = [rearrange(current, "n l -> n 1 l")], [rearrange(start, "n -> n 1")]
    offsets = repeat(torch.arange(1, vocab_size, device=tokens.device), "a -> (a n)", n=count)
    repeated_images = repeat(images, "n ... -> (a n) ...", a=alternatives)
    repeated_labels = None if labels is None else repeat(labels, "n -> (a n)", a=alternatives)
    for _ in range(sweeps):
        for position in range(length):
            trial = repeat(current, "n l -> (a n) l", a=alternatives).clone()
            trial[:, position] = (trial[:, position] + offsets) % vocab_size  # every token but the current one
            scores = rearrange(log_joint(repeated_images, trial, repeated_labels).double(), "(a n) -> n a", a=alternatives)
            visited.append(rearrange(trial, "(a n) l -> n a l", a=alternatives))
            visited_scores.append(scores)
            top_score, top_index = scores.max(dim=1)
            better = top_score > best  # strict: a tie keeps the current token
            chosen = rearrange(trial[:, position], "(a n) -> n a", a=alternatives).gather(1, top_index[:, None])[:, 0]
            current[:, position] = torch.where(better, chosen, current[:, position])
            best = torch.where(better, top_score, best)
    return SearchResult(current, start, best, (current != tokens).sum(dim=1),
                        distinct_log_sum(torch.cat(visited, dim=1), torch.cat(visited_scores, dim=1)))


def search_codes_in_batches(log_joint: JointLogProb, images: Tensor, tokens: Tensor, labels: Tensor | None,
                            vocab_size: int, sweeps: int, batch_size: int, device) -> SearchResult:
    """`search_codes` over a whole split, `batch_size` images at a time on `device`; the result on the CPU."""
    parts = []
    for start in tqdm(range(0, len(tokens), batch_size), desc="code search", leave=False):
        chunk = slice(start, start + batch_size)
        result = search_codes(log_joint, images[chunk].to(device), tokens[chunk].to(device),
                              None if labels is None else labels[chunk].to(device), vocab_size, sweeps)
        parts.append([getattr(result, field.name).cpu() for field in fields(result)])
    return SearchResult(*(torch.cat(column) for column in zip(*parts)))


def distinct_log_sum(codes: Tensor, scores: Tensor) -> Tensor:
    """(n k L) codes scored (n k) -> (n,) logsumexp over each image's distinct codes, each counted once.

    A later sweep can score a code again (one it had left, say); counting it twice would overstate p(x).
    """
    sums = []
    for image_codes, image_scores in zip(codes, scores):
        unique, inverse = torch.unique(image_codes, dim=0, return_inverse=True)
        once = image_scores.new_full((len(unique),), -math.inf).scatter_reduce(0, inverse, image_scores, "amax")
        sums.append(torch.logsumexp(once, dim=0))
    return torch.stack(sums)
