"""Tests for pipelines.evaluate, pipelines.classifier and pipelines.images (tiny, seeded, offline)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import classifier as classifier_module
from pipelines.classifier import (ClassifierConfig, classifier_accuracy, load_classifier, load_or_train_classifier,
                                  save_classifier, train_classifier)
from pipelines.evaluate import codebook_metrics, frechet_distance, nll_metrics, reconstruction_metrics, sample_quality
from pipelines.images import (class_rows_grid, plot_code_histogram, plot_training_curves, reconstruction_grid,
                              save_image_grid)

TINY = ClassifierConfig(channels=(4, 8), feature_dim=16, epochs=4, batch_size=32, learning_rate=3e-3, seed=0,
                        augment=False)


def separable_images(count: int, seed: int, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(count 1 8 8) noise in [-1, 1] with a bright 2x2 patch whose position encodes the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    images = torch.rand(count, 1, 8, 8, generator=generator) * 0.6 - 1.0
    for index, label in enumerate(labels.tolist()):
        images[index, 0, 2 * label : 2 * label + 2, 2:4] = 1.0
    return images, labels


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # These tensors are tiny: with other processes on the 2 cores, intra-op threads only contend
    # (one thread measured 15x faster than two under load). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_classifier(single_thread):
    images, labels = separable_images(384, seed=1)
    return train_classifier(images, labels, TINY, 3, progress=False)[0]


# ---------------------------------------------------------------- reconstruction, codebook, NLL


def test_psnr_of_identical_images_is_capped_high_and_mse_zero():
    images = torch.rand(3, 1, 4, 4) * 2 - 1
    metrics = reconstruction_metrics(images, images.clone())
    assert metrics["mse"] == 0.0
    assert metrics["psnr"] == pytest.approx(100.0)


def test_psnr_of_known_noise_matches_formula_per_image():
    original = torch.zeros(2, 1, 4, 4)
    reconstruction = original.clone()
    reconstruction[0] += 0.2        # [-1, 1] error 0.2 -> [0, 1] error 0.1 -> MSE 0.01 -> 20 dB
    reconstruction[1] -= 0.4        # [0, 1] error 0.2 -> MSE 0.04 -> 13.979 dB
    metrics = reconstruction_metrics(original, reconstruction)
    assert metrics["mse"] == pytest.approx((0.04 + 0.16) / 2)
    assert metrics["psnr"] == pytest.approx((20.0 + 10 * math.log10(1 / 0.04)) / 2)


def test_codebook_metrics_on_hand_made_indices():
    indices = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])    # frequencies 1/4, 1/4, 1/2 of 8 codes
    metrics = codebook_metrics(indices, codebook_size=8)
    assert metrics == pytest.approx({"usage": 3 / 8, "perplexity": 2 ** 1.5, "dead_codes": 5.0, "used_codes": 3.0})
    uniform = codebook_metrics(torch.arange(8).repeat(3), codebook_size=8)
    assert uniform["perplexity"] == pytest.approx(8.0) and uniform["dead_codes"] == 0.0
    with pytest.raises(ValueError):
        codebook_metrics(torch.tensor([8]), codebook_size=8)


def test_nll_metrics_units():
    metrics = nll_metrics(torch.tensor([-10.0, -20.0]), tokens_per_item=5, dims_per_item=30)
    assert metrics["nll_nats_per_item"] == pytest.approx(15.0)
    assert metrics["bits_per_token"] == pytest.approx(15.0 / (5 * math.log(2)))
    assert metrics["bits_per_dim"] == pytest.approx(15.0 / (30 * math.log(2)))
    assert "bits_per_dim" not in nll_metrics(torch.tensor([-1.0]), tokens_per_item=1)


# ---------------------------------------------------------------- Frechet distance


def gaussian_features(mean: np.ndarray, variances: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Features whose sample mean and unbiased covariance are exactly `mean` and diag(`variances`)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((count, len(mean)))
    noise -= noise.mean(axis=0)
    whitened = noise @ np.linalg.inv(np.linalg.cholesky(np.cov(noise, rowvar=False))).T
    return whitened * np.sqrt(variances) + mean


@pytest.mark.parametrize("method", ["scipy", "eigh", "auto"])
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(method):
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    variances_a, variances_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    features_a = gaussian_features(mean_a, variances_a, 200, seed=0)
    features_b = gaussian_features(mean_b, variances_b, 300, seed=1)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2)
    assert frechet_distance(features_a, features_b, method=method) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(torch.as_tensor(features_a), torch.as_tensor(features_b), method=method) == pytest.approx(
        expected, rel=1e-6)


def test_frechet_distance_methods_agree_on_correlated_features_and_identical_sets_give_zero():
    rng = np.random.default_rng(0)
    features_a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    features_b = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 0.3
    assert frechet_distance(features_a, features_b, "scipy") == pytest.approx(
        frechet_distance(features_a, features_b, "eigh"), rel=1e-6)
    for method in ("scipy", "eigh"):
        assert frechet_distance(features_a, features_a.copy(), method) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_handles_dead_features_without_warnings():
    # A dead ReLU unit is a constant feature: singular covariances, where "auto" must stay exact.
    rng = np.random.default_rng(1)
    features_a = np.concatenate([rng.standard_normal((300, 4)), np.zeros((300, 2))], axis=1)
    features_b = np.concatenate([rng.standard_normal((300, 4)) * 2.0, np.zeros((300, 2))], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = frechet_distance(features_a, features_b)
    assert auto == pytest.approx(frechet_distance(features_a[:, :4], features_b[:, :4], "eigh"), rel=1e-6)


# ---------------------------------------------------------------- classifier


def test_classifier_config_from_dict_rejects_unknown_keys_and_rebuilds_tuples():
    rebuilt = ClassifierConfig.from_dict({"channels": [8, 16], "epochs": 1})
    assert rebuilt == ClassifierConfig(channels=(8, 16), epochs=1)
    with pytest.raises(ValueError, match="valid keys"):
        ClassifierConfig.from_dict({"chanels": [8]})


def test_classifier_learns_separable_data_and_round_trips(tiny_classifier, tmp_path):
    val_images, val_labels = separable_images(96, seed=2)
    assert classifier_accuracy(tiny_classifier, val_images, val_labels) > 0.9
    assert tiny_classifier.features(val_images).shape == (96, TINY.feature_dim)

    save_classifier(tiny_classifier, tmp_path / "classifier")
    loaded = load_classifier(tmp_path / "classifier")
    with torch.no_grad():
        torch.testing.assert_close(loaded(val_images), tiny_classifier(val_images), rtol=0, atol=0)
    # Strict loading: an unexpected tensor in the weights file is refused.
    from safetensors.torch import load_file, save_file
    weights = load_file(str(tmp_path / "classifier" / "model.safetensors"))
    save_file({**weights, "stray": torch.zeros(1)}, str(tmp_path / "classifier" / "model.safetensors"))
    with pytest.raises(RuntimeError):
        load_classifier(tmp_path / "classifier")


def test_training_is_reproducible_and_accepts_uint8_channels_last():
    images, labels = separable_images(64, seed=3)
    config = ClassifierConfig(channels=(4,), feature_dim=8, epochs=1, batch_size=16, augment=True, max_shift=1)
    uint8_images = ((images + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()     # (b h w) uint8
    first, _ = train_classifier(uint8_images, labels.numpy(), config, 3, progress=False)
    second, _ = train_classifier(uint8_images, labels.numpy(), config, 3, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_cached_classifier_reused_only_when_fingerprint_matches(tmp_path, monkeypatch):
    images, labels = separable_images(64, seed=4)
    config = ClassifierConfig(channels=(4,), feature_dim=8, epochs=1, batch_size=32, augment=False)
    calls = []
    real_train = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier",
                        lambda *args, **kwargs: calls.append(1) or real_train(*args, **kwargs))
    cache = tmp_path / "classifier"
    model, info = load_or_train_classifier(cache, images, labels, config, 3, fingerprint={"data": "a", "n": 64},
                                           progress=False)
    assert info["reused"] is False and len(calls) == 1
    again, info = load_or_train_classifier(cache, images, labels, config, 3, fingerprint={"n": 64, "data": "a"},
                                           progress=False)
    assert info["reused"] is True and len(calls) == 1 and "train_accuracy" in info
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images), rtol=0, atol=0)
    _, info = load_or_train_classifier(cache, images, labels, config, 3, fingerprint={"data": "b", "n": 64},
                                       progress=False)
    assert info["reused"] is False and len(calls) == 2
    # Same caller fingerprint but different pixels: the data digest forces a retrain too.
    _, info = load_or_train_classifier(cache, images.flip(0), labels.flip(0), config, 3,
                                       fingerprint={"data": "b", "n": 64}, progress=False)
    assert info["reused"] is False and len(calls) == 3


def test_sample_quality_scores_real_images_near_the_floor_and_noise_far_above(tiny_classifier):
    real_images, real_labels = separable_images(400, seed=5)
    held_images, held_labels = separable_images(100, seed=6)
    good = sample_quality(tiny_classifier, held_images, held_labels, real_images,
                          generator=torch.Generator().manual_seed(0))
    assert set(good) == {"class_accuracy", "class_accuracy_stderr", "class_accuracy_by_class", "frechet_distance",
                         "frechet_floor", "frechet_ratio"}
    by_class, labels = good["class_accuracy_by_class"], torch.as_tensor(held_labels)
    assert set(by_class) == {str(value) for value in labels.unique().tolist()}
    counts = torch.bincount(labels)  # the per-class fractions, weighted by class size, give the overall one
    assert sum(by_class[str(c)] * counts[c].item() for c in range(len(counts)) if counts[c]) / len(labels) \
        == pytest.approx(good["class_accuracy"])
    assert good["class_accuracy"] == pytest.approx(classifier_accuracy(tiny_classifier, held_images, held_labels))
    p, n = good["class_accuracy"], len(held_images)
    assert good["class_accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    noise = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    bad = sample_quality(tiny_classifier, noise, held_labels, real_images, generator=torch.Generator().manual_seed(0))
    assert bad["frechet_floor"] == pytest.approx(good["frechet_floor"])     # same seed, same real split
    assert good["frechet_ratio"] < 3.0 < bad["frechet_ratio"]
    assert math.isnan(sample_quality(tiny_classifier, noise, None, real_images)["class_accuracy"])


# ---------------------------------------------------------------- images


def test_save_image_grid_pixel_size_and_values(tmp_path):
    images = -torch.ones(5, 1, 8, 8)
    images[0] = 1.0
    path = save_image_grid(images, tmp_path / "grid.png", nrow=3, padding=2)
    with Image.open(path) as picture:
        assert picture.mode == "L" and picture.size == (3 * 10 + 2, 2 * 10 + 2)
        pixels = np.asarray(picture)
    assert pixels[2, 2] == 255 and pixels[2, 12] == 0 and pixels[0, 0] == 128
    rgb = save_image_grid(torch.zeros(2, 3, 4, 6), tmp_path / "nested" / "rgb.png", nrow=8, padding=1, scale=3)
    with Image.open(rgb) as picture:
        assert picture.mode == "RGB" and picture.size == ((2 * 7 + 1) * 3, (5 + 1) * 3)


def test_class_rows_and_reconstruction_grids(tmp_path):
    rows = [torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 4, 4)]
    with Image.open(class_rows_grid(rows, tmp_path / "rows.png", padding=0)) as picture:
        assert picture.size == (3 * 4, 3 * 4)
    originals, reconstructions = torch.ones(5, 1, 4, 4), -torch.ones(5, 1, 4, 4)
    path = reconstruction_grid(originals, reconstructions, tmp_path / "recon.png", nrow=4, padding=0)
    with Image.open(path) as picture:
        pixels = np.asarray(picture)
    assert pixels.shape == (4 * 4, 4 * 4)                      # 2 pairs of rows, 4 columns
    assert pixels[0, 0] == 255 and pixels[4, 0] == 0 and pixels[8, 0] == 255 and pixels[12, 0] == 0
    assert pixels[8, 4] == 128                                 # ragged last pair is padded


def test_plots_write_pngs(tmp_path):
    counts = torch.tensor([50, 0, 3, 10, 0, 1])
    with Image.open(plot_code_histogram(counts, tmp_path / "hist.png", title="test")) as picture:
        assert picture.format == "PNG" and picture.size[0] > 100
    history = [{"step": step, "loss": 1.0 / (step + 1), "psnr": float(step)} for step in range(5)]
    with Image.open(plot_training_curves(history, tmp_path / "curves.png", keys=("loss", "psnr"))) as picture:
        assert picture.format == "PNG"
