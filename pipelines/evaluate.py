"""Metric functions for both stages, each returning a flat `dict[str, float]` (or one float).

Stage one is measured by reconstruction error (MSE on the [-1, 1] scale, PSNR on the [0, 1]
scale), by structural similarity (SSIM of Wang et al. 2004, "Image Quality Assessment: From Error
Visibility to Structural Similarity", through torchmetrics) and by how well it uses its codebook (usage, perplexity and dead codes of the test-split
tokens, as reported since van den Oord et al. 2017, "Neural Discrete Representation Learning").
Stage two is measured by its exact token likelihood, reported in nats per item and bits per token
(and bits per dimension where the caller knows the data's dimensionality). Samples are measured by
the class accuracy of a classifier that tokgen trains itself and by the Frechet distance between
Gaussians fitted to that classifier's features (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", the formula behind FID). The Frechet
distance is biased upwards by finite samples, so it is always reported with the distance a real
set of the same size gets (the floor) and the ratio of the two.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings

import numpy as np
import torch
from einops import rearrange

from pipelines.classifier import (ImageClassifier, accuracy_by_class, as_image_tensor,
                                  classifier_accuracy, classifier_features, classifier_logits, prediction_accuracy)

logger = logging.getLogger(__name__)

__all__ = [
    "reconstruction_metrics", "structural_similarity", "codebook_metrics", "nll_metrics", "frechet_distance",
    "gaussian_statistics", "reconstruction_frechet", "sample_quality", "classifier_accuracy",
]

# PSNR of a perfect reconstruction is infinite; capping the per-image MSE at this value (100 dB)
# keeps metrics.json finite (strict JSON has no Infinity) and the average meaningful.
MIN_MSE_FOR_PSNR = 1e-10
# SSIM's standard window: an 11x11 Gaussian of sigma 1.5 (Wang et al. 2004).
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_BATCH_SIZE = 256  # images per torchmetrics call, to bound the memory of its five filtered maps


def structural_similarity(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean SSIM of (b c h w) images in [-1, 1], measured on the [0, 1] scale (data range 1).

    The standard 11x11 Gaussian window (sigma 1.5) for images of side >= 11; smaller images get the
    largest odd uniform window that fits, since torchmetrics' reflection padding needs a window no
    larger than the image. Per-image SSIM (averaged over channels and positions) is averaged over images.
    """
    from torchmetrics.functional import structural_similarity_index_measure

    if original.ndim != 4 or original.shape != reconstruction.shape:
        raise ValueError(f"SSIM needs two (b c h w) batches of one shape, got {tuple(original.shape)} "
                         f"and {tuple(reconstruction.shape)}")
    side = min(original.shape[-2:])
    if side >= SSIM_WINDOW:
        window = dict(gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WINDOW)
    else:
        window = dict(gaussian_kernel=False, kernel_size=side if side % 2 else side - 1)
    total = 0.0
    for start in range(0, len(original), SSIM_BATCH_SIZE):
        # [-1, 1] -> [0, 1]; clamped, because a decoder's raw output may overshoot the data range.
        chunks = [(images[start : start + SSIM_BATCH_SIZE].detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
                  for images in (reconstruction, original)]
        per_image = structural_similarity_index_measure(*chunks, data_range=1.0, reduction="none", **window)
        total += per_image.double().sum().item()
    return total / len(original)


def reconstruction_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """Images (b c h w) (or any (b ...)) in [-1, 1] -> {"mse", "psnr"}, plus "ssim" for (b c h w) images.

    `mse` is the mean squared error on the [-1, 1] scale the models train on. `psnr` is computed
    per image on the [0, 1] scale (data range 1), then averaged over images, in dB. `ssim` is
    `structural_similarity` (images only: other shapes, such as audio, get no "ssim").
    """
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
    ssim = {"ssim": structural_similarity(original, reconstruction)} if original.ndim == 4 else {}
    original = rearrange(original.detach().double().cpu(), "b ... -> b (...)")
    reconstruction = rearrange(reconstruction.detach().double().cpu(), "b ... -> b (...)")
    squared_error = (original - reconstruction).pow(2)
    # Mapping [-1, 1] to [0, 1] halves every difference, so the [0, 1]-scale MSE is a quarter.
    per_image_mse_unit = (squared_error.mean(dim=1) / 4.0).clamp_min(MIN_MSE_FOR_PSNR)
    psnr = -10.0 * torch.log10(per_image_mse_unit)
    return {"mse": squared_error.mean().item(), "psnr": psnr.mean().item(), **ssim}


def codebook_metrics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Code indices of any shape -> usage (fraction of codes used), perplexity, dead and used code counts.

    Perplexity is exp of the entropy of the empirical code distribution: codebook_size when all
    codes are equally frequent, 1 when a single code is used.
    """
    flat = indices.detach().reshape(-1).long().cpu()
    if flat.numel() == 0:
        raise ValueError("no indices to measure")
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{flat.min()}, {flat.max()}]")
    counts = torch.bincount(flat, minlength=codebook_size).double()
    probabilities = counts / counts.sum()
    nonzero = probabilities[probabilities > 0]
    entropy = -(nonzero * nonzero.log()).sum()
    used = int((counts > 0).sum())
    return {
        "usage": used / codebook_size,
        "perplexity": entropy.exp().item(),
        "dead_codes": float(codebook_size - used),
        "used_codes": float(used),
    }


def nll_metrics(log_probs_nats: torch.Tensor, tokens_per_item: int,
                dims_per_item: int | None = None) -> dict[str, float]:
    """Per-item log-likelihoods (n,) in nats -> mean NLL per item, bits per token (and per dimension).

    `bits_per_dim` is only present when `dims_per_item` is given: for a two-stage model it divides
    the token likelihood by the data's dimensionality, which is a bound only once a decoder term
    is added, so the caller decides whether it means anything.
    """
    log_probs = torch.as_tensor(log_probs_nats).detach().double().reshape(-1).cpu()
    nll = -log_probs.mean().item()
    metrics = {"nll_nats_per_item": nll, "bits_per_token": nll / (tokens_per_item * math.log(2.0))}
    if dims_per_item is not None:
        metrics["bits_per_dim"] = nll / (dims_per_item * math.log(2.0))
    return metrics


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(n d) features -> mean (d,) and unbiased covariance (d d), in float64."""
    array = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"need (n d) features with n >= 2, got shape {array.shape}")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _trace_sqrt_product(covariance_a: np.ndarray, covariance_b: np.ndarray, method: str) -> float:
    """tr((S_a S_b)^(1/2)) for covariance matrices S_a, S_b."""
    if method == "auto":
        method = "scipy_or_eigh" if importlib.util.find_spec("scipy") is not None else "eigh"
    if method == "scipy" or method == "scipy_or_eigh":
        import scipy.linalg

        with warnings.catch_warnings():
            # Dead ReLU features make covariances singular; scipy then warns that its root may be
            # inaccurate, and "auto" switches to the eigen-decomposition, which is exact for PSD input.
            warnings.simplefilter("error" if method == "scipy_or_eigh" else "ignore", scipy.linalg.LinAlgWarning)
            try:
                product_sqrt = scipy.linalg.sqrtm(covariance_a @ covariance_b)
            except scipy.linalg.LinAlgWarning:
                return _trace_sqrt_product(covariance_a, covariance_b, "eigh")
        if not np.all(np.isfinite(product_sqrt)):
            # Singular products (fewer samples than dimensions) make sqrtm unstable; a tiny ridge
            # fixes it, as in the reference FID implementation.
            ridge = np.eye(covariance_a.shape[0]) * 1e-6
            product_sqrt = scipy.linalg.sqrtm((covariance_a + ridge) @ (covariance_b + ridge))
        if np.iscomplexobj(product_sqrt):
            imaginary = np.abs(product_sqrt.imag).max()
            if imaginary > 1e-3:
                logger.warning("matrix square root has an imaginary part of %.3g; dropping it", imaginary)
            product_sqrt = product_sqrt.real
        return float(np.trace(product_sqrt))
    if method == "eigh":
        # S_a S_b is similar to the symmetric PSD matrix sqrt(S_a) S_b sqrt(S_a), so their square
        # roots share a trace; the symmetric form has real, non-negative eigenvalues.
        root_a = _symmetric_sqrt(covariance_a)
        eigenvalues = np.linalg.eigvalsh(root_a @ covariance_b @ root_a)
        return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    raise ValueError(f"method must be 'auto', 'scipy' or 'eigh', got {method!r}")


def frechet_distance(features_a, features_b, method: str = "auto") -> float:
    """Frechet distance between Gaussians fitted to (n d) and (m d) feature sets, in float64.

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).
    """
    mean_a, covariance_a = gaussian_statistics(features_a)
    mean_b, covariance_b = gaussian_statistics(features_b)
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"feature dimensions differ: {mean_a.shape[0]} vs {mean_b.shape[0]}")
    mean_term = float(np.sum((mean_a - mean_b) ** 2))
    trace_term = float(np.trace(covariance_a) + np.trace(covariance_b))
    distance = mean_term + trace_term - 2.0 * _trace_sqrt_product(covariance_a, covariance_b, method)
    # Rounding can leave identical sets a hair below zero.
    return max(distance, 0.0)


def reconstruction_frechet(classifier: ImageClassifier, originals: torch.Tensor, reconstructions: torch.Tensor,
                           batch_size: int = 256) -> float:
    """Frechet distance between the classifier features of reconstructions and of their originals.

    The tokenizer's counterpart of a sample FID: how far decoding moves the images' feature
    distribution (blurry reconstructions score high even at a good PSNR). Both sets are the same
    images, so there is no sampling floor to subtract; the figure compares tokenizers on one data set.
    """
    originals, reconstructions = as_image_tensor(originals), as_image_tensor(reconstructions)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    return frechet_distance(classifier_features(classifier, reconstructions, batch_size),
                            classifier_features(classifier, originals, batch_size))


def sample_quality(classifier: ImageClassifier, samples: torch.Tensor, sample_labels: torch.Tensor | None,
                   real_test_images: torch.Tensor, *, batch_size: int = 256,
                   generator: torch.Generator | None = None) -> dict[str, float]:
    """Class accuracy and Frechet distance of samples in the classifier's feature space.

    The real test set is split at random (seeded by `generator`) into two disjoint halves: a
    reference half, and a held-out half from which as many images as there are samples are taken.
    `frechet_distance` is samples vs reference, `frechet_floor` is held-out real images vs the same
    reference, so both carry the same finite-sample bias and `frechet_ratio` is about 1 for a
    generator indistinguishable from the data. `class_accuracy` is NaN when there are no labels.
    """
    samples = as_image_tensor(samples)
    real = as_image_tensor(real_test_images)
    if len(real) < 4:
        raise ValueError(f"need at least 4 real test images for the Frechet floor, got {len(real)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    permutation = torch.randperm(len(real), generator=generator)
    half = len(real) // 2
    held_out = real[permutation[: min(half, len(samples))]]
    reference = real[permutation[half:]]
    if len(samples) > half:
        logger.warning("%d samples but only %d held-out real examples: the Frechet floor uses fewer examples "
                       "and is biased upwards relative to the samples' distance", len(samples), half)

    reference_features = classifier_features(classifier, reference, batch_size)
    distance = frechet_distance(classifier_features(classifier, samples, batch_size), reference_features)
    floor = frechet_distance(classifier_features(classifier, held_out, batch_size), reference_features)
    if sample_labels is not None:
        predictions = classifier_logits(classifier, samples, batch_size).argmax(dim=-1)
        class_accuracy = prediction_accuracy(predictions, sample_labels)
        by_class = accuracy_by_class(predictions, sample_labels)  # which classes a generator fails on
    else:
        class_accuracy, by_class = float("nan"), {}
    # The binomial standard error of that fraction over these samples: whether 90.1% of 1000 is above
    # 90% is a question of about +-0.9 points (the spread between priors comes on top).
    stderr = math.sqrt(class_accuracy * (1.0 - class_accuracy) / len(samples)) if len(samples) else float("nan")
    return {
        "class_accuracy": class_accuracy,
        "class_accuracy_stderr": stderr,
        "class_accuracy_by_class": by_class,
        "frechet_distance": distance,
        "frechet_floor": floor,
        "frechet_ratio": distance / floor if floor > 0 else float("inf"),
    }
