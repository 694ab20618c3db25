"""`tokgen compare`: train and evaluate a list of models on one data split and write one table.

Every model of a comparison sees the same train/val/test split of the same (optionally binarised)
images, is trained by the ordinary stages (train tokenizer, export tokens, train prior) and is
scored on the whole test split, never a prefix (binarized MNIST's test set is sorted by class).
Models that share a tokenizer config share its folder and token export (`tokenizers/<kind>-<hash>`);
each model has its own folder (`models/<name>`). A row reports the test NLL in nats per image and
bits per dimension when the model defines an image likelihood, bits per token always, and says
what kind of number it is: "exact" (autoregressive models on pixels), "estimate" (the VAE's
importance-weighted estimate, Burda et al. 2016, with its ELBO beside it), "bound (two-stage)"
(a tokenizer whose decoder defines log p(x | z): -log p(x | z) - log p_prior(z) with z = encode(x),
the negative ELBO of the deterministic posterior, an upper bound on the NLL of the induced model
p(x) = sum_z p(x | z) p_prior(z); with `code_search_sweeps` the codes of each image are searched and the
sum runs over every code scored, a tighter bound: see `pipelines/code_search.py`), "tokens only" (a prior over tokens of a decoder without a
likelihood) or "no density" (the GAN). It also gives parameter counts, training time, sampling
time per image and a sample grid, and a sample-quality score (Frechet distance in the features of
tokgen's own classifier, with the real-vs-real floor) so that a GAN is not left without a number.
The table follows the protocol of the binarized-MNIST NLL tables (Larochelle & Murray 2011, NADE;
Germain et al. 2015, MADE; van den Oord et al. 2016, PixelCNN).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.classifier import ClassifierConfig, load_or_train_classifier
from pipelines.code_search import search_codes_in_batches
from pipelines.compare_report import write_reports
from pipelines.config import (PRIOR_FIELDS_FROM_MANIFEST, ComponentSection, ConfigError, RunConfig,
                              _component_section, apply_overrides, build_dataclass, fingerprint, read_toml_file)
from pipelines.data import DataConfig, ImageDataset, ImageSplit, load_image_dataset, to_tensor_images
from pipelines.evaluate import sample_quality
from pipelines.images import save_image_grid
from pipelines.loop import TrainConfig
from pipelines.stages import (Run, RunError, decode_tokens, export_tokens_stage, process_state, read_stage,
                              train_prior_stage, train_tokenizer_stage)
from pipelines.tokenset import load_tokenset
from priors import PRIORS, SamplingOptions, load_prior
from tokenizers_vq import TOKENIZERS, load_tokenizer

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a model name is also its folder name
TIMING_FILE = "compare_timing.json"
ROW_FILE = "compare_row.json"  # a model's evaluated row, reused while its stages and the evaluation config hold


# --- config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareEvaluation:
    batch_size: int = 256
    sample_images: int = 64  # drawn and timed per model; the grid shows up to 64 of them
    sample_quality: bool = True  # Frechet distance in the classifier's features (needs labels)
    # Also score the validation split (val_* figures), so that a choice between models or settings can be
    # made without looking at the test split. Doubles the scoring time.
    score_validation: bool = False
    # Two-stage rows: sweeps of a search for the codes z that minimise -log p(x | z) - log p_prior(z) per
    # image (pipelines/code_search.py), a tighter bound than the encoder's codes give. 0 = off; a sweep
    # costs sequence_length * (vocab_size - 1) decoder and prior evaluations per image.
    code_search_sweeps: int = 0
    seed: int = 1234
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    prior: ComponentSection
    training: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: ComponentSection | None = None  # None: the comparison's shared tokenizer
    tokenizer_training: TrainConfig | None = None
    published_nats: float | None = None  # a literature figure on the same data and protocol, shown beside ours


@dataclass(frozen=True)
class CompareConfig:
    name: str = "compare"
    output_dir: str = "runs"
    seed: int = 0
    conditional: bool = False  # False: labels are dropped and every NLL is the unconditional -log p(x)
    binarize: bool = False  # threshold images at the middle grey (x > 0 in [-1, 1]) before everything
    only: tuple[str, ...] = ()  # run only these models (empty: all)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: ComponentSection = field(default_factory=lambda: ComponentSection("pixels", {}))
    tokenizer_training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: CompareEvaluation = field(default_factory=CompareEvaluation)
    models: tuple[ModelSpec, ...] = ()

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name

    def selected_models(self) -> tuple[ModelSpec, ...]:
        return tuple(spec for spec in self.models if not self.only or spec.name in self.only)


def _model_spec(data: dict, index: int) -> ModelSpec:
    where = f"models[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    data = dict(data)
    name = data.pop("name", None)
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ConfigError(f"[{where}] needs a name of letters, digits, '_', '-' or '.', got {name!r}")
    if "prior" not in data:
        raise ConfigError(f"[{where}] ({name}) needs a [prior] table with a kind")
    values = {"name": name, "prior": _component_section(PRIORS, data.pop("prior"), f"{name}.prior",
                                                          PRIOR_FIELDS_FROM_MANIFEST)}
    for key in ("training", "tokenizer_training"):
        if key in data:
            values[key] = build_dataclass(TrainConfig, data.pop(key), f"{name}.{key}")
    if "tokenizer" in data:
        values["tokenizer"] = _component_section(TOKENIZERS, data.pop("tokenizer"), f"{name}.tokenizer")
    if "published_nats" in data:
        values["published_nats"] = float(data.pop("published_nats"))
    if data:
        valid = sorted(f.name for f in dataclasses.fields(ModelSpec))
        raise ConfigError(f"unknown key(s) {sorted(data)} in [{where}] ({name}); valid keys: {valid}")
    return ModelSpec(**values)


def compare_config_from_dict(data: dict) -> CompareConfig:
    data = dict(data)
    values = {key: data.pop(key) for key in ("name", "output_dir", "seed", "conditional", "binarize") if key in data}
    if "only" in data:
        only = data.pop("only")
        values["only"] = (only,) if isinstance(only, str) else tuple(only)
    for key, cls in (("data", DataConfig), ("tokenizer_training", TrainConfig), ("evaluation", CompareEvaluation)):
        if key in data:
            values[key] = build_dataclass(cls, data.pop(key), key)
    if "tokenizer" in data:
        values["tokenizer"] = _component_section(TOKENIZERS, data.pop("tokenizer"), "tokenizer")
    models = data.pop("models", [])
    if data:
        valid = sorted(f.name for f in dataclasses.fields(CompareConfig))
        raise ConfigError(f"unknown top-level key(s) {sorted(data)}; valid: {valid}")
    if not isinstance(models, list) or not models:
        raise ConfigError("a compare config needs at least one [[models]] table")
    values["models"] = tuple(_model_spec(model, index) for index, model in enumerate(models))
    names = [spec.name for spec in values["models"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {names}")
    unknown = sorted(set(values.get("only", ())) - set(names))
    if unknown:
        raise ConfigError(f"only= names unknown model(s) {unknown}; models are {names}")
    return CompareConfig(**values)


def apply_compare_overrides(data: dict, overrides: list[str]) -> dict:
    """Dotted overrides; `models.<name>.key=value` reaches one model's table, `models.*.key=value` all."""
    data = copy.deepcopy(data)
    plain = [text for text in overrides if not text.startswith("models.")]
    data = apply_overrides(data, plain)
    models = data.get("models", [])
    for text in overrides:
        if not text.startswith("models."):
            continue
        key, _, raw = text.partition("=")
        parts = key.split(".")
        if len(parts) < 3 or not raw:
            raise ConfigError(f"override {text!r} is not of the form models.<name>.key=value")
        targets = [i for i, model in enumerate(models) if parts[1] in ("*", model.get("name"))]
        if not targets:
            raise ConfigError(f"override {text!r}: no model named {parts[1]!r}")
        for index in targets:
            models[index] = apply_overrides(models[index], [".".join(parts[2:]) + "=" + raw])
    return data


def load_compare_config(path: str | Path, overrides: list[str] = ()) -> CompareConfig:
    data = read_toml_file(path)
    try:
        return compare_config_from_dict(apply_compare_overrides(data, list(overrides)))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


# --- runs: one shared tokenizer folder per tokenizer config, one folder per model ------------------


@dataclass
class SharedTokensRun(Run):
    """A model's run whose `tokenizer/` and `tokens/` live in a shared tokenizer folder."""

    tokens_dir: Path | None = None

    def path(self, *parts: str) -> Path:
        if parts and parts[0] in ("tokenizer", "tokens") and self.tokens_dir is not None:
            return self.tokens_dir.joinpath(*parts)
        return super().path(*parts)


def prepare_dataset(dataset: ImageDataset, binarize: bool, conditional: bool) -> ImageDataset:
    """Threshold images (x > 0 in [-1, 1], i.e. uint8 >= 128, the pixels tokenizer's rule) and drop labels."""
    def convert(split: ImageSplit) -> ImageSplit:
        images = np.where(split.images >= 128, 255, 0).astype(np.uint8) if binarize else split.images
        return ImageSplit(images, split.labels if conditional else None)

    return dataclasses.replace(
        dataset, train=convert(dataset.train), val=convert(dataset.val), test=convert(dataset.test),
        num_classes=dataset.num_classes if conditional else 0,
        class_names=dataset.class_names if conditional else [],
        source={**dataset.source, "binarize": binarize, "conditional": conditional},
    )


def timed_stage(stage_dir: Path, record_path: Path, action, main_process: bool) -> float | None:
    """Run a stage and return its seconds; a reused stage reports the time recorded when it ran."""
    before = read_stage(stage_dir)
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    after = read_stage(stage_dir) or {}
    identity = {"fingerprint": after.get("fingerprint"), "completed_at": after.get("completed_at")}
    if before is not None and before == after:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        return record.get("seconds") if {k: record.get(k) for k in identity} == identity else None
    if main_process:
        record_path.write_text(json.dumps({**identity, "seconds": seconds}, indent=2))
    return seconds


def count_parameters(module: torch.nn.Module) -> int:
    """Trainable numbers; a model fitted by counting (no parameters) reports the size of its tables,
    and one that trained spare copies to choose from (an FVSBN's L1 banks) the numbers it uses."""
    if hasattr(module, "parameters_in_use"):
        return module.parameters_in_use()
    parameters = sum(p.numel() for p in module.parameters())
    return parameters or sum(t.numel() for t in module.state_dict().values())


# --- evaluation of one model ---------------------------------------------------------------------


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def token_grids(tokens: torch.Tensor, manifest) -> torch.Tensor:
    """(n L) flat tokens -> (n h' w') or (n h' w' q), the layout the tokenizer decodes."""
    height, width = manifest.token_grid
    if manifest.num_codebooks > 1:
        return tokens.reshape(-1, height, width, manifest.num_codebooks)
    return tokens.reshape(-1, height, width)


@torch.no_grad()
def batched_log_prob(prior, tokens: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device,
                     generator: torch.Generator) -> torch.Tensor:
    """(n L) -> (n,) nats; a stochastic estimator (the VAE's) draws from `generator`."""
    takes_generator = "generator" in inspect.signature(prior.log_prob).parameters
    results = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size].to(device)
        chunk_labels = labels[start : start + batch_size].to(device) if labels is not None else None
        extra = {"generator": generator} if takes_generator else {}
        results.append(prior.log_prob(chunk, chunk_labels, **extra).double().cpu())
    return torch.cat(results)


@torch.no_grad()
def batched_decoder_log_likelihood(tokenizer, images: torch.Tensor, tokens: torch.Tensor, manifest,
                                   batch_size: int, device) -> torch.Tensor:
    grids = token_grids(tokens, manifest)
    return torch.cat([
        tokenizer.decoder_log_likelihood(images[s : s + batch_size].to(device), grids[s : s + batch_size].to(device))
        .double().cpu() for s in range(0, len(tokens), batch_size)
    ])


def likelihood_figures(prior, tokenizer, manifest, tokens, labels, images, config: CompareConfig, device) -> dict:
    """NLL figures of one model on the whole test split, each named by its space and its kind."""
    batch_size = config.evaluation.batch_size
    generator = torch.Generator().manual_seed(config.evaluation.seed)
    log_probs = batched_log_prob(prior, tokens, labels, batch_size, device, generator)
    prior_nll = -log_probs.mean().item()
    estimate = bool(getattr(prior, "log_prob_is_bound", False))
    figures = {"prior_nll_nats": prior_nll, "bits_per_token": prior_nll / (tokens.shape[1] * math.log(2.0))}
    if estimate:
        samples = getattr(prior.config, "importance_samples", None)
        figures["importance_samples"] = samples
        if hasattr(prior, "elbo"):  # the bound that the estimate tightens
            elbos = torch.cat([prior.elbo(tokens[s : s + batch_size].to(device),
                                          labels[s : s + batch_size].to(device) if labels is not None else None,
                                          generator=generator).double().cpu()
                               for s in range(0, len(tokens), batch_size)])
            figures["negative_elbo_nats"] = -elbos.mean().item()
    kind_of_estimate = f"estimate (importance-weighted, k={figures.get('importance_samples')})"
    if manifest.tokenizer_kind == "pixels":
        figures["space"] = "pixels"
        figures["nll_nats_per_image"] = prior_nll
        figures["likelihood"] = kind_of_estimate if estimate else "exact"
    elif getattr(tokenizer, "has_decoder_likelihood", False):
        decoder = batched_decoder_log_likelihood(tokenizer, images, tokens, manifest, batch_size, device)
        figures["space"] = "image (two-stage)"
        figures["decoder_nll_nats"] = -decoder.mean().item()
        figures["encoder_bound_nats"] = figures["nll_nats_per_image"] = -(decoder + log_probs).mean().item()
        figures["likelihood"] = "bound (two-stage)" + (f", prior {kind_of_estimate}" if estimate else "")
        if config.evaluation.code_search_sweeps > 0 and not estimate:
            figures.update(searched_code_figures(prior, tokenizer, manifest, tokens, labels, images, config, device))
    else:
        figures["space"] = "tokens"
        figures["likelihood"] = (kind_of_estimate if estimate else "exact") + ", tokens only (decoder has no likelihood)"
    if "nll_nats_per_image" in figures:
        figures["bits_per_dim"] = figures["nll_nats_per_image"] / (math.prod(manifest.image_shape) * math.log(2.0))
    return figures


def two_stage_log_joint(tokenizer, prior, manifest):
    """(images, flat tokens, labels) -> (n,) log p(x | z) + log p_prior(z) in nats (float64)."""
    def log_joint(images, tokens, labels):
        return (tokenizer.decoder_log_likelihood(images, token_grids(tokens, manifest)).double()
                + prior.log_prob(tokens, labels).double())
    return log_joint


def searched_code_figures(prior, tokenizer, manifest, tokens, labels, images, config: CompareConfig, device) -> dict:
    """The two-stage bound after a search of each image's codes (`pipelines/code_search.py`): -log of the sum
    of p(x, z) over the distinct codes scored, and the best single code's bound with its two terms."""
    sweeps, batch_size = config.evaluation.code_search_sweeps, config.evaluation.batch_size
    result = search_codes_in_batches(two_stage_log_joint(tokenizer, prior, manifest), images, tokens, labels,
                                     manifest.vocab_size, sweeps, batch_size, device)
    decoder = batched_decoder_log_likelihood(tokenizer, images, result.tokens, manifest, batch_size, device)
    return {
        "nll_nats_per_image": -result.log_sum_joint.mean().item(),  # sum over the codes scored: the tightest
        "searched_best_code_nats": -result.log_joint.mean().item(),
        "likelihood": f"bound (two-stage, codes searched: {sweeps} sweep{'s' if sweeps > 1 else ''})",
        "code_search_sweeps": sweeps,
        "searched_decoder_nll_nats": -decoder.mean().item(),
        "searched_prior_nll_nats": -(result.log_joint - decoder).mean().item(),
        "searched_changed_tokens": result.changed_positions.double().mean().item(),
    }


VALIDATION_KEYS = ("nll_nats_per_image", "decoder_nll_nats", "prior_nll_nats", "bits_per_token", "negative_elbo_nats",
                   "encoder_bound_nats", "searched_best_code_nats", "searched_decoder_nll_nats", "searched_prior_nll_nats")


def split_inputs(tokenset, dataset: ImageDataset, split: str, config: CompareConfig, name: str):
    """(tokens, labels or None, images) of one whole split; its token rows must match its images."""
    tensors = tokenset.tensors(split)
    tokens, images = tensors["input_ids"], dataset.splits()[split].images
    if len(tokens) != len(images):
        raise RunError(f"{name}: {len(tokens)} {split} token rows but {len(images)} {split} images")
    labels = tensors.get("label") if config.conditional and tokenset.manifest.num_classes else None
    return tokens, labels, to_tensor_images(images)


def validation_figures(prior, tokenizer, tokenset, dataset: ImageDataset, config: CompareConfig, device,
                       name: str) -> dict:
    """The NLL figures of the whole validation split, prefixed `val_`."""
    tokens, labels, images = split_inputs(tokenset, dataset, "val", config, name)
    figures = likelihood_figures(prior, tokenizer, tokenset.manifest, tokens, labels, images, config, device)
    return {f"val_{key}": figures[key] for key in VALIDATION_KEYS if key in figures}


@torch.no_grad()
def draw_samples(prior, tokenizer, manifest, config: CompareConfig, device) -> tuple[torch.Tensor, float]:
    """`sample_images` images drawn and decoded; returns them and the seconds per image."""
    count = config.evaluation.sample_images
    generator = torch.Generator(device=device).manual_seed(config.evaluation.seed)
    labels = None
    if config.conditional and manifest.num_classes:
        labels = torch.arange(count, device=device) % manifest.num_classes
    _synchronize(device)
    start = time.perf_counter()
    tokens = prior.sample(count, label=labels, options=SamplingOptions(), generator=generator)
    images = decode_tokens(tokenizer, tokens.cpu(), manifest)
    _synchronize(device)
    return images, (time.perf_counter() - start) / count


def evaluate_model(spec: ModelSpec, run: SharedTokensRun, dataset: ImageDataset, config: CompareConfig,
                   classifier) -> dict:
    device = run.state.device
    tokenizer_dir = run.path("tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir).to(device).eval()
    tokenset = load_tokenset(run.path("tokens"), tokenizer_dir=tokenizer_dir)
    prior = load_prior(run.path("prior")).to(device).eval()
    manifest = tokenset.manifest
    tokens, labels, images = split_inputs(tokenset, dataset, "test", config, spec.name)
    row = {
        "name": spec.name, "prior": spec.prior.kind, "tokenizer": manifest.tokenizer_kind,
        "test_items": len(tokens), "sequence_length": manifest.sequence_length, "vocab_size": manifest.vocab_size,
        "parameters": count_parameters(prior),
        "tokenizer_parameters": sum(p.numel() for p in tokenizer.parameters()),
        "published_nats": spec.published_nats,
    }
    if getattr(prior, "has_density", True):
        row.update(likelihood_figures(prior, tokenizer, manifest, tokens, labels, images, config, device))
        if config.evaluation.score_validation:
            row.update(validation_figures(prior, tokenizer, tokenset, dataset, config, device, spec.name))
    else:
        row.update(space="-", likelihood="no density")
    samples, seconds_per_image = draw_samples(prior, tokenizer, manifest, config, device)
    row["sample_seconds_per_image"] = seconds_per_image
    grid = run.path("samples.png")
    save_image_grid(samples[:64], grid, nrow=8)
    row["sample_grid"] = str(grid)
    row["sample_grid_relative"] = grid.relative_to(config.directory).as_posix()
    if classifier is not None:
        generator = torch.Generator().manual_seed(config.evaluation.seed)
        quality = sample_quality(classifier, samples, None, images, generator=generator)
        row.update({key: value for key, value in quality.items() if key.startswith("frechet")})
    return row


# --- the whole comparison ------------------------------------------------------------------------


def evaluation_key(run: Run, config: CompareConfig) -> str:
    """What a row depends on: the trained prior and tokenizer (their stage records) and how we evaluate."""
    return fingerprint(read_stage(run.path("prior")), read_stage(run.path("tokenizer")), config.evaluation,
                       config.conditional, config.binarize, config.data)


def cached_row(spec: ModelSpec, run: Run, dataset: ImageDataset, config: CompareConfig, classifier) -> dict:
    """Evaluate a model, or reuse its row: scoring 10k test images (the VAE's k-sample estimate) is slow."""
    key = evaluation_key(run, config)
    path = run.path(ROW_FILE)
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key and Path(record["row"]["sample_grid"]).is_file():
            logger.info("compare: reusing the evaluation of %s", spec.name)
            return {**record["row"], "published_nats": spec.published_nats}
    start = time.perf_counter()
    row = evaluate_model(spec, run, dataset, config, classifier)
    row["evaluation_seconds"] = time.perf_counter() - start  # scoring the test split, sampling, Frechet
    path.write_text(json.dumps({"key": key, "row": row}, indent=2))
    return row


def tokenizer_key(section: ComponentSection, training: TrainConfig, config: CompareConfig) -> str:
    digest = fingerprint(section, training.identity() if section.kind != "pixels" else None, config.data,
                         config.binarize, config.conditional)
    return f"{section.kind}-{digest[:8]}"


def run_comparison(config: CompareConfig) -> dict:
    """Train (or reuse) every selected model, evaluate it, and write comparison.{md,json,png}."""
    state = process_state()
    directory = config.directory
    if state.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.resolved.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    labelled = load_image_dataset(config.data)
    dataset = prepare_dataset(labelled, config.binarize, config.conditional)
    tokenizer_runs: dict[str, tuple[Run, float | None]] = {}
    classifier = None
    if config.evaluation.sample_quality and labelled.num_classes and state.is_main_process:
        train = prepare_dataset(labelled, config.binarize, conditional=True).train
        classifier, _ = load_or_train_classifier(
            directory / "classifier", train.images, train.labels, config.evaluation.classifier,
            labelled.num_classes, fingerprint={"data": dataset.source}, device=state.device)
    rows = []
    for spec in config.selected_models():
        section = spec.tokenizer or config.tokenizer
        tokenizer_training = spec.tokenizer_training or config.tokenizer_training
        key = tokenizer_key(section, tokenizer_training, config)
        run_config = dict(seed=config.seed, data=config.data, tokenizer=section, tokenizer_training=tokenizer_training)
        if key not in tokenizer_runs:
            tokens_run = Run(RunConfig(name=key, output_dir=str(directory / "tokenizers"), **run_config),
                             state=state, _dataset=dataset)
            logger.info("compare: tokenizer %s", key)
            if state.is_main_process:
                tokens_run.directory.mkdir(parents=True, exist_ok=True)
            seconds = timed_stage(tokens_run.path("tokenizer"), tokens_run.path(TIMING_FILE),
                                  lambda: train_tokenizer_stage(tokens_run), state.is_main_process)
            export_tokens_stage(tokens_run)
            tokenizer_runs[key] = (tokens_run, seconds)
        tokens_run, tokenizer_seconds = tokenizer_runs[key]
        model_run = SharedTokensRun(
            RunConfig(name=spec.name, output_dir=str(directory / "models"), prior=spec.prior,
                      prior_training=spec.training, **run_config),
            state=state, _dataset=dataset, tokens_dir=tokens_run.directory)
        logger.info("compare: model %s (%s on %s)", spec.name, spec.prior.kind, key)
        if state.is_main_process:
            model_run.directory.mkdir(parents=True, exist_ok=True)
        seconds = timed_stage(model_run.path("prior"), model_run.path(TIMING_FILE),
                              lambda: train_prior_stage(model_run), state.is_main_process)
        if state.is_main_process:
            row = cached_row(spec, model_run, dataset, config, classifier)
            stage = read_stage(model_run.path("prior")) or {}
            final_metrics = stage.get("final_metrics") or {}
            if "positions_per_l1_penalty" in final_metrics:  # an FVSBN that chose its L1 strength per position
                row["positions_per_l1_penalty"] = final_metrics["positions_per_l1_penalty"]
            row.update(train_seconds=seconds, train_steps=stage.get("steps"),
                       selected_step=final_metrics.get("selected_step"),
                       train_batch_size=spec.training.batch_size,
                       tokenizer_folder=key, tokenizer_train_seconds=tokenizer_seconds)
            rows.append(row)
            logger.info("compare: %s -> %s", spec.name, {k: row.get(k) for k in ("nll_nats_per_image", "likelihood")})
        state.wait_for_everyone()
    report = {
        "name": config.name, "directory": str(directory), "data": dataset.source, "conditional": config.conditional, "binarize": config.binarize,
        "split_sizes": {name: len(split) for name, split in dataset.splits().items()},
        "device": str(state.device), "models": rows,
    }
    if state.is_main_process:
        write_reports(directory, report)
    state.wait_for_everyone()
    return report
