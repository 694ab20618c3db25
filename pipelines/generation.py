"""Conditioned generation from a trained run: class grids, evaluation samples, prefix completions.

Samples are drawn by the prior as token sequences and decoded by the tokenizer. The tokens of
the evaluation samples are kept (`samples/eval_samples.safetensors`) so that evaluation can be
re-run without re-sampling, and so that a user can inspect or re-decode them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipelines.images import class_rows_grid, save_image_grid
from pipelines.stages import Run, decode_tokens, load_matched_pair, mark_stage_done, stage_is_current
from priors import SamplingOptions

logger = logging.getLogger(__name__)


def sampling_options(config) -> SamplingOptions:
    return SamplingOptions(
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, guidance_scale=config.guidance_scale
    )


def sample_labelled(prior, labels: torch.Tensor, options: SamplingOptions, generator, batch_size: int,
                    prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one sequence per label (labels may be None for an unconditional prior), in batches."""
    count = len(labels) if labels is not None else len(prefix)
    chunks = []
    for start in range(0, count, batch_size):
        chunk_labels = labels[start : start + batch_size] if labels is not None else None
        chunk_prefix = prefix[start : start + batch_size] if prefix is not None else None
        n = len(chunk_labels) if chunk_labels is not None else len(chunk_prefix)
        chunks.append(prior.sample(n, label=chunk_labels, prefix=chunk_prefix, options=options, generator=generator).cpu())
    return torch.cat(chunks)


def class_labels(num_classes: int, per_class: int, device) -> torch.Tensor:
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def sample_stage(run: Run, force: bool = False) -> Path:
    """`tokgen sample`: image grids, or for an audio run WAVs per class, spectrograms and completions; both
    with the evaluation's samples."""
    out_dir = run.path("samples")
    stage_fingerprint = run.samples_fingerprint()
    if not force and stage_is_current(out_dir, stage_fingerprint):
        logger.info("samples: reusing %s", out_dir)
        return out_dir
    if run.state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if run.config.is_audio:
            from pipelines.audio_stages import generate_audio_samples  # that module imports this one

            record = generate_audio_samples(run, out_dir, run.state.device)
        else:
            record = generate_run_samples(run.directory, run.config.sampling, out_dir, run.state.device)
        mark_stage_done(out_dir, stage_fingerprint, **record)
    run.state.wait_for_everyone()
    return out_dir


def generate_run_samples(run_dir: Path, config, out_dir: Path, device) -> dict:
    tokenizer, prior, tokenset = load_matched_pair(run_dir, device)
    manifest = tokenset.manifest
    options = sampling_options(config)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    num_classes = manifest.num_classes
    guided = num_classes and getattr(prior, "supports_guidance", True)
    conditional_options = options if guided else SamplingOptions(
        temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)

    # Grid: one row per class (or one block of unconditional samples).
    rows = max(num_classes, 1)
    grid_labels = class_labels(num_classes, config.grid_samples_per_class, device) if num_classes else None
    start = time.perf_counter()
    grid_tokens = (
        sample_labelled(prior, grid_labels, conditional_options, generator, config.batch_size)
        if num_classes
        else prior.sample(config.grid_samples_per_class * 4, options=conditional_options, generator=generator).cpu()
    )
    images = decode_tokens(tokenizer, grid_tokens, manifest)
    per_row = len(images) // rows
    class_rows_grid([images[r * per_row : (r + 1) * per_row] for r in range(rows)], out_dir / "grid.png")

    # Evaluation samples: a fixed number per class, tokens kept for `tokgen eval`.
    eval_labels = class_labels(num_classes, config.eval_samples_per_class, device) if num_classes else None
    eval_start = time.perf_counter()
    if num_classes:
        eval_tokens = sample_labelled(prior, eval_labels, conditional_options, generator, config.batch_size)
    else:
        eval_tokens = prior.sample(config.eval_samples_per_class * 10, options=options, generator=generator).cpu()
    sampling_seconds = time.perf_counter() - eval_start
    tensors = {"input_ids": eval_tokens.contiguous()}
    if eval_labels is not None:
        tensors["label"] = eval_labels.cpu().contiguous()
    save_file(tensors, str(out_dir / "eval_samples.safetensors"))

    completion_path = None
    if getattr(prior, "supports_prefix", True):  # VAEs and GANs cannot condition on a prefix
        completion_path = complete_test_prefixes(tokenizer, prior, tokenset, options, generator, out_dir, device)
    record = {
        "grid": str(out_dir / "grid.png"),
        "completions": str(completion_path) if completion_path else None,
        "eval_samples": len(eval_tokens),
        "sampling_seconds": sampling_seconds,
        "sampled_tokens_per_second": eval_tokens.numel() / max(sampling_seconds, 1e-9),
        "grid_seconds": eval_start - start,
        "options": json.loads(json.dumps(options.__dict__)),
    }
    logger.info("samples: %d sequences at %.0f tokens/s", len(eval_tokens), record["sampled_tokens_per_second"])
    return record


def complete_test_prefixes(tokenizer, prior, tokenset, options, generator, out_dir: Path, device,
                           count: int = 10, prefix_rows: int | None = None) -> Path:
    """Keep the top rows of real test images' tokens and let the prior complete the rest."""
    manifest = tokenset.manifest
    height, width = manifest.token_grid
    prefix_rows = prefix_rows if prefix_rows is not None else max(1, height // 2)
    test = tokenset.tensors("test")
    take = min(count, len(test["input_ids"]))
    originals = test["input_ids"][:take]
    labels = test["label"][:take].to(device) if manifest.num_classes else None
    prefix = originals[:, : prefix_rows * width * manifest.num_codebooks].to(device)
    completed = sample_labelled(prior, labels, options, generator, batch_size=take, prefix=prefix)
    images = decode_tokens(tokenizer, torch.cat([originals, completed]), manifest)
    path = out_dir / "completions.png"
    save_image_grid(images, path, nrow=take)
    return path


def load_eval_samples(samples_dir: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    path = samples_dir / "eval_samples.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `tokgen sample` first")
    tensors = load_file(str(path))
    return tensors["input_ids"], tensors.get("label")
