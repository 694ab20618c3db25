"""Training-time waveform augmentation of the audio tokenizer: each transform keeps clips and masks aligned."""

import copy

import pytest
import torch

from tests.test_audio_tokenizer import audio, tiny_config
from tokenizers_vq.audio import AudioVQVAE
from tokenizers_vq.audio_augment import augment_waveforms, pack_clips, random_delay, random_polarity, random_speed


def clips_and_mask(length=400, lengths=(300, 400, 150, 250)):
    x = torch.randn(len(lengths), 1, length, generator=torch.Generator().manual_seed(3))
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return x * mask[:, None], mask


def test_polarity_flips_whole_clips_and_both_signs_occur():
    x, _ = clips_and_mask(lengths=(400,) * 16)
    torch.manual_seed(0)
    flipped = random_polarity(x)
    signs = [1 if torch.equal(a, b) else -1 if torch.equal(a, -b) else 0 for a, b in zip(flipped, x)]
    assert 0 not in signs and set(signs) == {1, -1}


def test_delay_moves_each_clip_and_its_mask_by_the_same_whole_number_of_samples():
    x, mask = clips_and_mask()
    torch.manual_seed(1)
    delayed, delayed_mask = random_delay(x, mask, max_delay=30)
    seen = set()
    for clip, clip_mask, original, original_mask in zip(delayed, delayed_mask, x, mask):
        delay = int(torch.nonzero(clip_mask)[0])  # every clip starts with real audio, so its first True is the delay
        assert 0 <= delay <= 30
        seen.add(delay)
        kept = 400 - delay
        assert torch.equal(clip[:, delay:], original[:, :kept])
        assert torch.equal(clip_mask[delay:], original_mask[:kept])
        assert not clip[:, :delay].any() and not clip_mask[:delay].any()
    assert len(seen) > 1  # each clip draws its own delay


def test_speed_stretches_clips_and_masks_together_and_keeps_the_window():
    x, mask = clips_and_mask()
    torch.manual_seed(2)
    fast, fast_mask = random_speed(x, mask, max_change=0.2)
    assert fast.shape == x.shape and fast_mask.shape == mask.shape
    ratio = fast_mask.sum(1).float() / mask.sum(1).float()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=0.02)  # one speed for the batch
    assert 0.8 - 0.02 <= 1 / ratio[0] <= 1.2 + 0.02 and abs(1 / ratio[0] - 1) > 1e-3
    assert not (fast * ~fast_mask[:, None]).any()  # nothing outside the (stretched) mask
    # Tiny changes give the clip back almost unchanged.
    slow, slow_mask = random_speed(x, mask, max_change=1e-6)
    assert torch.equal(slow_mask, mask) and torch.allclose(slow, x, atol=1e-4)


def test_augmentation_is_off_by_default_and_drawn_from_the_seeded_global_generator():
    x, mask = clips_and_mask()
    noisy = x + 5.0 * ~mask[:, None]  # padding holding junk must not leak into any clip
    same, same_mask = augment_waveforms(noisy, mask)
    assert same is noisy and same_mask is mask
    torch.manual_seed(5)
    first = augment_waveforms(noisy, mask, polarity=True, max_delay=40, max_speed_change=0.1)
    torch.manual_seed(5)
    second = augment_waveforms(noisy, mask, polarity=True, max_delay=40, max_speed_change=0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not (first[0] * ~first[1][:, None]).any()
    assert (first[0].abs() < 5).all()


def test_the_tokenizer_augments_in_training_only():
    config = tiny_config(augment_polarity=True, augment_max_delay=16, augment_max_speed_change=0.1)
    model = AudioVQVAE(config, generator=torch.Generator().manual_seed(0))
    plain = AudioVQVAE(tiny_config(), generator=torch.Generator().manual_seed(0))
    plain.load_state_dict(model.state_dict())
    x, mask = audio(length=800), torch.ones(2, 800, dtype=torch.bool)
    batch = {"waveform": x, "mask": mask}
    torch.manual_seed(0)
    evaluated = copy.deepcopy(model).eval().loss(batch, "main", 0)[0]
    assert evaluated == copy.deepcopy(plain).eval().loss(batch, "main", 0)[0]
    torch.manual_seed(0)
    trained = copy.deepcopy(model).train().loss(batch, "main", 0)[0]
    assert trained != copy.deepcopy(plain).train().loss(batch, "main", 0)[0]
    with pytest.raises(ValueError, match="augment_max_speed_change"):
        tiny_config(augment_max_speed_change=0.7)
    with pytest.raises(ValueError, match="augment_max_delay"):
        tiny_config(augment_max_delay=-1)


def test_packing_lays_the_real_samples_end_to_end_in_as_few_windows_as_hold_them():
    x, mask = clips_and_mask(lengths=(300, 400, 150, 250))  # 1100 real samples in 4 windows of 400
    noisy = x + 5.0 * ~mask[:, None]  # padding holding junk must not be packed
    packed, packed_mask = pack_clips(noisy, mask)
    assert packed.shape == (3, 1, 400) and packed_mask.shape == (3, 400)
    stream = torch.cat([clip[:, :length] for clip, length in zip(x, (300, 400, 150, 250))], dim=-1)
    assert torch.equal(packed.permute(1, 0, 2).reshape(1, -1)[:, :1100], stream)
    assert int(packed_mask.sum()) == 1100 and packed_mask.flatten()[:1100].all()
    assert not packed.flatten()[1100:].any()
    stereo, stereo_mask = pack_clips(torch.cat([x, -x], dim=1), mask)  # channels stay aligned
    assert torch.equal(stereo[:, 0], packed[:, 0]) and torch.equal(stereo[:, 1], -packed[:, 0])
    assert torch.equal(stereo_mask, packed_mask)
    silent, silent_mask = pack_clips(x, torch.zeros_like(mask))
    assert silent.shape == (1, 1, 400) and not silent_mask.any()


def test_the_tokenizer_packs_its_training_batches_only_when_asked():
    model = AudioVQVAE(tiny_config(pack_clips=True), generator=torch.Generator().manual_seed(0))
    plain = AudioVQVAE(tiny_config(), generator=torch.Generator().manual_seed(0))
    plain.load_state_dict(model.state_dict())
    x = audio(length=800, batch=4)
    mask = torch.arange(800)[None, :] < torch.tensor([800, 320, 480, 160])[:, None]
    batch = {"waveform": x * mask[:, None], "mask": mask}
    windows, windows_mask = pack_clips(x, mask)
    assert len(windows) == 3
    packed_loss = copy.deepcopy(model).train().loss(batch, "main", 0)[0]
    assert packed_loss == copy.deepcopy(plain).train().loss({"waveform": windows, "mask": windows_mask}, "main", 0)[0]
    assert packed_loss != copy.deepcopy(plain).train().loss(batch, "main", 0)[0]
    assert copy.deepcopy(model).eval().loss(batch, "main", 0)[0] == copy.deepcopy(plain).eval().loss(batch, "main", 0)[0]
