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
