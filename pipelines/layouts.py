"""Token layouts: how the `(frames q)` grid of a residual-VQ audio tokenizer becomes one sequence.

An audio tokenizer with `q` codebooks gives `q` tokens per frame; a prior over one flat sequence
needs an order for them. Two layouts are defined, both undone exactly at decode time:

- "flattened": frame by frame, codebook index fastest, `(frames q)` row-major: token (f, k) sits
  at position `f * q + k`. The sequence has `frames * q` tokens over the tokenizer's `V` codes.
- "delayed": the delay pattern of MusicGen (Copet et al. 2023, "Simple and Controllable Music
  Generation", section 2.2): codebook `k` is shifted right by `k` steps, so step `s` holds
  codebook `k` of frame `s - k`. Positions that fall before the first or after the last frame hold
  a pad token, the id `V` (so a prior over a delayed layout has the vocabulary `V + 1`). The grid
  has `frames + q - 1` steps and is read step by step, codebook index fastest: a coarse code of
  frame `f` is seen before the finer codes of the frames before it, as in MusicGen.

Padding of variable-length clips is a separate matter: `valid_token_mask` marks, for a clip with
`n` real frames, the positions a prior should score. Positions that belong to frames past the
clip's end are masked out; the leading pad tokens of the delayed layout are kept in (they are part
of the layout, deterministic, and scoring them teaches the prior never to put a pad token where a
code belongs). With one codebook both layouts order tokens the same way.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor

LAYOUTS = ("flattened", "delayed")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"token layout must be one of {list(LAYOUTS)}, got {layout!r}")


def prior_vocab_size(layout: str, codebook_size: int) -> int:
    """Token ids a prior must model: the codes, plus the pad token of the delayed layout."""
    check_layout(layout)
    return codebook_size + 1 if layout == "delayed" else codebook_size


def pad_token(layout: str, codebook_size: int) -> int:
    """The pad id of the layout (`codebook_size` for "delayed"), or -1 when the layout has none."""
    check_layout(layout)
    return codebook_size if layout == "delayed" else -1


def num_steps(layout: str, frames: int, num_codebooks: int) -> int:
    """Rows of the laid-out grid: `frames`, or `frames + q - 1` once codebooks are delayed."""
    check_layout(layout)
    return frames + num_codebooks - 1 if layout == "delayed" else frames


def sequence_length(layout: str, frames: int, num_codebooks: int) -> int:
    return num_steps(layout, frames, num_codebooks) * num_codebooks


def prefix_length(layout: str, prefix_frames: int, num_codebooks: int) -> int:
    """Sequence positions that the first `prefix_frames` steps occupy (all codebooks of each step)."""
    check_layout(layout)
    return prefix_frames * num_codebooks


def as_grid(tokens: Tensor) -> Tensor:
    """(b frames) or (b frames q) -> (b frames q)."""
    if tokens.ndim == 2:
        return rearrange(tokens, "b frames -> b frames 1")
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens (b frames) or (b frames q), got shape {tuple(tokens.shape)}")
    return tokens


def frame_windows(codes: Tensor, start: Tensor, real: Tensor, frames: int) -> Tensor:
    """(m T q) codes -> (m frames q): each row's `frames` codes from frame `start[row]`, those from its
    `real[row]`-th on (past the row's audio, or past T) set to code 0, as a clip's padding frames are.
    How a long file is cut into the prior's fixed-length sequences."""
    offsets = torch.arange(frames, device=codes.device)
    positions = rearrange(start, "m -> m 1") + offsets
    window = codes.gather(1, repeat(positions.clamp(max=codes.shape[1] - 1), "m s -> m s q", q=codes.shape[-1]))
    return window.masked_fill(rearrange(offsets >= rearrange(real, "m -> m 1"), "m s -> m s 1"), 0)


def apply_layout(tokens: Tensor, layout: str, codebook_size: int) -> Tensor:
    """(b frames) or (b frames q) codes -> (b L) sequence in `layout`."""
    check_layout(layout)
    grid = as_grid(tokens)
    batch, frames, num_codebooks = grid.shape
    if layout == "flattened" or num_codebooks == 1:  # one codebook: nothing to delay
        return rearrange(grid, "b frames q -> b (frames q)")
    steps = num_steps(layout, frames, num_codebooks)
    delayed = grid.new_full((batch, steps, num_codebooks), pad_token(layout, codebook_size))
    for k in range(num_codebooks):
        delayed[:, k : k + frames, k] = grid[:, :, k]
    return rearrange(delayed, "b steps q -> b (steps q)")


def undo_layout(sequence: Tensor, layout: str, frames: int, num_codebooks: int, codebook_size: int,
                fill: int | None = None) -> Tensor:
    """(b L) sequence in `layout` -> (b frames q) codes; the exact inverse of `apply_layout`.

    A pad token (or any id >= codebook_size) where a code belongs cannot be decoded: it raises,
    unless `fill` is given, which replaces such ids (a sampled sequence may hold one).
    """
    check_layout(layout)
    expected = sequence_length(layout, frames, num_codebooks)
    if sequence.ndim != 2 or sequence.shape[1] != expected:
        raise ValueError(f"a {layout!r} sequence of {frames} frames x {num_codebooks} codebook(s) has "
                         f"{expected} tokens, got shape {tuple(sequence.shape)}")
    grid = rearrange(sequence, "b (steps q) -> b steps q", q=num_codebooks)
    if layout == "delayed":
        grid = torch.stack([grid[:, k : k + frames, k] for k in range(num_codebooks)], dim=-1)
    invalid = (grid < 0) | (grid >= codebook_size)
    if bool(invalid.any()):
        if fill is None:
            raise ValueError(f"{int(invalid.sum())} position(s) of the {layout!r} sequence hold ids outside "
                             f"[0, {codebook_size}) where codes belong")
        grid = grid.masked_fill(invalid, fill)
    return grid.contiguous()


def count_misplaced(sequence: Tensor, layout: str, frames: int, num_codebooks: int, codebook_size: int) -> int:
    """How many code positions of (b L) sequences hold a pad (or other non-code) id."""
    grid = rearrange(sequence, "b (steps q) -> b steps q", q=num_codebooks)
    if layout == "delayed":
        grid = torch.stack([grid[:, k : k + frames, k] for k in range(num_codebooks)], dim=-1)
    return int(((grid < 0) | (grid >= codebook_size)).sum())


def valid_token_mask(num_frames: Tensor, layout: str, frames: int, num_codebooks: int) -> Tensor:
    """(b,) real frames per clip -> (b L) bool: True where the prior's loss and likelihood count.

    A position holding codebook k of frame f counts when f < num_frames; in the delayed layout the
    leading pads (f < 0) count too, the trailing ones never do.
    """
    check_layout(layout)
    num_frames = torch.as_tensor(num_frames, dtype=torch.int64)
    steps = num_steps(layout, frames, num_codebooks)
    step_index = rearrange(torch.arange(steps), "steps -> steps 1")
    codebook_index = rearrange(torch.arange(num_codebooks), "q -> 1 q")
    delay = codebook_index if layout == "delayed" else torch.zeros_like(codebook_index)
    frame_index = step_index - delay  # (steps q): the frame each position holds a code of
    mask = repeat(frame_index, "steps q -> b steps q", b=len(num_frames)) < rearrange(num_frames, "b -> b 1 1")
    return rearrange(mask, "b steps q -> b (steps q)")
