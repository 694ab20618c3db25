"""The unit degrees and connectivity masks of MADE (Germain et al. 2015, section 4).

Every unit gets a degree. The input units of the position generated r-th (its rank in the
ordering) have degree r+1; a hidden unit of degree m may read units of degree <= m; the output of
that position reads hidden units of degree < r+1, that is only inputs generated before it. One
pass of the masked MLP then gives every conditional of the ordering exactly.

Mask 0 is the natural (row-major) ordering with deterministic hidden degrees spread evenly over
[1, L-1] (`linspace`, rounded): a one-mask MADE always rebuilds the same masks. (Degrees
1 + k mod (L-1) would leave every input above degree H unread when H < L-1: with 500 units on
784 pixels, the last 284 pixels would condition nothing.) Masks 1..K-1, for connectivity-agnostic
training, draw each hidden degree uniformly from [min degree of the layer below, L-1], as in the
paper, and with `order_agnostic` also a random ordering, all from one generator seeded by
`mask_seed`: the config alone rebuilds every mask, so checkpoints hold only weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class MaskDegrees:
    """One connectivity: `ordering[r]` is the position generated r-th; `hidden[l]` the degrees of layer l."""

    ordering: Tensor  # (L,) a permutation of positions
    hidden: tuple[Tensor, ...]  # (H_l,) per hidden layer

    def input_degrees(self, block: int) -> Tensor:
        """(L * block,) degree of every input (and output) unit: rank + 1 of its position, block units each."""
        ranks = torch.empty_like(self.ordering)
        ranks[self.ordering] = torch.arange(len(self.ordering))
        return (ranks + 1).repeat_interleave(block)


def mask_degrees(seq_len: int, hidden_sizes: tuple[int, ...], num_masks: int, order_agnostic: bool,
                 seed: int) -> list[MaskDegrees]:
    """The degrees of all `num_masks` connectivities; mask 0 is the deterministic natural-order one."""
    top = max(seq_len - 1, 1)
    natural = torch.arange(seq_len)
    masks = [MaskDegrees(natural, tuple(torch.linspace(1, top, size).round().long() for size in hidden_sizes))]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1, num_masks):
        ordering = torch.randperm(seq_len, generator=generator) if order_agnostic else natural
        hidden, low = [], 1
        for size in hidden_sizes:
            degrees = torch.randint(low, top + 1, (size,), generator=generator)
            hidden.append(degrees)
            low = int(degrees.min())
        masks.append(MaskDegrees(ordering, tuple(hidden)))
    return masks


def connectivity_masks(degrees: MaskDegrees, block: int) -> tuple[list[Tensor], Tensor]:
    """(the (out, in) masks input -> hidden ... -> output, the (out, in) direct input -> output mask), as bools."""
    input_degrees = degrees.input_degrees(block)
    masks, previous = [], input_degrees
    for hidden in degrees.hidden:
        masks.append(rearrange(hidden, "o -> o 1") >= rearrange(previous, "i -> 1 i"))
        previous = hidden
    # strict inequality at the output: an output never sees its own input
    masks.append(rearrange(input_degrees, "o -> o 1") > rearrange(previous, "i -> 1 i"))
    direct = rearrange(input_degrees, "o -> o 1") > rearrange(input_degrees, "i -> 1 i")
    return masks, direct

