"""Codes searched by synthesis for `tokgen compress --input` (`tokenizers_vq.audio_code_search`).

The tokenizer's encoder picks each code nearest its latent; the search instead keeps, code by code,
whichever of the nearest few decodes closest to the file, at the same plain bit rate and with the
same decoder, so any run's `tokgen decompress` reads the result. With a rate weight, each candidate
also pays for the bits the run's prior spends on the segment it lies in (segments are the prior's
sequences, coded each from its own start), so the search trades error for coded bits. On FSDD's test
clips one sweep of 8 candidates gained about 0.9 dB (BENCHMARKS.md, "An encoder that searches its
codes by synthesis"); it costs `levels x candidates` short decodes per frame and sweep.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pipelines import layouts
from pipelines.stages import module_device
from pipelines.tokenset import Manifest
from tokenizers_vq.audio_code_search import search_codes

BATCH_SAMPLES = 1 << 21  # files searched together, padded to the longest of them


class CodeSearch(NamedTuple):
    sweeps: int = 0  # 0: the encoder's codes
    candidates: int = 8  # nearest codes tried at each position
    rate_weight: float = 0.0  # squared-error units per bit of the prior (0: error alone)
    reach: int | None = None  # frames each side a candidate is scored over; None: the decoder's whole reach (exact)

    def check(self) -> None:
        if self.sweeps < 0 or self.candidates < 1 or self.rate_weight < 0 or not math.isfinite(self.rate_weight):
            raise ValueError(f"code search needs sweeps >= 0, candidates >= 1 and a finite rate weight >= 0, got "
                             f"{self.sweeps}, {self.candidates} and {self.rate_weight}")
        if self.reach is not None and self.reach < 0:
            raise ValueError(f"code search needs a reach >= 0 frames, got {self.reach}")


def segment_bits(prior, manifest: Manifest, frames: torch.Tensor):
    """The `rate` of `search_codes` for files coded segment by segment: a change at frame `at` moves
    only the bits of its segment, which the prior codes as the file's items are (null class, the
    run's layout, padding frames as code 0 and masked). `frames` `(n,)`: each file's real frames."""
    segment, device = manifest.token_grid[0], module_device(prior)

    @torch.no_grad()
    def bits(codes: torch.Tensor, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        start = at // segment * segment
        real = (frames.to(codes.device)[rows] - start).clamp(0, segment)
        window = layouts.frame_windows(codes, start, real, segment)
        sequences = layouts.apply_layout(window.cpu(), manifest.order, manifest.codebook_size)
        mask = manifest.valid_token_mask(real.cpu())
        return -prior.log_prob(sequences.to(device), None, mask.to(device)) / math.log(2.0)

    return bits


def searched_codes(tokenizer, prior, manifest: Manifest, clips: list[torch.Tensor], search: CodeSearch,
                   progress: bool) -> list[torch.Tensor]:
    """Files `(c t)` at the run's level -> each one's searched codes `(frames q)`. Files of similar
    length are searched together (shortest first), at most `BATCH_SAMPLES` padded samples at a time."""
    device, hop = module_device(tokenizer), tokenizer.hop_length
    codes: list[torch.Tensor | None] = [None] * len(clips)
    order = sorted(range(len(clips)), key=lambda i: clips[i].shape[-1])
    while order:
        batch = [order.pop(0)]
        while order and (len(batch) + 1) * clips[order[0]].shape[-1] <= BATCH_SAMPLES:
            batch.append(order.pop(0))
        lengths = torch.tensor([clips[i].shape[-1] for i in batch])
        padded = torch.stack([torch.nn.functional.pad(clips[i], (0, int(lengths.max()) - clips[i].shape[-1]))
                              for i in batch]).to(device)
        frames = -(-lengths // hop)
        rate = segment_bits(prior, manifest, frames) if search.rate_weight > 0 else None
        result = search_codes(tokenizer, padded, lengths, search.candidates, search.sweeps, progress=progress,
                              rate=rate, rate_weight=search.rate_weight, rate_span=manifest.token_grid[0],
                              reach=search.reach)
        for row, i in enumerate(batch):
            codes[i] = result.codes[row, : int(frames[row])]
    return codes
