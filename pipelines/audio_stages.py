"""The audio ends of a run: decode sampled token sequences to clips, write WAVs and spectrograms, evaluate.

Training the tokenizer and the prior and exporting tokens are shared with images (`stages`); this
module is what differs after that. Sampled sequences are in the token set's layout
(`pipelines.layouts`), which is undone before the tokenizer decodes them to the full clip length.
The prior models only the frames of real audio (its loss skips the padding of short clips), so
the generative model of a clip is a length drawn from the train clips of the same class times the
prior's tokens, and a sample is silenced after its drawn length, as real clips are zero after
theirs. Prefix continuation gives the prior the first `audio.prefix_seconds` of real test clips
and lets it continue them (cf. the continuation experiments of AudioLM, Borsos et al. 2023).
Outputs: `samples/wav/<class>/*.wav` and `samples/completions/*.wav` (soundfile), `spectrograms.png`
(generated clips of every class beside real ones) and `completions.png`, `eval_samples.safetensors`,
and `metrics.json` (see `pipelines.audio_eval`).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import soundfile
import torch
from einops import rearrange
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file

from pipelines import audio_eval, layouts
from pipelines.audio_data import lengths_to_mask
from pipelines.compression import compress_split
from pipelines.generation import class_labels, sample_labelled, sampling_options
from pipelines.stages import Run, RunError, load_matched_pair, module_device, write_run_metrics
from priors import SamplingOptions
from priors.entropy_coding import can_entropy_code

logger = logging.getLogger(__name__)


# --- tokens -> clips --------------------------------------------------------------------------------


def decode_audio_tokens(tokenizer, sequences: torch.Tensor, manifest, batch_size: int = 64) -> torch.Tensor:
    """(n L) sequences in the manifest's layout -> (n c t) clips at the full clip length, on the CPU.

    A pad id sampled where a code belongs (possible, if unlikely, in a delayed layout) decodes as code 0.
    """
    frames, num_codebooks, length = manifest.token_grid[0], manifest.num_codebooks, manifest.image_shape[-1]
    misplaced = layouts.count_misplaced(sequences, manifest.order, frames, num_codebooks, manifest.codebook_size)
    if misplaced:
        logger.warning("%d sampled pad token(s) sit where codes belong; decoded as code 0", misplaced)
    device = module_device(tokenizer)
    clips = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            codes = layouts.undo_layout(sequences[start : start + batch_size], manifest.order, frames,
                                        num_codebooks, manifest.codebook_size, fill=0)
            codes = codes if num_codebooks > 1 else rearrange(codes, "n frames 1 -> n frames")
            clips.append(tokenizer.decode(codes.to(device), length=length).float().cpu())
    return torch.cat(clips) if clips else torch.zeros(0, *manifest.image_shape)


def draw_lengths(labels: torch.Tensor | None, count: int, train_lengths: torch.Tensor,
                 train_labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """(n,) clip lengths in samples, each that of a random train clip of the same class (any clip if unlabelled)."""
    if labels is None or train_labels is None:
        return train_lengths[torch.randint(len(train_lengths), (count,), generator=generator)]
    lengths = torch.empty(len(labels), dtype=torch.int64)
    for index, label in enumerate(labels.tolist()):
        pool = train_lengths[train_labels == label]
        lengths[index] = pool[torch.randint(len(pool), (1,), generator=generator)]
    return lengths


def silence_after(clips: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return clips * rearrange(lengths_to_mask(lengths, clips.shape[-1]), "n t -> n 1 t").to(clips.dtype)


def spread_out(clips: torch.Tensor, count: int) -> torch.Tensor:
    """`count` clips evenly spaced through `clips` (all of them if fewer): FSDD lists a speaker's takes of
    a digit together, so the first few would show one voice."""
    if len(clips) <= count:
        return clips
    return clips[torch.linspace(0, len(clips) - 1, count).round().long()]


def write_wavs(clips: torch.Tensor, names: list[str], folder: Path, sample_rate: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for clip, name in zip(clips, names):
        soundfile.write(str(folder / f"{name}.wav"), rearrange(clip.numpy(), "c t -> t c"), sample_rate)


def plot_spectrograms(rows: list[tuple[str, torch.Tensor]], path: Path, sample_rate: int,
                      config: audio_eval.SpokenDigitClassifierConfig) -> Path:
    """One row of log-mel spectrograms per (title, (k c t) clips) entry, written as a PNG."""
    columns = max(len(clips) for _, clips in rows)
    figure = Figure(figsize=(1.6 * columns + 1, 1.3 * len(rows) + 0.5))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (title, clips) in enumerate(rows):
        features = audio_eval.log_mel_features(clips, config, sample_rate) if len(clips) else []
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(features):
                axis.imshow(features[column, 0].numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-2, vmax=2)
        axes[row][0].set_ylabel(title, fontsize=7)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=80)
    return path


# --- sample stage ---------------------------------------------------------------------------------


def generate_audio_samples(run: Run, out_dir: Path, device) -> dict:
    """The sample stage of an audio run (`generation.sample_stage`): WAVs per class, spectrograms,
    completions, evaluation samples; returns what stage.json records."""
    config, audio = run.config.sampling, run.config.audio
    tokenizer, prior, tokenset = load_matched_pair(run.directory, device)
    manifest = tokenset.manifest
    train, test = tokenset.tensors("train"), tokenset.tensors("test")
    options = sampling_options(config)
    guided = manifest.num_classes and getattr(prior, "supports_guidance", True)
    if not guided:
        options = SamplingOptions(temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    length_generator = torch.Generator().manual_seed(config.seed)
    names = manifest.class_names or ["unconditional"]

    def generate(per_class: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        labels = class_labels(manifest.num_classes, per_class, device) if manifest.num_classes else None
        tokens = (sample_labelled(prior, labels, options, generator, config.batch_size) if labels is not None
                  else prior.sample(per_class * 10, options=options, generator=generator).cpu())
        labels = labels.cpu() if labels is not None else None
        lengths = draw_lengths(labels, len(tokens), train["num_samples"], train.get("label"), length_generator)
        return tokens, labels, lengths, silence_after(decode_audio_tokens(tokenizer, tokens, manifest), lengths)

    # Listening samples: WAVs per class and spectrograms beside real test clips of the same class.
    _, grid_labels, _, grid_clips = generate(config.grid_samples_per_class)
    per_class = config.grid_samples_per_class if grid_labels is not None else len(grid_clips)
    for index, name in enumerate(names):
        chunk = grid_clips[index * per_class : (index + 1) * per_class]
        write_wavs(chunk, [f"{name}_{i}" for i in range(len(chunk))], out_dir / "wav" / name, manifest.sample_rate)
    real_clips = silence_after(_test_waveforms(run), test["num_samples"])
    rows = []
    for index, name in enumerate(names):
        real = real_clips[test["label"] == index] if grid_labels is not None else real_clips
        rows.append((f"{name} real", spread_out(real, audio.spectrogram_clips)))
        rows.append((f"{name} generated", grid_clips[index * per_class : (index + 1) * per_class][: audio.spectrogram_clips]))
    plot_spectrograms(rows, out_dir / "spectrograms.png", manifest.sample_rate, audio.classifier)

    # Evaluation samples: tokens, labels and drawn lengths kept for `tokgen eval`.
    started = time.perf_counter()
    eval_tokens, eval_labels, eval_lengths, _ = generate(config.eval_samples_per_class)
    sampling_seconds = time.perf_counter() - started
    tensors = {"input_ids": eval_tokens.contiguous(), "num_samples": eval_lengths.contiguous()}
    if eval_labels is not None:
        tensors["label"] = eval_labels.contiguous()
    save_file(tensors, str(out_dir / "eval_samples.safetensors"))

    completions = None
    if audio.completions and getattr(prior, "supports_prefix", True):
        completions = complete_test_prefixes(tokenizer, prior, tokenset, test, audio, options, generator, out_dir,
                                             device, real_clips)
    clip_seconds = manifest.image_shape[-1] / manifest.sample_rate
    record = {
        "wav_folder": str(out_dir / "wav"),
        "spectrograms": str(out_dir / "spectrograms.png"),
        "completions": str(completions) if completions else None,
        "eval_samples": len(eval_tokens),
        "sampling_seconds": sampling_seconds,
        "sampled_tokens_per_second": eval_tokens.numel() / max(sampling_seconds, 1e-9),
        "generated_audio_seconds_per_second": len(eval_tokens) * clip_seconds / max(sampling_seconds, 1e-9),
        "options": json.loads(json.dumps(options.__dict__)),
    }
    logger.info("samples: %d clips at %.0f tokens/s", len(eval_tokens), record["sampled_tokens_per_second"])
    return record


def _test_waveforms(run: Run) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(run.dataset.test.waveforms, dtype=np.float32))


def complete_test_prefixes(tokenizer, prior, tokenset, test: dict, audio, options, generator, out_dir: Path, device,
                           real_clips: torch.Tensor) -> Path:
    """Give the prior the first `audio.prefix_seconds` of real test clips' tokens; it continues each clip."""
    manifest = tokenset.manifest
    frames_per_second = manifest.sample_rate / manifest.hop_length
    prefix_frames = min(round(audio.prefix_seconds * frames_per_second), manifest.token_grid[0])
    prefix_length = layouts.prefix_length(manifest.order, prefix_frames, manifest.num_codebooks)
    take = min(audio.completions, len(test["input_ids"]))
    # Evenly spaced test clips: test splits are often sorted by class, and the first few would be one digit.
    chosen = torch.linspace(0, len(test["input_ids"]) - 1, take).round().long()
    labels = test["label"][chosen].to(device) if manifest.num_classes else None
    prefix = test["input_ids"][chosen, :prefix_length].to(device)
    continued = sample_labelled(prior, labels, options, generator, batch_size=take, prefix=prefix)
    clips = silence_after(decode_audio_tokens(tokenizer, continued, manifest), test["num_samples"][chosen])
    folder = out_dir / "completions"
    names = [f"{i}_{manifest.class_names[label]}" if manifest.num_classes else str(i)
             for i, label in enumerate(test["label"][chosen].tolist() if manifest.num_classes else range(take))]
    write_wavs(real_clips[chosen], [f"{name}_real" for name in names], folder, manifest.sample_rate)
    write_wavs(clips, [f"{name}_continued" for name in names], folder, manifest.sample_rate)
    rows = [(f"real, {audio.prefix_seconds:g} s given", real_clips[chosen]), ("continued", clips)]
    return plot_spectrograms(rows, out_dir / "completions.png", manifest.sample_rate, audio.classifier)


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def prior_metrics(prior, test: dict, num_classes: int, batch_size: int) -> dict:
    """Test NLL of the token sequences over their real positions: nats per clip, bits per scored token."""
    device = module_device(prior)
    takes_mask = "mask" in inspect.signature(prior.log_prob).parameters
    log_probs = []
    for start in range(0, len(test["input_ids"]), batch_size):
        chunk = slice(start, start + batch_size)
        labels = test["label"][chunk].to(device) if num_classes else None
        extra = {"mask": test["loss_mask"][chunk].to(device)} if takes_mask else {}
        log_probs.append(prior.log_prob(test["input_ids"][chunk].to(device), labels, **extra).double().cpu())
    log_probs = torch.cat(log_probs)
    scored = float(test["loss_mask"].sum()) if takes_mask else float(test["input_ids"].numel())
    return {
        "nll_nats_per_item": -log_probs.mean().item(),
        "bits_per_token": -log_probs.sum().item() / (scored * np.log(2.0)),
        "scored_tokens_per_item": scored / len(log_probs),
        "padding_masked": takes_mask,
        "nll_space": "tokens of real frames ("
                     + ("estimate of a bound" if getattr(prior, "log_prob_is_bound", False) else "exact")
                     + "); not an audio likelihood",
    }


def entropy_coded_rate(run_dir: Path, batch_size: int) -> dict:
    """The bits per second the test clips' tokens take once arithmetic-coded under the prior (unconditioned,
    on the CPU; `tokgen compress`), the round trip checked: what the codec sends, beside `bitrate_bps`."""
    path, report = compress_split(run_dir, "test", run_dir / "compressed" / "test.tgac", batch_size=batch_size,
                                  progress=False)
    figures = report.as_dict()
    return {"entropy_coded_bits_per_second": figures["stream_bits_per_second"],
            "entropy_coded_framed_bits_per_second": figures["framed_bits_per_second"],
            "entropy_coded_bits_per_token": figures["stream_bits_per_token"], "entropy_coded_file": str(path)}


def evaluate_audio_run(run: Run) -> dict:
    """`tokgen eval` for an audio run: codec, prior and sample metrics into `metrics.json`."""
    if not run.state.is_main_process:
        run.state.wait_for_everyone()
        return {}
    started = time.perf_counter()
    config, device = run.config, run.state.device
    tokenizer, prior, tokenset = load_matched_pair(run.directory, device)
    manifest, dataset = tokenset.manifest, run.dataset
    test = tokenset.tensors("test")
    test_waveforms = _test_waveforms(run)
    metrics: dict = {"run": config.name, "modality": "audio", "layout": manifest.order,
                     "data_source": manifest.data_source}
    tokenizer_metrics, codes, reconstructions = audio_eval.reconstruction_metrics(
        tokenizer, test_waveforms, test["num_samples"], batch_size=min(config.evaluation.batch_size, 64))
    tokenizer_metrics.update(audio_eval.code_usage_metrics(codes, test["num_frames"], manifest.codebook_size))
    metrics["tokenizer"] = tokenizer_metrics
    if getattr(prior, "has_density", True):
        metrics["prior"] = prior_metrics(prior, test, manifest.num_classes, config.evaluation.batch_size)
    if can_entropy_code(prior):
        metrics["prior"].update(entropy_coded_rate(run.directory, config.evaluation.batch_size))
    samples_dir = run.path("samples")
    if not (samples_dir / "eval_samples.safetensors").is_file():
        raise RunError(f"{samples_dir / 'eval_samples.safetensors'} is missing: run `tokgen sample` first")
    stored = load_file(str(samples_dir / "eval_samples.safetensors"))
    samples = silence_after(decode_audio_tokens(tokenizer, stored["input_ids"], manifest), stored["num_samples"])
    if manifest.num_classes:
        classifier, info = audio_eval.dataset_audio_classifier(run.path("classifier"), dataset, config.audio.classifier,
                                                               device)
        generator = torch.Generator().manual_seed(config.seed)
        features = partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=manifest.sample_rate)
        test_features = features(test_waveforms)
        quality = audio_eval.classifier_metrics(classifier, features(samples), stored.get("label"), test_features,
                                                test["label"], generator)
        tokenizer_metrics.update(audio_eval.reconstruction_classifier_metrics(
            classifier, features(reconstructions), test_features, test["label"]))
        metrics["samples"] = {**quality, "num_samples": len(samples), "guidance_scale": config.sampling.guidance_scale,
                              **{f"classifier_{k}": v for k, v in info.items() if isinstance(v, (int, float))}}
    return write_run_metrics(run, metrics, ("sampled_tokens_per_second", "generated_audio_seconds_per_second"),
                             started)


# --- ad-hoc generation (`tokgen generate RUN_DIR --label 3` on an audio run) ----------------------


def generate_audio_clips(tokenizer, prior, tokenset, label: int | None, num: int, options: SamplingOptions,
                         seed: int, out_dir: Path, device) -> Path:
    """`num` clips of class `label` (None: unconditional) as WAVs in `out_dir`, plus their spectrograms.

    Lengths are drawn from train clips of the class, as in the sample stage. Returns the folder.
    """
    manifest = tokenset.manifest
    train = tokenset.tensors("train")
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.full((num,), label, device=device) if label is not None else None
    tokens = (sample_labelled(prior, labels, options, generator, batch_size=256) if labels is not None
              else prior.sample(num, options=options, generator=generator).cpu())
    labels = labels.cpu() if labels is not None else None
    lengths = draw_lengths(labels, num, train["num_samples"], train.get("label"), torch.Generator().manual_seed(seed))
    clips = silence_after(decode_audio_tokens(tokenizer, tokens, manifest), lengths)
    name = manifest.class_names[label] if label is not None else "unconditional"
    write_wavs(clips, [f"{name}_{i}" for i in range(num)], out_dir, manifest.sample_rate)
    plot_spectrograms([(f"{name} generated", clips)], out_dir / f"{name}_spectrograms.png", manifest.sample_rate,
                      audio_eval.SpokenDigitClassifierConfig())
    return out_dir
