"""Evaluate a finished run and write `metrics.json`.

Three groups of figures, each with its space named in the key:
- tokenizer: reconstruction MSE/PSNR/SSIM on the test split, the Frechet distance of the
  reconstructions to the originals in the classifier's feature space (labelled data), codebook
  usage/perplexity/dead codes of test tokens and of the last logged training window;
- prior: exact test NLL of the token sequences, in nats per image and bits per token (this is the
  prior's likelihood of the *tokens*; the image likelihood of a VQ model is only a bound and needs
  a decoder likelihood, which a plain VQ-VAE with an MSE decoder does not define);
- samples: class-conditional accuracy and Frechet distance in the feature space of a classifier
  that tokgen trains on the same train split (cached in `classifier/`), with the real-vs-real floor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from pipelines.classifier import classifier_accuracy, load_or_train_classifier
from pipelines.data import to_tensor_images
from pipelines.evaluate import (codebook_metrics, nll_metrics, reconstruction_frechet, reconstruction_metrics,
                                sample_quality)
from pipelines.generation import load_eval_samples
from pipelines.images import plot_code_histogram, reconstruction_grid
from pipelines.stages import Run, decode_tokens, load_matched_pair, module_device, write_run_metrics

logger = logging.getLogger(__name__)


def _batched(tensor: torch.Tensor, batch_size: int):
    for start in range(0, len(tensor), batch_size):
        yield tensor[start : start + batch_size]


@torch.no_grad()
def tokenizer_metrics(tokenizer, test_images: torch.Tensor, test_tokens: torch.Tensor, out_dir: Path,
                      batch_size: int, grid_images: int, classifier=None) -> dict:
    device = module_device(tokenizer)
    reconstructions = torch.cat(
        [tokenizer.decode(tokenizer.encode(chunk.to(device))).float().cpu() for chunk in _batched(test_images, batch_size)]
    )
    metrics = reconstruction_metrics(test_images, reconstructions)
    if classifier is not None:
        metrics["reconstruction_frechet"] = reconstruction_frechet(classifier, test_images, reconstructions, batch_size)
    metrics["codebook_size"] = tokenizer.vocab_size
    codebook = codebook_metrics(test_tokens, tokenizer.vocab_size)
    metrics.update({f"test_{key}": value for key, value in codebook.items()})
    counts = torch.bincount(test_tokens.flatten(), minlength=tokenizer.vocab_size)
    plot_code_histogram(counts, out_dir / "code_histogram.png", title="code frequencies, test split")
    reconstruction_grid(test_images[:grid_images], reconstructions[:grid_images], out_dir / "reconstructions.png")
    return metrics


def training_codebook_metrics(tokenizer_dir: Path) -> dict:
    """Usage, perplexity and dead codes of the tokenizer's last logged training window (from stage.json).

    Training batches see fewer tokens than the test split, so these read lower; a phase prefix
    ("generator/usage" for a VQ-GAN) is dropped.
    """
    path = tokenizer_dir / "stage.json"
    final = json.loads(path.read_text()).get("final_metrics", {}) if path.is_file() else {}
    return {f"training_{name.rsplit('/', 1)[-1]}": value for name, value in final.items()
            if name.rsplit("/", 1)[-1] in ("usage", "perplexity", "dead_codes") and isinstance(value, (int, float))}


@torch.no_grad()
def prior_metrics(prior, tokens: torch.Tensor, labels: torch.Tensor | None, batch_size: int, image_dims: int) -> dict:
    device = module_device(prior)
    log_probs = []
    for start in range(0, len(tokens), batch_size):
        chunk_labels = labels[start : start + batch_size].to(device) if labels is not None else None
        log_probs.append(prior.log_prob(tokens[start : start + batch_size].to(device), chunk_labels).float().cpu())
    log_probs = torch.cat(log_probs)
    metrics = nll_metrics(log_probs, tokens_per_item=tokens.shape[1])
    exactness = "estimate of a bound" if getattr(prior, "log_prob_is_bound", False) else "exact"
    metrics["nll_space"] = f"tokens ({exactness}); not an image likelihood"
    metrics["log_prob_is_bound"] = bool(getattr(prior, "log_prob_is_bound", False))
    metrics["image_dims"] = image_dims
    return metrics


def evaluate_run(run: Run) -> dict:
    if run.config.is_audio:  # SI-SNR, spectral distances and the spoken-digit classifier
        from pipelines.audio_stages import evaluate_audio_run

        return evaluate_audio_run(run)
    if not run.state.is_main_process:
        run.state.wait_for_everyone()
        return {}
    started = time.perf_counter()
    config = run.config
    device = run.state.device
    tokenizer, prior, tokenset = load_matched_pair(run.directory, device)
    manifest = tokenset.manifest
    dataset = run.dataset
    test_images = to_tensor_images(dataset.test.images)
    test_split = tokenset.tensors("test")
    test_tokens = test_split["input_ids"]
    test_labels = test_split.get("label") if manifest.num_classes else None
    samples_dir = run.path("samples")

    metrics: dict = {"run": config.name, "data_source": manifest.data_source}
    classifier = None
    if manifest.num_classes:  # first, so that the tokenizer's reconstructions are measured in its space too
        classifier, classifier_info = load_or_train_classifier(
            run.path("classifier"),
            dataset.train.images, dataset.train.labels, config.evaluation.classifier, manifest.num_classes,
            fingerprint={"data": manifest.data_source, "train_size": len(dataset.train.images),
                         "classifier": config.evaluation.classifier.__dict__},
            device=device,
        )
    metrics["tokenizer"] = tokenizer_metrics(
        tokenizer, test_images, test_tokens, samples_dir, config.evaluation.batch_size,
        config.evaluation.reconstruction_grid_images, classifier=classifier,
    )
    metrics["tokenizer"].update(training_codebook_metrics(run.path("tokenizer")))
    if getattr(prior, "has_density", True):  # a GAN defines no likelihood: only sample metrics
        metrics["prior"] = prior_metrics(prior, test_tokens, test_labels, config.evaluation.batch_size,
                                         image_dims=math.prod(manifest.image_shape))

    if manifest.num_classes:
        classifier_real = classifier_accuracy(classifier, test_images, torch.as_tensor(dataset.test.labels))
        sample_tokens, sample_labels = load_eval_samples(samples_dir)
        samples = decode_tokens(tokenizer, sample_tokens, manifest)
        generator = torch.Generator().manual_seed(config.seed)
        quality = sample_quality(classifier, samples, sample_labels, test_images, generator=generator)
        metrics["samples"] = {
            **quality,
            "classifier_test_accuracy": classifier_real,
            "num_samples": len(samples),
            "guidance_scale": config.sampling.guidance_scale,
            **{f"classifier_{k}": v for k, v in classifier_info.items() if isinstance(v, (int, float))},
        }
    return write_run_metrics(run, metrics, ("sampled_tokens_per_second",), started)
