"""Training batches of an audio tokenizer: random polarity, delay and speed, and packing.

A codec trained long on a small set learns its clips: the FSDD codec of 7800 steps reconstructs
its train clips at 9.0 dB SI-SNR and the test clips at 6.1 (BENCHMARKS.md). These transforms make
new clips from old ones without changing what a codec must do (give back its input):
- polarity: a clip times -1 sounds the same, and the codec must reproduce either sign;
- delay: a strided codec is not shift-invariant below its hop, so a clip delayed by a few samples
  meets other frame boundaries and is, to the codec, another clip;
- speed: resampling by a factor near 1 changes pitch and tempo together (Ko et al. 2015, "Audio
  augmentation for speech recognition"), a new voice for a spoken-digit codec.
Draws use torch's global generators (the batch's device; the CPU for the speed), which the
training loop seeds every step, so a resumed run draws what it would have. Masks follow the samples: padding stays out.

Packing (`pack_clips`) is not a transform of the speech but of the batch: short clips padded to a
long window spend much of a step's compute on zeros (FSDD's clips fill 58% of a 0.75 s window), so
their real samples are laid end to end in as few windows as hold them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def random_polarity(waveform: Tensor) -> Tensor:
    """(b c t) -> each clip times +1 or -1, at random."""
    signs = torch.randint(0, 2, (waveform.shape[0], 1, 1), device=waveform.device) * 2 - 1
    return waveform * signs.to(waveform.dtype)


def random_delay(waveform: Tensor, mask: Tensor, max_delay: int) -> tuple[Tensor, Tensor]:
    """Delay each clip by its own 0..max_delay samples, zeros in front; what passes the end is cut."""
    batch, _, length = waveform.shape
    delays = torch.randint(0, max_delay + 1, (batch, 1), device=waveform.device)
    source = torch.arange(length, device=waveform.device) - delays  # (b t): where each output sample comes from
    inside = source >= 0
    source = source.clamp_min(0)
    delayed = torch.gather(waveform, 2, rearrange(source, "b t -> b 1 t").expand_as(waveform))
    delayed = delayed * rearrange(inside, "b t -> b 1 t").to(waveform.dtype)
    return delayed, torch.gather(mask, 1, source) & inside


def random_speed(waveform: Tensor, mask: Tensor, max_change: float) -> tuple[Tensor, Tensor]:
    """Play the batch at one random speed in [1 - max_change, 1 + max_change] (linear interpolation).

    The window keeps its length: a slower clip is cut at the end, a faster one padded with zeros;
    the mask is stretched with the samples (nearest neighbour).
    """
    length = waveform.shape[-1]
    speed = 1.0 + (2.0 * torch.rand(()).item() - 1.0) * max_change
    resampled_length = max(1, round(length / speed))

    def stretch(signal: Tensor, mode: str) -> Tensor:
        resized = F.interpolate(signal, size=resampled_length, mode=mode,
                                **({"align_corners": False} if mode == "linear" else {}))
        return F.pad(resized, (0, max(0, length - resampled_length)))[..., :length]

    new_mask = rearrange(stretch(rearrange(mask.to(waveform.dtype), "b t -> b 1 t"), "nearest") > 0.5,
                         "b 1 t -> b t")
    return stretch(waveform, "linear") * rearrange(new_mask, "b t -> b 1 t").to(waveform.dtype), new_mask


def augment_waveforms(waveform: Tensor, mask: Tensor, polarity: bool = False, max_delay: int = 0,
                      max_speed_change: float = 0.0) -> tuple[Tensor, Tensor]:
    """(b c t) clips and (b t) bool mask -> augmented copies; every transform off by default."""
    if polarity or max_delay > 0 or max_speed_change > 0:
        waveform = waveform * rearrange(mask, "b t -> b 1 t").to(waveform.dtype)  # padding never leaks into a clip
    if max_speed_change > 0:
        waveform, mask = random_speed(waveform, mask, max_speed_change)
    if max_delay > 0:
        waveform, mask = random_delay(waveform, mask, max_delay)
    if polarity:
        waveform = random_polarity(waveform)
    return waveform, mask


def pack_clips(waveform: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(b c t) clips and (b t) bool mask -> (w c t) windows and (w t) mask holding the clips' real samples
    end to end, in batch order, w = ceil(real samples / t): a clip may run on into the next window, and
    only the last window has padding. One window of padding when no sample is real."""
    length = waveform.shape[-1]
    stream = rearrange(waveform, "b c t -> c (b t)")[:, rearrange(mask, "b t -> (b t)")]
    real = stream.shape[-1]
    windows = max(1, math.ceil(real / length))
    packed = rearrange(F.pad(stream, (0, windows * length - real)), "c (w t) -> w c t", t=length)
    packed_mask = rearrange(torch.arange(windows * length, device=mask.device) < real, "(w t) -> w t", t=length)
    return packed, packed_mask
