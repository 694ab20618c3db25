"""The sign choice shared by `tokgen compress --input` and `tokgen generate --prompt`."""

import torch

from pipelines.polarity import closer_sign


def lopsided_clip() -> torch.Tensor:
    """Tall positive peaks, shallow negative troughs: a clip whose sign a half-wave codec can tell."""
    wave = torch.sin(torch.linspace(0, 40, 800))
    return torch.where(wave > 0, wave, 0.1 * wave)[None]


def half_wave_codec(signed: torch.Tensor) -> torch.Tensor:
    """Keeps only what lies above zero: codes positive peaks well and negative ones not at all."""
    return signed.clamp_min(0)


def test_the_sign_that_codes_closer_is_kept_with_its_codes():
    clip = lopsided_clip()
    sign, codes = closer_sign(clip, half_wave_codec, lambda codes: codes)
    assert sign == 1 and torch.equal(codes, clip.clamp_min(0))
    sign, codes = closer_sign(-clip, half_wave_codec, lambda codes: codes)
    assert sign == -1 and torch.equal(codes, clip.clamp_min(0))  # the flipped clip's codes: the original's


def test_a_codec_that_codes_both_signs_alike_leaves_the_clip_as_it_is():
    sign, codes = closer_sign(-lopsided_clip(), lambda signed: signed.clone(), lambda codes: codes)
    assert sign == 1 and torch.equal(codes, -lopsided_clip())
