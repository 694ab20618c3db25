"""The stages of a two-stage run, each reading and writing its own folder under `runs/<name>/`.

train tokenizer -> export tokens -> train prior -> sample -> evaluate. Every stage records a
fingerprint of the config that produced it (`stage.json`); `tokgen run` reuses a stage whose
fingerprint matches instead of recomputing it, and recomputes everything downstream of a stage
that changed. The two stages meet only in the exported token set (ARCHITECTURE.md): the prior
reads vocabulary size, sequence length and conditioning from the manifest, never from the
tokenizer. Training runs on every process under `accelerate launch`; export, sampling and
evaluation run on the main process while the others wait.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors.torch import load_file

from pipelines.audio_data import AudioDataset, AudioTensorDataset, load_audio_dataset
from pipelines.config import RunConfig, fingerprint
from pipelines.data import ImageDataset, ImageTensorDataset, load_image_dataset
from pipelines.early_stopping import BestValidationWeights
from pipelines.loop import TrainResult, train
from pipelines.tokenset import export_audio_tokens, export_tokens, load_tokenset, sha256_file
from priors import PRIORS, load_prior
from tokenizers_vq import TOKENIZERS, load_tokenizer
from tokenizers_vq.checkpoint import CONFIG_NAME, WEIGHTS_NAME, state_mismatches

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def read_stage(directory: Path) -> dict | None:
    path = directory / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mark_stage_done(directory: Path, stage_fingerprint: str, **extra) -> None:
    record = {"fingerprint": stage_fingerprint, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    (directory / STAGE_FILE).write_text(json.dumps(record, indent=2))


def stage_is_current(directory: Path, stage_fingerprint: str, resume: bool = False) -> bool:
    """Whether `directory` holds this config's finished stage. A training that `max_minutes` stopped
    early counts as finished (its model is used), except under `--resume`, which trains it on."""
    record = read_stage(directory)
    if record is None or record.get("fingerprint") != stage_fingerprint:
        return False
    if record.get("stopped_early"):
        if resume:
            return False
        logger.info("%s: trained %s of %s steps (max_minutes); --resume continues its training",
                    directory, record.get("steps"), record.get("max_steps"))
    return True


def write_run_metrics(run: Run, metrics: dict, sample_stage_keys: tuple[str, ...], started: float) -> dict:
    """Write `metrics.json`, adding the sampling speeds the samples stage recorded (`sample_stage_keys`) and
    the evaluation's time since `started`; every process waits for it."""
    record = read_stage(run.path("samples")) or {}
    for key in sample_stage_keys:
        if key in record:
            metrics.setdefault("samples", {})[key] = record[key]
    metrics["evaluation_seconds"] = time.perf_counter() - started
    path = run.path("metrics.json")
    path.write_text(json.dumps(metrics, indent=2, default=float))
    logger.info("metrics written to %s", path)
    run.state.wait_for_everyone()
    return metrics


def training_record(result: TrainResult, config) -> dict:
    """What stage.json says about a training: its steps and metrics, and whether max_minutes cut it short."""
    record = {"steps": result.steps, "final_metrics": result.final_metrics}
    if result.stopped_early:
        record.update(stopped_early=True, max_steps=config.max_steps)
    return record


class RunError(RuntimeError):
    """A run folder in a state the requested command cannot continue from; the message says what to do."""


def prepare_training_dir(directory: Path, stage_fingerprint: str, resume: bool, force: bool = False,
                         main_process: bool = True) -> None:
    """Make `directory` ready for a training stage without ever silently discarding resumable work.

    Checkpoints made under another config can never be resumed into this one and are removed.
    Checkpoints of this very config are an interrupted run: continue it with `--resume`, or start
    over with `--force`; anything else is refused rather than thrown away.
    """
    marker = directory / "fingerprint.txt"
    same_config = marker.is_file() and marker.read_text() == stage_fingerprint
    has_checkpoints = any((directory / "checkpoints").glob("checkpoint_*"))
    if directory.exists() and same_config and has_checkpoints and not resume and not force:
        raise RunError(
            f"{directory} holds checkpoints of an interrupted run with this config; "
            "pass --resume to continue it or --force to start over"
        )
    if not main_process:  # every rank runs the check above; only the main one touches the folder
        return
    if directory.exists() and (not same_config or not resume):
        if not same_config and has_checkpoints:
            logger.warning("removing checkpoints of another config in %s", directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(stage_fingerprint)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a model lives; parameter-free models (pixels tokenizer, histograms) answer through buffers."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def process_state() -> PartialState:
    """This process's place in the run; without CUDA, `accelerate launch` processes are CPU (gloo) ranks."""
    return PartialState(cpu=not torch.cuda.is_available())


@dataclass
class Run:
    """One run folder and the lazily loaded things every stage shares."""

    config: RunConfig
    state: PartialState = field(default_factory=process_state)
    _dataset: ImageDataset | AudioDataset | None = None

    @property
    def directory(self) -> Path:
        return self.config.run_dir

    def path(self, *parts: str) -> Path:
        return self.directory.joinpath(*parts)

    @property
    def dataset(self) -> ImageDataset | AudioDataset:
        if self._dataset is None:
            config = self.config
            self._dataset = load_audio_dataset(config.audio_data) if config.is_audio else load_image_dataset(config.data)
        return self._dataset

    # Fingerprints chain so that a change upstream invalidates everything after it.
    def tokenizer_fingerprint(self) -> str:
        c = self.config
        data = c.audio_data if c.is_audio else c.data
        if c.tokenizer_init:  # the starting weights decide the result as much as the config does
            start = self._tokenizer_init_hash
            return fingerprint("tokenizer", data, c.tokenizer, c.tokenizer_training.identity(), start)
        return fingerprint("tokenizer", data, c.tokenizer, c.tokenizer_training.identity())

    @functools.cached_property
    def _tokenizer_init_hash(self) -> str:
        """Every later stage's fingerprint chains through the tokenizer's: hash the starting weights once."""
        return sha256_file(tokenizer_init_files(self.config.tokenizer_init)[1])

    def tokens_fingerprint(self) -> str:
        if self.config.is_audio:  # the layout decides the token sequences, and so do shifted copies
            audio = self.config.audio
            augmentation = (audio.train_shifted_copies, audio.max_shift_seconds, self.config.seed)
            if not audio.train_shifted_copies:  # runs made before the option keep their fingerprint
                return fingerprint("tokens", self.tokenizer_fingerprint(), audio.layout)
            return fingerprint("tokens", self.tokenizer_fingerprint(), audio.layout, augmentation)
        return fingerprint("tokens", self.tokenizer_fingerprint())

    def prior_fingerprint(self) -> str:
        c = self.config
        return fingerprint("prior", self.tokens_fingerprint(), c.prior, c.prior_training.identity())

    def samples_fingerprint(self) -> str:
        c = self.config
        if c.is_audio:
            # the classifier's front end draws the spectrograms; which clips its judge trained on is no concern of theirs
            judge = dataclasses.replace(c.audio.classifier, band_limited_copies=0).identity()
            audio = (c.audio.prefix_seconds, c.audio.completions, c.audio.spectrogram_clips, judge)
            return fingerprint("samples", self.prior_fingerprint(), c.sampling, audio)
        return fingerprint("samples", self.prior_fingerprint(), c.sampling)

    def write_resolved_config(self) -> None:
        if self.state.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.config.to_dict(), indent=2, default=str)
            self.path("config.resolved.json").write_text(text)


def check_audio_tokenizer(tokenizer_config, dataset: AudioDataset) -> None:
    """An audio run needs a tokenizer of (c t) clips at the data's rate and channel count."""
    rate, channels = getattr(tokenizer_config, "sample_rate", None), getattr(tokenizer_config, "channels", None)
    if rate is None or channels is None:
        raise RunError(f"[audio_data] needs an audio tokenizer (kind \"audio_vqvae\"), not {type(tokenizer_config).__name__}")
    if rate != dataset.sample_rate or channels != dataset.channels:
        raise RunError(
            f"tokenizer.sample_rate={rate}, tokenizer.channels={channels} but the audio is {dataset.sample_rate} Hz "
            f"with {dataset.channels} channel(s); set them equal (audio_data.sample_rate resamples the files)"
        )


def tokenizer_init_files(folder: str | Path) -> tuple[Path, Path]:
    """The config.json and model.safetensors of a `tokenizer_init` folder, or a clear error."""
    folder = Path(folder)
    files = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise RunError(f"tokenizer_init={str(folder)!r} lacks {' and '.join(missing)}; "
                       f"give a saved tokenizer folder (a run's tokenizer/)")
    return files


def load_initial_tokenizer_weights(tokenizer, kind: str, folder: str | Path, allow_added_levels: bool = True) -> None:
    """Start `tokenizer` from a saved one's tensors (codebooks and their k-means flags included);
    `allow_added_levels=False` (decoder-only training, which cannot train new levels) refuses any growth."""
    config_path, weights_path = tokenizer_init_files(folder)
    saved_kind = json.loads(config_path.read_text()).get("kind")
    if saved_kind != kind:
        raise RunError(f"tokenizer_init: {config_path} is a {saved_kind!r} tokenizer, but [tokenizer] kind is {kind!r}")
    tensors, expected = load_file(weights_path), tokenizer.state_dict()
    missing, unexpected, misshaped = state_mismatches(tokenizer, tensors)
    added = added_residual_levels(missing, tensors) if allow_added_levels else []
    differ = sorted(set(missing) - set(added) | set(unexpected) | set(misshaped))
    if differ:  # a whole architecture's worth of names would bury the point: count them, show a few
        shown = ", ".join(f"{name} (saved {tuple(tensors[name].shape) if name in tensors else 'none'}, "
                          f"here {tuple(expected[name].shape) if name in expected else 'none'})" for name in differ[:3])
        raise RunError(f"tokenizer_init: {weights_path} does not fit this run's [tokenizer]: {len(differ)} tensors "
                       f"missing or of wrong shapes, e.g. {shown}; compare [tokenizer] with {config_path}")
    tokenizer.load_state_dict(tensors, strict=not added)  # names and shapes checked above
    logger.info("tokenizer: training starts from the weights of %s", weights_path)
    if added:
        levels = sorted({int(RESIDUAL_LEVEL_NAME.match(name).group(1)) for name in added})
        logger.info("tokenizer: residual level(s) %s are new and start untrained (from k-means on their "
                    "residuals if kmeans_init is on)", levels)


RESIDUAL_LEVEL_NAME = re.compile(r"(?:.*\.)?quantizer\.levels\.(\d+)\.")


def added_residual_levels(missing: list[str], saved: dict) -> list[str]:
    """The missing names that belong to residual-quantizer levels past the saved ones' last: a codec
    may grow its residual stack (more bits per frame) from a trained one, the new levels starting
    untrained (with kmeans_init, fitted to the first batch of residuals): a bitrate's worth of
    training rather than a whole codec's. Any other missing name is a mismatch."""
    saved_levels = {int(match.group(1)) for match in map(RESIDUAL_LEVEL_NAME.match, saved) if match}
    if not saved_levels:
        return []
    return [name for name in missing if (match := RESIDUAL_LEVEL_NAME.match(name)) and int(match.group(1)) > max(saved_levels)]


def train_tokenizer_stage(run: Run, resume: bool = False, force: bool = False) -> Path:
    out_dir = run.path("tokenizer")
    stage_fingerprint = run.tokenizer_fingerprint()
    if not force and stage_is_current(out_dir, stage_fingerprint, resume):
        logger.info("tokenizer: reusing %s (config unchanged)", out_dir)
        return out_dir
    dataset = run.dataset
    tokenizer_config = run.config.tokenizer_config()
    _, tokenizer_cls = TOKENIZERS[run.config.tokenizer.kind]
    set_seed(run.config.tokenizer_training.seed)  # initial weights come from the global RNGs: same config, same run
    tokenizer = tokenizer_cls(tokenizer_config)
    decoder_only = getattr(tokenizer_config, "train_decoder_only", False)
    if decoder_only and not run.config.tokenizer_init:
        raise RunError("tokenizer.train_decoder_only fine-tunes the decoder of a trained codec, whose encoder and "
                       "codebooks it keeps: set tokenizer_init to that codec's folder (a run's tokenizer/)")
    if run.config.tokenizer_init:
        load_initial_tokenizer_weights(tokenizer, run.config.tokenizer.kind, run.config.tokenizer_init,
                                       allow_added_levels=not decoder_only)
    if run.config.is_audio:
        check_audio_tokenizer(tokenizer_config, dataset)
    expected_channels = getattr(tokenizer_config, "in_channels", dataset.channels)
    if expected_channels != dataset.channels:
        raise RunError(
            f"tokenizer.in_channels={expected_channels} but the data has {dataset.channels} channel(s); "
            f"set tokenizer.in_channels={dataset.channels} or data.channels={expected_channels}"
        )
    if getattr(tokenizer, "needs_training", True):
        training_dir = run.path("checkpoints", "tokenizer")
        prepare_training_dir(training_dir, stage_fingerprint, resume, force, run.state.is_main_process)
        run.state.wait_for_everyone()
        train_data = AudioTensorDataset(dataset.train) if run.config.is_audio else ImageTensorDataset(dataset.train)
        result = train(tokenizer, train_data, run.config.tokenizer_training, training_dir,
                       resume=resume, description="tokenizer")
    else:  # the identity (pixels) tokenizer has nothing to learn
        result = TrainResult(steps=0, final_metrics={}, history=[], checkpoint_dir=None)
    if run.state.is_main_process:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tokenizer.save_pretrained(out_dir)
        mark_stage_done(out_dir, stage_fingerprint, **training_record(result, run.config.tokenizer_training))
    run.state.wait_for_everyone()
    return out_dir


def export_tokens_stage(run: Run, force: bool = False) -> Path:
    out_dir = run.path("tokens")
    tokenizer_dir = run.path("tokenizer")
    stage_fingerprint = fingerprint(run.tokens_fingerprint(), sha256_file(tokenizer_dir / "model.safetensors"))
    if not force and stage_is_current(out_dir, stage_fingerprint):
        logger.info("tokens: reusing %s", out_dir)
        return out_dir
    if run.state.is_main_process:
        tokenizer = load_tokenizer(tokenizer_dir).to(run.state.device)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        if run.config.is_audio:
            audio = run.config.audio
            export_audio_tokens(tokenizer, tokenizer_dir, run.dataset, out_dir, layout=audio.layout,
                                device=run.state.device, train_shifted_copies=audio.train_shifted_copies,
                                max_shift_samples=max(1, round(audio.max_shift_seconds * run.dataset.sample_rate)),
                                seed=run.config.seed)
        else:
            export_tokens(tokenizer, tokenizer_dir, run.dataset, out_dir, device=run.state.device)
        mark_stage_done(out_dir, stage_fingerprint)
    run.state.wait_for_everyone()
    return out_dir


def validation_selection(prior, tokenset, training) -> BestValidationWeights | None:
    """Early stopping (keep the best validation weights) when `eval_every > 0`, the prior has a
    training loss that scores data (not a GAN) and the token set has a validation split."""
    has_val = has_validation_split(tokenset)
    if training.eval_every <= 0 or not has_val or not getattr(prior, "has_density", True):
        if training.eval_every > 0:
            logger.info("prior: eval_every is set but %s; no early stopping",
                        "there is no validation split" if not has_val else "the prior has no density")
        return None
    return BestValidationWeights(tokenset.torch_dataset("val"), training.batch_size)


def has_validation_split(tokenset) -> bool:
    return "val" in tokenset.splits and len(tokenset.splits["val"]) > 0


def check_can_choose_per_position(prior, tokenset) -> None:
    """A prior trained with several settings per position (an FVSBN with a list of L1 strengths)
    keeps, for each position, the one that scores the validation split best: refuse before training
    when there is no such split."""
    if getattr(prior, "chooses_on_validation", False) and not has_validation_split(tokenset):
        raise ValueError(f"this {prior.kind} prior chooses a setting per position on the validation split, "
                         "but the token set has none: give the data a validation split, or give one value")


def train_prior_stage(run: Run, resume: bool = False, force: bool = False) -> Path:
    out_dir = run.path("prior")
    stage_fingerprint = fingerprint(run.prior_fingerprint(), read_stage(run.path("tokens")))
    if not force and stage_is_current(out_dir, stage_fingerprint, resume):
        logger.info("prior: reusing %s", out_dir)
        return out_dir
    tokenset = load_tokenset(run.path("tokens"), tokenizer_dir=run.path("tokenizer"))
    manifest = tokenset.manifest
    prior_config = run.config.prior_config(manifest.vocab_size, manifest.sequence_length, manifest.num_classes)
    _, prior_cls = PRIORS[run.config.prior.kind]
    set_seed(run.config.prior_training.seed)  # as for the tokenizer: reproducible initial weights
    prior = prior_cls(prior_config)
    check_can_choose_per_position(prior, tokenset)
    train_tokens = tokenset.torch_dataset("train")  # audio items carry the loss mask of their padding
    if getattr(prior, "fit_by_counting", False):  # histograms are fit by counting, not by gradient steps
        result = fit_by_counting(prior, train_tokens, run.config.prior_training.batch_size)
    else:
        training_dir = run.path("checkpoints", "prior")
        prepare_training_dir(training_dir, stage_fingerprint, resume, force, run.state.is_main_process)
        run.state.wait_for_everyone()
        selection = validation_selection(prior, tokenset, run.config.prior_training)
        result = train(prior, train_tokens, run.config.prior_training, training_dir, resume=resume,
                       eval_fn=selection, description="prior")
        if selection is not None:
            result.final_metrics.update(selection.restore(prior, result.steps))
        if getattr(prior, "chooses_on_validation", False):
            result.final_metrics.update(
                prior.choose_on_validation(tokenset.torch_dataset("val"), run.config.prior_training.batch_size))
    if run.state.is_main_process:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        prior.save_pretrained(out_dir)
        (out_dir / "token_manifest.json").write_text(json.dumps(manifest.to_json(), indent=2))
        mark_stage_done(out_dir, stage_fingerprint, **training_record(result, run.config.prior_training))
    run.state.wait_for_everyone()
    return out_dir


def fit_by_counting(prior, dataset, batch_size: int) -> TrainResult:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for batch in loader:
        prior.fit(batch["input_ids"], batch.get("label"))
    return TrainResult(steps=0, final_metrics={}, history=[], checkpoint_dir=None)


def check_prior_matches_tokens(prior, prior_dir: Path, manifest) -> None:
    """Refuse a prior (loaded from `prior_dir`) not trained on tokens of the manifest's tokenizer, or of other sizes."""
    recorded = json.loads((prior_dir / "token_manifest.json").read_text()).get("tokenizer_sha256")
    if recorded != manifest.tokenizer_sha256:
        raise ValueError(f"prior in {prior_dir} was trained on tokens of tokenizer sha256 {recorded}, "
                         f"but the token set's tokenizer has {manifest.tokenizer_sha256}")
    expected = (manifest.vocab_size, manifest.sequence_length, manifest.num_classes)
    got = (prior.config.vocab_size, prior.config.seq_len, prior.config.num_classes)
    if expected != got:
        raise ValueError(f"prior (vocab, length, classes)={got} does not match the token manifest {expected}")


def load_matched_pair(run_dir: Path, device):
    """Load a run's tokenizer and prior, refusing a pair that were not made for each other."""
    tokenizer_dir, prior_dir = run_dir / "tokenizer", run_dir / "prior"
    tokenset = load_tokenset(run_dir / "tokens", tokenizer_dir=tokenizer_dir)
    prior = load_prior(prior_dir)
    check_prior_matches_tokens(prior, prior_dir, tokenset.manifest)
    tokenizer = load_tokenizer(tokenizer_dir).to(device).eval()
    return tokenizer, prior.to(device).eval(), tokenset


def decode_tokens(tokenizer, tokens: torch.Tensor, manifest, batch_size: int = 256) -> torch.Tensor:
    """Flat (n L) tokens in the manifest's order -> images (n c h w) in [-1, 1], on the CPU."""
    height, width = manifest.token_grid
    codebooks = manifest.num_codebooks
    device = module_device(tokenizer)
    images = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start : start + batch_size]
            grid = (chunk.reshape(-1, height, width, codebooks) if codebooks > 1
                    else chunk.reshape(-1, height, width))  # codebook index fastest, as exported
            images.append(tokenizer.decode(grid.to(device)).float().cpu())
    return torch.cat(images)
