"""Reconstruction scoring in the spoken-digit classifier's space (pipelines.audio_eval)."""

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
