"""Measuring audio runs: codec quality on the test split, and a spoken-digit classifier for samples.

Reconstruction is scored on real (unpadded) samples only: scale-invariant SNR (Le Roux et al.
2019, "SDR - half-baked or well done?"), the multi-resolution STFT distance (spectral convergence
+ log-magnitude L1, Yamamoto et al. 2020, "Parallel WaveGAN") and the log-mel L1 distance, with
the codec's bitrate beside them. Generated clips are judged the way images are
(`pipelines.evaluate.sample_quality`): tokgen trains a small CNN on log-mel spectrograms of the
train split (the usual front end of keyword spotting, e.g. Sainath & Parada 2015, "Convolutional
Neural Networks for Small-footprint Keyword Spotting"), caches it beside the run, and reports the
class accuracy of conditional samples and a Frechet distance in its feature space with the
real-vs-real floor. The spectrogram is treated as a one-channel image, so the image classifier's
network, training, cache and Frechet code are reused unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from einops import rearrange, reduce

from pipelines.audio_data import lengths_to_mask
from pipelines.classifier import (ClassifierConfig, accuracy_by_class, classifier_accuracy, classifier_logits,
                                 load_or_train_classifier, prediction_accuracy)
from pipelines.config_tables import build_dataclass
from pipelines.evaluate import codebook_metrics, reconstruction_frechet, sample_quality
from tokenizers_vq.audio_losses import low_pass, mel_filterbank, mel_loss, multi_resolution_stft_loss, si_snr

logger = logging.getLogger(__name__)

# log-mel magnitudes run from log(1e-5) (silence, padding) to about +5; this maps them near [-2, 2].
LOG_FLOOR = 1e-5
LOG_OFFSET, LOG_SCALE = 3.0, 4.0


def _default_network() -> ClassifierConfig:
    # Two conv stages on (mels x frames); random shifts of 2 bins in time and frequency.
    return ClassifierConfig(channels=(32, 64), feature_dim=128, epochs=12, batch_size=64, learning_rate=2e-3)


@dataclass(frozen=True)
class SpokenDigitClassifierConfig:
    """Log-mel front end + the CNN that measures generated clips (`[audio.classifier]`)."""

    fft_size: int = 512
    hop: int = 128
    num_mels: int = 40
    network: ClassifierConfig = field(default_factory=_default_network)
    # > 0: the train split also holds this many low-passed copies of every clip, each with its own cutoff
    # drawn uniformly from [band_limit_min_hz, Nyquist). Trained on clean clips only, the classifier
    # recognises 97.7% of FSDD's test clips but 10.7% with everything above 1 kHz muted; with 2 copies
    # 85.3%, real clips 98.3% (BENCHMARKS.md): a judge that hears the digit, not the high band.
    band_limited_copies: int = 0
    band_limit_min_hz: float = 1000.0

    def __post_init__(self):
        if min(self.fft_size, self.hop, self.num_mels) < 1:
            raise ValueError("audio.classifier fft_size, hop and num_mels must be positive")
        if self.band_limited_copies < 0 or self.band_limit_min_hz <= 0:
            raise ValueError(f"audio.classifier band_limited_copies must be >= 0 and band_limit_min_hz > 0, got "
                             f"{self.band_limited_copies} and {self.band_limit_min_hz}")

    def identity(self) -> dict:
        """This config as fingerprints see it: without the band-limit fields while no copies are made, so
        classifiers (and runs' samples) from before the option keep their fingerprints."""
        values = dataclasses.asdict(self)
        if not self.band_limited_copies:
            del values["band_limited_copies"], values["band_limit_min_hz"]
        return values

    @classmethod
    def from_dict(cls, data: dict) -> "SpokenDigitClassifierConfig":
        return build_dataclass(cls, data, "audio.classifier")


@torch.no_grad()
def log_mel_features(waveforms: torch.Tensor, config: SpokenDigitClassifierConfig, sample_rate: int,
                     batch_size: int = 256) -> torch.Tensor:
    """(n c t) clips (zero after their end) -> (n 1 mels frames) scaled log-mel spectrograms, float32 CPU."""
    filterbank = mel_filterbank(sample_rate, config.fft_size, config.num_mels)
    window = torch.hann_window(config.fft_size)
    features = []
    for start in range(0, len(waveforms), batch_size):
        mono = reduce(waveforms[start : start + batch_size].float().cpu(), "n c t -> n t", "mean")
        spectrum = torch.stft(mono, config.fft_size, hop_length=config.hop, window=window, center=True,
                              pad_mode="constant", return_complex=True).abs()
        mel = torch.einsum("nft,fm->nmt", spectrum, filterbank)
        scaled = (mel.clamp_min(LOG_FLOOR).log() + LOG_OFFSET) / LOG_SCALE
        features.append(rearrange(scaled, "n m t -> n 1 m t"))
    return torch.cat(features) if features else torch.zeros(0, 1, config.num_mels, 1)


def band_limited_features(waveforms: torch.Tensor, lengths: torch.Tensor, config: SpokenDigitClassifierConfig,
                          sample_rate: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """`log_mel_features` of `config.band_limited_copies` low-passed copies of every (n c t) clip, copy after
    copy, each clip at its own cutoff drawn uniformly from [band_limit_min_hz, sample_rate / 2); padding
    stays silent. Batched, so a large split is never held twice as waveforms."""
    generator = torch.Generator().manual_seed(seed)
    mask = lengths_to_mask(lengths, waveforms.shape[-1])
    low, high = config.band_limit_min_hz, sample_rate / 2
    features = []
    for _ in range(config.band_limited_copies):
        cutoffs = low + torch.rand(len(waveforms), generator=generator) * max(high - low, 0.0)
        for start in range(0, len(waveforms), batch_size):
            part = slice(start, start + batch_size)
            copies = low_pass(waveforms[part].float(), sample_rate, cutoffs[part], mask[part])
            features.append(log_mel_features(copies * rearrange(mask[part], "b t -> b 1 t"), config, sample_rate))
    return torch.cat(features)


def load_or_train_audio_classifier(cache_dir, train_waveforms: torch.Tensor, train_labels: torch.Tensor,
                                   config: SpokenDigitClassifierConfig, num_classes: int, sample_rate: int, *,
                                   train_lengths: torch.Tensor | None = None, fingerprint: dict | None = None,
                                   device="cpu"):
    """The run's spoken-digit classifier: reused from `cache_dir` when data and config match, else trained.
    `train_lengths` (real samples per clip) are needed for `config.band_limited_copies`."""
    features = log_mel_features(train_waveforms, config, sample_rate)
    if config.band_limited_copies:
        if train_lengths is None:
            raise ValueError("audio.classifier.band_limited_copies needs the train clips' lengths")
        features = torch.cat([features, band_limited_features(train_waveforms, train_lengths, config, sample_rate)])
        train_labels = torch.as_tensor(train_labels).repeat(config.band_limited_copies + 1)
    caller = {**(fingerprint or {}), "front_end": config.identity(), "sample_rate": sample_rate}
    return load_or_train_classifier(cache_dir, features, train_labels, config.network, num_classes,
                                    fingerprint=caller, device=device)


def dataset_audio_classifier(cache_dir, dataset, config: SpokenDigitClassifierConfig, device="cpu"):
    """`load_or_train_audio_classifier` on an `AudioDataset`'s train split, keyed by the data's source and
    size: `tokgen eval` and the benchmark scripts find each other's cached classifier."""
    return load_or_train_audio_classifier(
        cache_dir, torch.from_numpy(dataset.train.waveforms), torch.as_tensor(dataset.train.labels), config,
        dataset.num_classes, dataset.sample_rate, train_lengths=torch.as_tensor(dataset.train.lengths),
        fingerprint={"data": dataset.source, "train_size": len(dataset.train)}, device=device)


def classifier_metrics(classifier, sample_features: torch.Tensor, sample_labels: torch.Tensor | None,
                       test_features: torch.Tensor, test_labels: torch.Tensor,
                       generator: torch.Generator) -> dict[str, float]:
    """Accuracy on real test clips, and class accuracy + Frechet distance (with floor) of generated clips.

    Features are `log_mel_features` of the clips, computed once by the caller and shared with
    `reconstruction_classifier_metrics`."""
    quality = sample_quality(classifier, sample_features, sample_labels, test_features, generator=generator)
    return {**quality, "classifier_test_accuracy": classifier_accuracy(classifier, test_features, test_labels)}


def reconstruction_classifier_metrics(classifier, reconstruction_features: torch.Tensor,
                                      original_features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How much of what the classifier hears survives the codec: its accuracy on decoded test clips
    (the ceiling for the class accuracy of generated clips, which the tokenizer decodes too) and the
    Frechet distance of reconstructions to their originals in its feature space (`log_mel_features` of both)."""
    predictions = classifier_logits(classifier, reconstruction_features).argmax(dim=-1)
    return {"reconstruction_class_accuracy": prediction_accuracy(predictions, labels),
            "reconstruction_class_accuracy_by_class": accuracy_by_class(predictions, labels),
            "reconstruction_frechet": reconstruction_frechet(classifier, original_features, reconstruction_features)}


def mean_standard_error(values: torch.Tensor) -> float:
    """The standard error of the mean of `(n,)` values (nan for fewer than two)."""
    return (values.std() / len(values) ** 0.5).item() if len(values) > 1 else float("nan")


@torch.no_grad()
def per_clip_si_snr(reconstructions: torch.Tensor, waveforms: torch.Tensor, lengths: torch.Tensor,
                    batch_size: int = 64) -> torch.Tensor:
    """`(n,)` float64 SI-SNR (dB) of each of `(n c t)` reconstructions to its original, real samples only,
    averaged over channels."""
    snrs = []
    for start in range(0, len(waveforms), batch_size):
        clips = waveforms[start : start + batch_size]
        mask = lengths_to_mask(lengths[start : start + batch_size], clips.shape[-1]).to(clips.device)
        snr = si_snr(reconstructions[start : start + batch_size], clips, mask)
        snrs.append(reduce(snr, "b c -> b", "mean").cpu())
    return torch.cat(snrs).double()


def paired_si_snr_gain(snr: torch.Tensor, baseline_snr: torch.Tensor) -> dict[str, float]:
    """How much a codec's per-clip SI-SNR beats a baseline's on the same clips: the mean gain (dB), its
    standard error, and the share of clips it improves. Two codecs' gains of a few hundredths of a dB
    hide in the spread between clips (each mean's own standard error, about 0.15 dB on FSDD's 300 test
    clips); the paired difference removes that spread, so such a gain can be told from noise."""
    if snr.shape != baseline_snr.shape or snr.ndim != 1:
        raise ValueError("paired SI-SNR needs the same clips: "
                         f"shapes {tuple(snr.shape)} and {tuple(baseline_snr.shape)}")
    gain = snr - baseline_snr
    return {"si_snr_gain_db": gain.mean().item(),
            "si_snr_gain_db_stderr": mean_standard_error(gain),
            "si_snr_gain_clips_improved": (gain > 0).double().mean().item()}


@torch.no_grad()
def waveform_metrics(reconstructions: torch.Tensor, waveforms: torch.Tensor, lengths: torch.Tensor,
                     sample_rate: int, batch_size: int = 64, stft_fft_sizes: tuple[int, ...] = (128, 256, 512),
                     mel_fft_size: int = 512, mel_hop: int = 128, num_mels: int = 40) -> dict[str, float]:
    """SI-SNR (dB), STFT and mel distances of (n c t) reconstructions to their originals, real samples only.

    Any codec's output can be scored so (`reconstruction_metrics` for tokgen's, the Codec2 reference
    for another). SI-SNR is averaged per clip (its median too, since a few near-silent clips can have
    very low values, and the mean's standard error, to tell a gap between codecs from the luck of the clips
    drawn); the distances are batch means of the masked losses the tokenizer trains with (fixed sizes
    here, so runs compare).
    """
    filterbank = mel_filterbank(sample_rate, mel_fft_size, num_mels).to(waveforms.device)
    snr = per_clip_si_snr(reconstructions, waveforms, lengths, batch_size)
    stft_distances, mel_distances, weights = [], [], []
    for start in range(0, len(waveforms), batch_size):
        clips, reconstruction = waveforms[start : start + batch_size], reconstructions[start : start + batch_size]
        mask = lengths_to_mask(lengths[start : start + batch_size], clips.shape[-1]).to(clips.device)
        stft_distances.append(float(multi_resolution_stft_loss(reconstruction, clips, stft_fft_sizes, mask)))
        mel_distances.append(float(mel_loss(reconstruction, clips, filterbank, mel_fft_size, mel_hop, mask)))
        weights.append(len(clips))
    total = sum(weights)
    return {
        "si_snr_db": snr.mean().item(),
        "si_snr_db_median": snr.median().item(),
        "si_snr_db_stderr": mean_standard_error(snr),
        "stft_distance": sum(d * w for d, w in zip(stft_distances, weights)) / total,
        "mel_distance": sum(d * w for d, w in zip(mel_distances, weights)) / total,
        "num_clips": float(total),
    }


@torch.no_grad()
def reconstruction_metrics(tokenizer, waveforms: torch.Tensor, lengths: torch.Tensor, batch_size: int = 64,
                           **distance_sizes) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Encode and decode (n c t) clips; `waveform_metrics` of the result, with the codec's bitrate.

    Returns the metrics, the (n frames [q]) codes and the (n c t) reconstructions, silenced after
    each clip's length as the originals are. `distance_sizes` go to `waveform_metrics`.
    """
    sample_rate = int(tokenizer.config.sample_rate)
    codes, reconstructions = reconstruct(tokenizer, waveforms, lengths, batch_size)
    metrics = waveform_metrics(reconstructions, waveforms.float().cpu(), lengths.cpu(), sample_rate, batch_size,
                               **distance_sizes)
    num_codebooks = int(getattr(tokenizer, "num_codebooks", 1))
    frames_per_second = sample_rate / tokenizer.hop_length
    metrics.update(frames_per_second=frames_per_second,
                   bitrate_bps=frames_per_second * num_codebooks * math.log2(tokenizer.vocab_size))
    return metrics, codes, reconstructions


@torch.no_grad()
def reconstruct(tokenizer, waveforms: torch.Tensor, lengths: torch.Tensor,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode (n c t) clips -> the (n frames [q]) codes and the (n c t) reconstructions on the
    CPU, silenced after each clip's length as the originals are."""
    device = next(tokenizer.parameters()).device
    codes, reconstructions = [], []
    for start in range(0, len(waveforms), batch_size):
        clips = waveforms[start : start + batch_size].to(device)
        mask = lengths_to_mask(lengths[start : start + batch_size], clips.shape[-1]).to(device)
        tokens = tokenizer.encode(clips)
        reconstruction = tokenizer.decode(tokens, length=clips.shape[-1]).float()
        codes.append(tokens.cpu())
        reconstructions.append((reconstruction * rearrange(mask, "b t -> b 1 t")).cpu())
    return torch.cat(codes), torch.cat(reconstructions)


def code_usage_metrics(codes: torch.Tensor, num_frames: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage and perplexity of the codes of real frames, per codebook level (level 0 unprefixed)."""
    grid = codes if codes.ndim == 3 else rearrange(codes, "n frames -> n frames 1")
    real = lengths_to_mask(num_frames, grid.shape[1])
    metrics = {}
    for level in range(grid.shape[-1]):
        prefix = "test_" if level == 0 else f"test_level{level}_"
        metrics.update({prefix + key: value for key, value in
                        codebook_metrics(grid[..., level][real], codebook_size).items()})
    return metrics
