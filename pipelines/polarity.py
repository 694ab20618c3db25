"""Code a clip in whichever sign the codec codes closer.

A listener hears no difference between a clip and its negative, but a codec learns the polarity of
the recordings it trained on: the FSDD codec codes sign-flipped test clips about 6 dB worse in SI-SNR
(BENCHMARKS.md, "An eleventh and a twelfth cycle"), and a user's recording may be wired either way.
`tokgen compress --input` and `tokgen generate --prompt` both try the two signs and keep the closer;
each caller says how it codes and decodes, and undoes the sign on what it hands back.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from tokenizers_vq.audio_losses import si_snr

Codes = TypeVar("Codes")


@torch.no_grad()
def closer_sign(clip: torch.Tensor, code: Callable[[torch.Tensor], Codes],
                decode: Callable[[Codes], torch.Tensor]) -> tuple[int, Codes]:
    """`clip` (any shape ending in time), `code` (a signed clip -> its codes) and `decode` (codes -> the
    decoded clip, the shape of `clip`, on the CPU) -> (+1 or -1, the codes of `clip` times that sign).
    Ties keep +1, so a codec that does not care leaves clips as they are."""
    best = None
    for sign in (1, -1):
        codes = code(clip * sign)
        score = float(si_snr(decode(codes).float(), clip * sign).mean())
        if best is None or score > best[0]:
            best = (score, sign, codes)
    return best[1], best[2]
