"""Reconstruction scoring in the spoken-digit classifier's space (pipelines.audio_eval)."""

import shutil

import numpy as np
import pytest
import torch

from pipelines.audio_eval import SpokenDigitClassifierConfig, log_mel_features, reconstruction_classifier_metrics
from pipelines.audio_stages import spread_out
from pipelines.classifier import ClassifierConfig, ImageClassifier, classifier_accuracy

RATE = 8000


def _classifier(config: SpokenDigitClassifierConfig, clips: torch.Tensor) -> ImageClassifier:
    torch.manual_seed(0)
    features = log_mel_features(clips, config, RATE)
    return ImageClassifier(config.network, num_classes=3, in_channels=1, image_size=features.shape[-2:]).eval()


def test_a_lossless_codec_keeps_accuracy_and_has_zero_frechet_and_noise_moves_both():
    config = SpokenDigitClassifierConfig(network=ClassifierConfig(channels=(8,), feature_dim=16))
    generator = torch.Generator().manual_seed(0)
    clips = torch.randn(40, 1, 2000, generator=generator) * 0.3
    labels = torch.randint(3, (40,), generator=generator)
    classifier = _classifier(config, clips)
    features = log_mel_features(clips, config, RATE)
    same = reconstruction_classifier_metrics(classifier, log_mel_features(clips.clone(), config, RATE), features, labels)
    expected = classifier_accuracy(classifier, features, labels)
    assert same["reconstruction_class_accuracy"] == expected
    assert set(same["reconstruction_class_accuracy_by_class"]) == {str(v) for v in labels.unique().tolist()}
    assert abs(same["reconstruction_frechet"]) < 1e-3
    silent = reconstruction_classifier_metrics(classifier, log_mel_features(torch.zeros_like(clips), config, RATE),
                                               features, labels)
    assert silent["reconstruction_frechet"] > 1e-2


def test_spectrogram_rows_spread_real_clips_across_the_class():
    clips = torch.arange(30.0).view(30, 1, 1)  # 6 speakers x 5 takes, listed speaker by speaker
    picked = spread_out(clips, 3).flatten().tolist()
    assert picked == [0.0, 14.0, 29.0]  # speakers 0, 2 and 5, not speaker 0's first three takes
    assert torch.equal(spread_out(clips[:2], 3), clips[:2])


def test_band_oracles_keep_the_low_band_exactly_and_treat_the_highs_as_named():
    from benchmarks.si_snr_band_oracles import oracle_clips, render_oracle

    rate = 8000
    t = torch.arange(800, dtype=torch.float64) / rate  # whole periods of both tones in 800 samples
    low, high = torch.sin(2 * torch.pi * 300 * t).float(), 0.5 * torch.sin(2 * torch.pi * 2500 * t).float()
    generator = torch.Generator().manual_seed(0)
    assert torch.allclose(render_oracle(low + high, rate, 1000, "muted", generator), low, atol=1e-5)
    shuffled = render_oracle(low + high, rate, 1000, "random_phase", generator)
    spectrum, original = torch.fft.rfft(shuffled.double()), torch.fft.rfft((low + high).double())
    low_bins = torch.fft.rfftfreq(800, d=1 / rate) < 1000
    assert torch.allclose(spectrum[low_bins], original[low_bins], atol=2.0)  # of 400 at the 300 Hz peak
    high_energy = (shuffled - low).square().sum() / high.square().sum()
    assert 0.5 < high_energy < 1.5  # the highs keep about their energy ...
    assert (shuffled - low - high).square().sum() > 0.5 * high.square().sum()  # ... but not their waveform
    assert torch.allclose(render_oracle(low + high, rate, 4000, "muted", generator), low + high, atol=1e-5)
    clips = torch.stack([low + high, low + high])[:, None]
    rendered = oracle_clips(clips, torch.tensor([800, 500]), rate, 1000, "muted")
    assert rendered[1, 0, 500:].abs().max() == 0 and rendered[0, 0, 500:].abs().max() > 0.5  # padding stays silent


def _tone_clips(lengths: list[int], total: int = 1600) -> tuple[torch.Tensor, torch.Tensor]:
    """(n 1 total) voiced-like clips (two harmonics and noise), silent after each length."""
    generator = torch.Generator().manual_seed(1)
    t = torch.arange(total) / RATE
    clips = torch.stack([torch.sin(2 * torch.pi * f0 * t) + 0.5 * torch.sin(2 * torch.pi * 3 * f0 * t)
                         for f0 in (140.0, 210.0, 95.0)[: len(lengths)]])[:, None]
    clips = 0.4 * clips + 0.05 * torch.randn(clips.shape, generator=generator)
    lengths = torch.tensor(lengths)
    return clips * (torch.arange(total) < lengths[:, None])[:, None], lengths


def test_waveform_metrics_scores_any_codecs_output_over_real_samples_only():
    from pipelines.audio_eval import waveform_metrics

    clips, lengths = _tone_clips([1600, 900, 1200])
    exact = waveform_metrics(clips.clone(), clips, lengths, RATE)
    assert exact["si_snr_db"] > 60 and exact["stft_distance"] < 1e-3 and exact["mel_distance"] < 1e-3
    assert waveform_metrics(0.3 * clips, clips, lengths, RATE)["si_snr_db"] > 60  # scale-invariant
    garbage_in_padding = clips + 5.0 * (torch.arange(1600) >= lengths[:, None])[:, None]
    assert waveform_metrics(garbage_in_padding, clips, lengths, RATE)["si_snr_db"] > 60
    noisy_clips = clips + 0.1 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(2))
    noisy = waveform_metrics(noisy_clips, clips, lengths, RATE, batch_size=2)  # batches of unequal size are weighted by clips
    assert 5 < noisy["si_snr_db"] < 20 and noisy["num_clips"] == 3 and noisy["stft_distance"] > 0.05
    one_by_one = torch.tensor([waveform_metrics(noisy_clips[i : i + 1], clips[i : i + 1], lengths[i : i + 1], RATE)["si_snr_db"]
                               for i in range(3)], dtype=torch.float64)
    assert noisy["si_snr_db_stderr"] == pytest.approx(float(one_by_one.std() / 3 ** 0.5), rel=1e-5)
    assert noisy["si_snr_db_stderr"] > 0


def test_paired_si_snr_gain_tells_a_small_gain_from_the_spread_between_clips():
    from pipelines.audio_eval import paired_si_snr_gain, per_clip_si_snr, waveform_metrics

    clips, lengths = _tone_clips([1600, 900, 1200])
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(clips.shape, generator=generator) * torch.tensor([0.02, 0.1, 0.3])[:, None, None]
    worse, better = clips + noise, clips + 0.9 * noise  # clips far apart, each one a little closer
    worse_snr = per_clip_si_snr(worse, clips, lengths, batch_size=2)
    better_snr = per_clip_si_snr(better, clips, lengths)
    assert worse_snr.shape == (3,) and worse_snr.dtype == torch.float64
    assert worse_snr.mean().item() == pytest.approx(waveform_metrics(worse, clips, lengths, RATE)["si_snr_db"])
    gain = paired_si_snr_gain(better_snr, worse_snr)
    assert gain["si_snr_gain_clips_improved"] == 1.0
    # noise at 0.9 times the amplitude: 0.92 dB on every clip
    assert gain["si_snr_gain_db"] == pytest.approx(20 * np.log10(1 / 0.9), abs=0.1)
    unpaired_stderr = waveform_metrics(better, clips, lengths, RATE)["si_snr_db_stderr"]
    assert gain["si_snr_gain_db_stderr"] < 0.1 * unpaired_stderr
    same = paired_si_snr_gain(worse_snr, worse_snr)
    assert same["si_snr_gain_db"] == 0 and same["si_snr_gain_db_stderr"] == 0 and same["si_snr_gain_clips_improved"] == 0
    with pytest.raises(ValueError, match="same clips"):
        paired_si_snr_gain(worse_snr, worse_snr[:2])


def test_lagged_si_snr_finds_a_decoders_delay():
    from benchmarks.codec2_reference import lagged_si_snr
    from pipelines.audio_data import lengths_to_mask

    clips, lengths = _tone_clips([1600, 1200])
    delayed = torch.nn.functional.pad(clips[:, 0], (7, 0))[:, :1600]  # decoded[t] = clip[t - 7]
    scores = lagged_si_snr(delayed, clips[:, 0], lengths_to_mask(lengths, 1600), max_lag=20)
    assert scores.shape == (2, 41)
    assert (scores.argmax(1) - 20).tolist() == [7, 7]
    assert scores[:, 27].min() > 15 and scores[:, 20].max() < 10  # aligned, the clip (less the 7 samples cut at the end)


@pytest.mark.skipif(shutil.which("c2enc") is None or shutil.which("c2dec") is None,
                    reason="Codec2's c2enc/c2dec are not installed (apt-get install codec2)")
def test_codec2_roundtrip_keeps_the_length_and_codes_at_the_modes_bitrate(tmp_path):
    from benchmarks.codec2_reference import codec2_roundtrip, codec2_tools

    clips, _ = _tone_clips([1600], total=8000)  # one second
    decoded, bits = codec2_roundtrip(clips[0, 0, :7000].numpy(), "1600", codec2_tools(), tmp_path)
    assert decoded.shape == (7000,) and decoded.dtype == np.float32
    assert 1400 * 7000 / RATE <= bits <= 1600 * 7000 / RATE + 64  # 64-bit frames of 40 ms
    assert 0.01 < np.abs(decoded).max() <= 1.0  # sound comes back, in range


def test_band_limited_features_are_the_clips_low_passed_at_their_own_cutoffs_and_silent_after_each_clip():
    from pipelines.audio_eval import band_limited_features

    clips, lengths = _tone_clips([1600, 1200])
    t = torch.arange(1600) / RATE
    clips = clips + 0.3 * torch.sin(2 * torch.pi * 3500 * t) * (torch.arange(1600) < lengths[:, None])[:, None]
    config = SpokenDigitClassifierConfig(band_limited_copies=4, band_limit_min_hz=3000)  # half the cutoffs above 3.5 kHz
    plain, copies = log_mel_features(clips, config, RATE), band_limited_features(clips, lengths, config, RATE)
    assert copies.shape == (8, *plain.shape[1:])
    assert torch.equal(copies, band_limited_features(clips, lengths, config, RATE, batch_size=1))  # seeded, batch-free
    frames_after_end = slice(1200 // config.hop + 3, None)  # past the short clip and the STFT window's reach
    assert torch.equal(copies[1::2, ..., frames_after_end], plain[1:2, ..., frames_after_end].expand(4, -1, -1, -1))
    top_band = (copies[..., -1, :].mean(-1) - plain[..., -1, :].mean(-1).repeat(4, 1)).flatten()  # mel band at ~3.5-4 kHz
    assert (top_band < -0.3).any() and (top_band.abs() < 0.3).any()  # each copy its own cutoff: some lose it, some keep it
    assert torch.allclose(copies[..., :10, :], plain[..., :10, :].repeat(4, 1, 1, 1), atol=0.05)  # the lows are kept


def test_band_limited_copies_enlarge_the_classifiers_train_split_and_only_then_its_fingerprint(tmp_path):
    import dataclasses

    from pipelines.audio_eval import load_or_train_audio_classifier
    from pipelines.config import fingerprint

    network = ClassifierConfig(channels=(4,), feature_dim=8, epochs=1)
    plain = SpokenDigitClassifierConfig(network=network)
    banded = dataclasses.replace(plain, band_limited_copies=2)
    old_style = {k: v for k, v in dataclasses.asdict(plain).items() if not k.startswith("band_")}
    assert fingerprint(plain.identity()) == fingerprint(old_style)  # caches and runs from before keep theirs
    assert fingerprint(banded.identity()) != fingerprint(plain.identity())
    clips, lengths = _tone_clips([1600, 1200, 900])
    labels = torch.tensor([0, 1, 2])
    _, info = load_or_train_audio_classifier(tmp_path / "b", clips, labels, banded, 3, RATE, train_lengths=lengths)
    assert info["train_size"] == 9 and not info["reused"]
    _, info = load_or_train_audio_classifier(tmp_path / "b", clips, labels, banded, 3, RATE, train_lengths=lengths)
    assert info["reused"]
    _, info = load_or_train_audio_classifier(tmp_path / "b", clips, labels, plain, 3, RATE)
    assert info["train_size"] == 3 and not info["reused"]
    with pytest.raises(ValueError, match="lengths"):
        load_or_train_audio_classifier(tmp_path / "c", clips, labels, banded, 3, RATE)
    with pytest.raises(ValueError, match="band_limited_copies"):
        SpokenDigitClassifierConfig(band_limited_copies=-1)


def test_latent_statistics_count_only_frames_that_hold_audio():
    from benchmarks.audio_codec_eval import latent_statistics
    from tokenizers_vq.audio import AudioVQVAE, AudioVQVAEConfig

    torch.manual_seed(0)
    tokenizer = AudioVQVAE(AudioVQVAEConfig(hidden_channels=4, strides=(2, 2))).eval()
    waveforms = 0.3 * torch.randn(3, 1, 400)
    whole = torch.tensor([400, 400, 400])
    stats = latent_statistics(tokenizer, waveforms, whole)
    assert stats == pytest.approx(latent_statistics(tokenizer, waveforms, whole, batch_size=1))  # batching changes nothing
    with torch.no_grad():  # the same figures computed directly, over every frame
        z = tokenizer._latents(waveforms).reshape(-1, tokenizer.quantizer.dim)
        q = tokenizer.quantizer.lookup(tokenizer.quantizer.to_indices(z[None]))[0]
    assert stats["latent_mean_square"] == pytest.approx(z.square().mean().item(), rel=1e-5)
    assert stats["code_mean_square"] == pytest.approx(q.square().mean().item(), rel=1e-5)
    assert stats["quantization_relative_error"] == pytest.approx(((z - q).square().sum() / z.square().sum()).item(), rel=1e-5)
    assert -1 <= stats["latent_code_cosine"] <= 1
    # Frames past a clip's end are left out: a clip cut to its first 40 samples counts 10 frames.
    shorter = latent_statistics(tokenizer, waveforms, torch.tensor([40, 400, 400]))
    assert shorter != pytest.approx(stats)


def test_codec_eval_transformed_clips_flip_and_delay_within_the_window():
    from benchmarks.audio_codec_eval import transformed_clips

    waveforms = torch.arange(1, 21, dtype=torch.float32).reshape(2, 1, 10)
    lengths = torch.tensor([4, 9])
    same, same_lengths = transformed_clips(waveforms, lengths)
    assert torch.equal(same, waveforms) and torch.equal(same_lengths, lengths)
    flipped, _ = transformed_clips(waveforms, lengths, flip_polarity=True)
    assert torch.equal(flipped, -waveforms)
    delayed, delayed_lengths = transformed_clips(waveforms, lengths, delay=3)
    assert delayed.shape == waveforms.shape
    assert torch.equal(delayed[..., :3], torch.zeros(2, 1, 3))
    assert torch.equal(delayed[..., 3:], waveforms[..., :7])
    assert delayed_lengths.tolist() == [7, 10]  # the longer clip runs into the window's end
    with pytest.raises(ValueError, match="delay"):
        transformed_clips(waveforms, lengths, delay=-1)
