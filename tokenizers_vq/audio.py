"""Audio VQ-VAE tokenizer: strided 1-D conv encoder, (residual) vector quantizer, mirrored decoder (optionally wider).

Implements the codec of Zeghidour et al. 2021 ("SoundStream: An End-to-End Neural Audio Codec")
in EnCodec's training recipe (Defossez et al. 2022, "High Fidelity Neural Audio Compression"): a
waveform `(b c t)` in [-1, 1] becomes `t / hop` latent frames, each quantised by any `QUANTIZERS`
kind (by default a residual VQ of 2 levels x 256 codes: 16 bits per frame, 1.6 kbps at 100
frames/s for 8 kHz audio), and is decoded back. The loss is a weighted sum of the waveform L1,
an optional negative SI-SNR, the multi-resolution STFT loss and the log-mel L1 (`audio_losses`),
plus the quantizer's loss and, when `gan_weight > 0`, an adversarial term and feature matching
against an audio discriminator trained in its own phase; training batches can be augmented
(`audio_augment`, off by default). Batches carry a sample mask: padding is zeroed before the encoder and
left out of every loss, and only frames that hold real audio train the quantizer. Clips longer
than a training window can be tokenized in hop-aligned chunks (`encode_chunked`,
`decode_chunked`). The folder format is that of the image tokenizers: `config.json`
(`{"kind": "audio_vqvae", "config": ...}`) + `model.safetensors`, loaded strictly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from einops import rearrange, reduce
from torch import Tensor, nn
from torch.func import functional_call

from tokenizers_vq.audio_augment import augment_waveforms, pack_clips
from tokenizers_vq.audio_losses import low_pass, mel_filterbank, mel_loss, masked_l1, multi_resolution_stft_loss, si_snr
from tokenizers_vq.checkpoint import PretrainedTokenizer
from tokenizers_vq.losses import GAN_LOSSES, discriminator_loss, generator_loss
from tokenizers_vq.nets.audio_discriminators import (
    AudioDiscriminatorConfig,
    build_audio_discriminator,
    feature_matching_loss,
)
from tokenizers_vq.nets.conv1d import ACTIVATIONS, Decoder1d, Encoder1d, check_dilations, check_strides, hop_length
from tokenizers_vq.quantizers import QUANTIZERS, QuantizerConfig, ResidualVQConfig, VQConfig, build_quantizer
from tokenizers_vq.quantizers.base import ADDED_LATER, config_from_dict

logger = logging.getLogger(__name__)



class ChunkSpan(NamedTuple):
    """One window of a chunked pass, in frames: encode [context_start, context_end), keep
    [keep_start, keep_end) of the window's own frames (relative to context_start)."""

    context_start: int
    context_end: int
    keep_start: int
    keep_end: int


def chunk_spans(total_frames: int, chunk_frames: int, overlap_frames: int) -> list[ChunkSpan]:
    """Consecutive chunks of `chunk_frames` covering [0, total_frames), each widened by
    `overlap_frames` on both sides (clipped to the clip), so that the kept parts tile the clip."""
    spans = []
    for start in range(0, total_frames, chunk_frames):
        end = min(start + chunk_frames, total_frames)
        context_start, context_end = max(start - overlap_frames, 0), min(end + overlap_frames, total_frames)
        spans.append(ChunkSpan(context_start, context_end, start - context_start, end - context_start))
    return spans


def batched_spans(spans: list[ChunkSpan], windows_per_batch: int):
    """Indices of `spans` in groups of equal window length and kept part (edge windows differ), at most
    `windows_per_batch` a group: the windows of a group run as one batch, not one call each."""
    if windows_per_batch < 1:
        raise ValueError(f"windows_per_batch must be at least 1, got {windows_per_batch}")
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    for index, span in enumerate(spans):
        shape = (span.context_end - span.context_start, span.keep_start, span.keep_end)
        by_shape.setdefault(shape, []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), windows_per_batch):
            yield indices[start : start + windows_per_batch]


def default_quantizer() -> ResidualVQConfig:
    return ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=256))


@dataclass(frozen=True)
class AudioVQVAEConfig:
    """Sizes, losses and the optional GAN of the audio tokenizer; defaults fit 8 kHz FSDD (hop 80)."""

    kind: ClassVar[str] = "audio_vqvae"

    channels: int = 1
    sample_rate: int = 8000  # used by the mel loss and to turn seconds into samples
    hidden_channels: int = 32  # doubled after every stride
    # > 0: the decoder's width at full rate, in place of hidden_channels (doubled towards the latent as
    # the encoder's is). DAC's decoder is wider than its encoder (Kumar et al. 2023: 64 channels in, 1536
    # at the decoder's latent end); for 24 against 16 on the FSDD CPU recipe see BENCHMARKS.md.
    decoder_hidden_channels: int = field(default=0, metadata=ADDED_LATER)
    strides: tuple[int, ...] = (4, 4, 5)  # hop = 80 samples -> 100 frames/s at 8 kHz
    # Dilations of residual units added at the latent frame rate, at the encoder's end and the decoder's
    # start (nets/conv1d.py): context across frames, which EnCodec gets from an LSTM and low-rate codecs
    # lean on. Each unit keeps the receptive field finite (6 x dilation frames wider), so chunking still
    # holds. (1, 3, 9) at 200 frames/s widens it by 78 frames (0.39 s); see BENCHMARKS.md.
    encoder_latent_dilations: tuple[int, ...] = field(default=(), metadata=ADDED_LATER)
    decoder_latent_dilations: tuple[int, ...] = field(default=(), metadata=ADDED_LATER)
    embedding_dim: int = 64
    weight_norm: bool = True
    activation: str = "elu"  # or "snake" (DAC's periodic activation; nets/conv1d.py)
    quantizer: QuantizerConfig = field(default_factory=default_quantizer)  # any QUANTIZERS kind
    # Loss weights: EnCodec's lambda_t = 0.1 (waveform) and lambda_f = 1 (spectral).
    waveform_weight: float = 0.1
    # Negative SI-SNR (dB, per clip): the reconstruction metric itself as a loss, off at 0. Unlike the
    # L1 it weighs every clip alike whatever its level, and unlike the spectral losses it needs the phase.
    si_snr_weight: float = 0.0
    # > 0: the SI-SNR term judges only the band below this frequency (Hz). Above it a codec that cannot
    # match the phase scores best by going quiet, which the classifier hears (si_snr_band_oracles.py).
    si_snr_cutoff_hz: float = 0.0
    # Optimizer step from which the SI-SNR term trains (logged before it). From a random start the
    # reconstruction is nearly orthogonal to the clip and the term's gradient points nowhere useful
    # (BENCHMARKS.md, "-SI-SNR as a training loss does not help"); after a plain start it helps.
    si_snr_start: int = field(default=0, metadata=ADDED_LATER)
    # > 0: from si_snr_start the term's weight rises linearly to si_snr_weight over this many steps.
    # Switched on at once, the term blew the latents up 6.5-fold within 200 steps and cost 16 points of
    # recognised reconstructions before it bought 0.1 dB; a 400-step ramp changed neither (BENCHMARKS.md).
    si_snr_ramp_steps: int = field(default=0, metadata=ADDED_LATER)
    # > 0: the codec is asked for the input's band below this frequency only, and spends its bits there.
    # The waveform and SI-SNR terms (and a GAN's real clips) take the input low-passed here, so above it
    # they ask for quiet (the best a codec can do for SI-SNR where it cannot match the phase); the STFT
    # and mel terms judge only the bins and mel bands below it, where their log scale has something to
    # match. The encoder still hears the whole band. For a judge that hears band-limited speech as speech.
    target_cutoff_hz: float = field(default=0.0, metadata=ADDED_LATER)
    stft_weight: float = 1.0
    stft_fft_sizes: tuple[int, ...] = (64, 128, 256, 512)  # window n, hop n / 4
    mel_weight: float = 1.0
    mel_fft_size: int = 1024
    mel_hop: int = 256
    num_mels: int = 64
    # Adversarial training, off while gan_weight = 0 (EnCodec uses gan_weight 3, feature_matching_weight 3).
    gan_weight: float = 0.0
    feature_matching_weight: float = 0.0
    gan_loss: str = "hinge"
    discriminator: AudioDiscriminatorConfig = field(default_factory=AudioDiscriminatorConfig)
    discriminator_start: int = 0  # optimizer step from which the GAN terms train
    # Training-time augmentation (`audio_augment`), all off by default: each clip's sign flipped at
    # random, a random delay of up to this many samples, one random speed per batch within +-this.
    augment_polarity: bool = False
    augment_max_delay: int = 0
    augment_max_speed_change: float = 0.0
    # Lay each training batch's clips end to end in as few windows as hold their real samples
    # (`audio_augment.pack_clips`): the same audio in fewer, fuller windows, so a step costs less where
    # clips are shorter than the window. Raise tokenizer_training.batch_size to fill the step again.
    pack_clips: bool = field(default=False, metadata=ADDED_LATER)
    # Fine-tune the decoder alone: the encoder and codebooks stay as loaded (`tokenizer_init`), so every
    # clip keeps its tokens and a prior trained on them still fits; only how tokens sound changes.
    train_decoder_only: bool = False

    def __post_init__(self):
        for name in ("strides", "stft_fft_sizes", "encoder_latent_dilations", "decoder_latent_dilations"):
            if isinstance(getattr(self, name), list):  # tolerate JSON/TOML lists in direct construction
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_strides(self.strides)
        check_dilations(self.encoder_latent_dilations)
        check_dilations(self.decoder_latent_dilations)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if min(self.channels, self.sample_rate, self.hidden_channels, self.embedding_dim) < 1:
            raise ValueError("channels, sample_rate, hidden_channels and embedding_dim must be positive")
        for name in ("waveform_weight", "si_snr_weight", "si_snr_cutoff_hz", "target_cutoff_hz", "stft_weight",
                     "mel_weight", "gan_weight",
                     "feature_matching_weight", "discriminator_start", "si_snr_start", "si_snr_ramp_steps",
                     "augment_max_delay", "decoder_hidden_channels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.target_cutoff_hz >= self.sample_rate / 2:
            raise ValueError(f"target_cutoff_hz must lie below the Nyquist frequency ({self.sample_rate / 2:g} Hz), "
                             f"got {self.target_cutoff_hz}; 0 keeps the whole band")
        if not 0.0 <= self.augment_max_speed_change < 0.5:
            raise ValueError(f"augment_max_speed_change must lie in [0, 0.5), got {self.augment_max_speed_change}")
        if self.feature_matching_weight > 0 and self.gan_weight == 0:
            raise ValueError("feature_matching_weight > 0 needs the discriminator: set gan_weight > 0")
        if self.gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {self.gan_loss!r}")
        if self.stft_weight > 0 and not self.stft_fft_sizes:
            raise ValueError("stft_weight > 0 needs at least one size in stft_fft_sizes")
        configs = tuple(config_cls for config_cls, _ in QUANTIZERS.values())
        if not isinstance(self.quantizer, configs):
            raise ValueError(f"quantizer must be one of {[c.__name__ for c in configs]}, "
                             f"got {type(self.quantizer).__name__}")
        if not isinstance(self.discriminator, AudioDiscriminatorConfig):
            raise ValueError("discriminator must be an AudioDiscriminatorConfig, "
                             f"got {type(self.discriminator).__name__}")

    @property
    def hop_length(self) -> int:
        return hop_length(self.strides)

    @property
    def decoder_width(self) -> int:
        """The decoder's channels at full rate: decoder_hidden_channels, or hidden_channels when it is 0."""
        return self.decoder_hidden_channels or self.hidden_channels

    @classmethod
    def from_dict(cls, data: dict) -> "AudioVQVAEConfig":
        return config_from_dict(cls, data)


class AudioVQVAE(PretrainedTokenizer, nn.Module):
    """Audio tokenizer and `Trainable`. Tokens are `(b frames)`, or `(b frames q)` with q codebooks.

    Submodules: `encoder`, `quantizer`, `decoder`, and `discriminator` only when `gan_weight > 0`
    (so a tokenizer trained without a GAN has no discriminator tensors in its checkpoint).
    """

    config_class: ClassVar[type[AudioVQVAEConfig]] = AudioVQVAEConfig

    def __init__(self, config: AudioVQVAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        sizes = dict(strides=config.strides, weight_norm=config.weight_norm, activation=config.activation)
        self.encoder = Encoder1d(in_channels=config.channels, out_channels=config.embedding_dim,
                                 hidden_channels=config.hidden_channels,
                                 latent_dilations=config.encoder_latent_dilations, **sizes)
        self.quantizer = build_quantizer(config.quantizer, config.embedding_dim)
        self.decoder = Decoder1d(in_channels=config.embedding_dim, out_channels=config.channels,
                                 hidden_channels=config.decoder_width,
                                 latent_dilations=config.decoder_latent_dilations, **sizes)
        if config.train_decoder_only:  # no gradient reaches them: DDP must not wait for one
            self.encoder.requires_grad_(False)
            self.quantizer.requires_grad_(False)
        self.hop_length = config.hop_length
        self.use_gan = config.gan_weight > 0
        self.discriminator = build_audio_discriminator(config.discriminator, config.channels, generator) \
            if self.use_gan else None
        if config.mel_weight > 0:  # a constant of the config: not saved, rebuilt on load
            filterbank = mel_filterbank(config.sample_rate, config.mel_fft_size, config.num_mels,
                                        max_frequency=config.target_cutoff_hz or None)
            self.register_buffer("mel_filterbank", filterbank, persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def num_codebooks(self) -> int:
        """Indices per frame: 1 gives `(b frames)` tokens, q > 1 gives `(b frames q)`."""
        return self.quantizer.num_codebooks

    @property
    def receptive_field(self) -> int:
        """Input samples that one latent frame depends on."""
        return self.encoder.receptive_field

    @property
    def decoder_reach_frames(self) -> int:
        """Code frames on either side of its own that one decoded sample depends on."""
        return self.decoder.reach_frames

    def token_grid(self, input_shape: tuple[int, int]) -> tuple[int]:
        """(c, t) of one clip -> (frames,) = (ceil(t / hop),)."""
        channels, length = input_shape
        if channels != self.config.channels:
            raise ValueError(f"the tokenizer takes {self.config.channels}-channel audio, got {channels} channel(s)")
        return (math.ceil(length / self.hop_length),)

    # --- the three directions -------------------------------------------------------------------

    def _latents(self, x: Tensor) -> Tensor:
        """(b c t) -> (b frames d), the signal right-padded with zeros to a multiple of the hop."""
        if x.ndim != 3:
            raise ValueError(f"expected audio (b c t), got shape {tuple(x.shape)}")
        self.token_grid(tuple(x.shape[1:]))
        padding = -x.shape[-1] % self.hop_length
        x = torch.nn.functional.pad(x, (0, padding))
        return rearrange(self.encoder(x), "b d frames -> b frames d")

    def _decode_codes(self, codes: Tensor, keep: tuple[int, int] | None = None) -> Tensor:
        return self.decoder(rearrange(codes, "b frames d -> b d frames"), keep=keep)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(b c t) in [-1, 1] -> (b frames) int64, or (b frames q); frames = ceil(t / hop)."""
        return self.quantizer.to_indices(self._latents(x))

    @torch.no_grad()
    def decode(self, tokens: Tensor, length: int | None = None, keep: tuple[int, int] | None = None) -> Tensor:
        """(b frames) or (b frames q) int64 -> (b c frames * hop) in [-1, 1], cut to `length` if given.

        `keep` = (start, stop) frames: only the samples of those frames, as the whole decode has them
        there, for less work (`Decoder1d.forward`); `length` then cuts what is kept."""
        expected_ndim = 2 if self.num_codebooks == 1 else 3
        if tokens.ndim != expected_ndim or (expected_ndim == 3 and tokens.shape[-1] != self.num_codebooks):
            expected = "(b frames)" if expected_ndim == 2 else f"(b frames q) with q={self.num_codebooks}"
            raise ValueError(f"expected tokens {expected}, got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")
        audio = self._decode_codes(self.quantizer.lookup(tokens.long()), keep).clamp(-1.0, 1.0)
        return audio if length is None else audio[..., :length]

    def forward(self, x: Tensor, mask: Tensor | None = None):
        """(b c t), optional (b t) mask -> (reconstruction (b c t) unclamped, indices, aux_loss, metrics).

        Padding is zeroed first; only frames holding some unmasked sample go through the
        quantizer's training step (its statistics and loss); the others get their nearest codes
        without any update, exactly as `encode` would give them.
        """
        length = x.shape[-1]
        if mask is not None:
            x = x * rearrange(mask, "b t -> b 1 t").to(x.dtype)
        if self.config.train_decoder_only:
            return self._decode_frozen_codes(x, length)
        latents = self._latents(x)
        if mask is None:
            output = self.quantizer(latents)
            codes, indices, aux_loss, metrics = output.quantized, output.indices, output.aux_loss, output.metrics
        else:
            padded = torch.nn.functional.pad(mask, (0, latents.shape[1] * self.hop_length - length))
            frame_mask = reduce(padded, "b (frames hop) -> b frames", "max", hop=self.hop_length)
            output = self.quantizer(rearrange(latents[frame_mask], "n d -> 1 n d"))
            codes = latents.new_zeros(latents.shape)
            codes[frame_mask] = output.quantized[0]
            indices_shape = (*latents.shape[:2], *output.indices.shape[2:])
            indices = torch.zeros(indices_shape, dtype=torch.int64, device=x.device)
            indices[frame_mask] = output.indices[0]
            if not bool(frame_mask.all()):
                rest = rearrange(latents[~frame_mask], "n d -> 1 n d")
                rest_indices = self.quantizer.to_indices(rest)
                codes[~frame_mask] = self.quantizer.lookup(rest_indices)[0].to(codes.dtype)
                indices[~frame_mask] = rest_indices[0]
            aux_loss, metrics = output.aux_loss, output.metrics
        reconstruction = self._decode_codes(codes)[..., :length]
        return reconstruction, indices, aux_loss, metrics

    def _decode_frozen_codes(self, x: Tensor, length: int):
        """`forward` with the encoder and codebooks fixed: the codes `encode` gives (no codebook update,
        no gradient), decoded with gradient. No quantizer loss: there is nothing of it left to train."""
        indices = self.encode(x)
        with torch.no_grad():
            codes = self.quantizer.lookup(indices)
        reconstruction = self._decode_codes(codes)[..., :length]
        return reconstruction, indices, x.new_zeros((), dtype=torch.float32), {}

    # --- long clips -----------------------------------------------------------------------------

    def _hop_multiple(self, samples: int, round_up: bool) -> int:
        return (math.ceil if round_up else math.floor)(samples / self.hop_length) * self.hop_length

    @torch.no_grad()
    def encode_chunked(self, x: Tensor, chunk_samples: int | None = None, chunk_seconds: float | None = None,
                       overlap_samples: int | None = None, windows_per_batch: int = 64) -> Tensor:
        """`encode` in windows of `chunk_samples` (or seconds), each seen with `overlap_samples` of context.

        Chunk boundaries fall on hop multiples (the chunk is rounded down, the overlap up, to the
        hop), so chunk frames are whole-clip frames. A frame's latent depends on
        `receptive_field` samples around it; the default overlap (half the receptive field) gives
        every kept frame its full context, and the result equals `encode(x)` (up to float
        rounding at near-ties of the nearest code). With a smaller overlap, frames within
        receptive_field / 2 samples of a chunk edge see zeros where the whole clip has signal and
        may get different tokens; frames farther from the edges are unchanged. Up to
        `windows_per_batch` windows go through the encoder together (memory grows with it).
        """
        if (chunk_samples is None) == (chunk_seconds is None):
            raise ValueError("give exactly one of chunk_samples and chunk_seconds")
        if chunk_samples is None:
            chunk_samples = round(chunk_seconds * self.config.sample_rate)
        chunk_frames = self._hop_multiple(chunk_samples, round_up=False) // self.hop_length
        if chunk_frames < 1:
            raise ValueError(f"a chunk of {chunk_samples} samples is shorter than the hop {self.hop_length}")
        if overlap_samples is None:
            overlap_samples = self.receptive_field // 2
        overlap_frames = self._hop_multiple(overlap_samples, round_up=True) // self.hop_length
        total_frames = self.token_grid(tuple(x.shape[1:]))[0]
        x = torch.nn.functional.pad(x, (0, total_frames * self.hop_length - x.shape[-1]))
        spans = chunk_spans(total_frames, chunk_frames, overlap_frames)
        pieces, hop = [None] * len(spans), self.hop_length
        for indices in batched_spans(spans, windows_per_batch):
            windows = torch.cat([x[..., spans[i].context_start * hop : spans[i].context_end * hop] for i in indices])
            for i, codes in zip(indices, self.encode(windows).split(x.shape[0])):
                pieces[i] = codes[:, spans[i].keep_start : spans[i].keep_end]
        return torch.cat(pieces, dim=1)

    @torch.no_grad()
    def decode_chunked(self, tokens: Tensor, chunk_frames: int, overlap_frames: int | None = None,
                       length: int | None = None, windows_per_batch: int = 64) -> Tensor:
        """`decode` in windows of `chunk_frames` frames, each decoded with `overlap_frames` of context.

        The kept samples of each window are concatenated (no cross-fade). They equal those of the
        whole decode (up to float rounding) when the overlap covers the decoder's reach, the default
        (`decoder_reach_frames`). With less overlap, samples near chunk edges differ. Up to
        `windows_per_batch` windows are decoded together.
        """
        if overlap_frames is None:
            overlap_frames = self.decoder_reach_frames
        if chunk_frames < 1 or overlap_frames < 0:
            raise ValueError("chunk_frames must be positive and overlap_frames >= 0")
        spans = chunk_spans(tokens.shape[1], chunk_frames, overlap_frames)
        pieces = [None] * len(spans)
        for indices in batched_spans(spans, windows_per_batch):
            windows = torch.cat([tokens[:, spans[i].context_start : spans[i].context_end] for i in indices])
            kept = self.decode(windows, keep=(spans[indices[0]].keep_start, spans[indices[0]].keep_end))
            for i, audio in zip(indices, kept.split(tokens.shape[0])):
                pieces[i] = audio
        audio = torch.cat(pieces, dim=-1)
        return audio if length is None else audio[..., :length]

    # --- Trainable ------------------------------------------------------------------------------

    def _generator_parameters(self) -> list[nn.Parameter]:
        modules = (self.encoder, self.quantizer, self.decoder)  # train_decoder_only froze the first two
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        if not self.use_gan:
            return {"main": self._generator_parameters()}
        return {"generator": self._generator_parameters(),
                "discriminator": [p for p in self.discriminator.parameters() if p.requires_grad]}

    def phases(self, step: int) -> list[str]:
        if not self.use_gan:
            return ["main"]
        return ["generator"] if step < self.config.discriminator_start else ["generator", "discriminator"]

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        waveform = batch["waveform"]
        mask = batch.get("mask")
        if mask is None:
            mask = torch.ones(waveform.shape[0], waveform.shape[-1], dtype=torch.bool, device=waveform.device)
        mask = mask.bool()
        if self.training:  # both phases see the same kind of clips: the discriminator's reals are augmented too
            config = self.config
            waveform, mask = augment_waveforms(waveform, mask, config.augment_polarity, config.augment_max_delay,
                                               config.augment_max_speed_change)
            if config.pack_clips:
                waveform, mask = pack_clips(waveform, mask)
        valid_phases = ("generator", "discriminator") if self.use_gan else ("main",)
        if phase not in valid_phases:
            raise ValueError(f"AudioVQVAE phases are {valid_phases} (gan_weight={self.config.gan_weight}); "
                             f"got {phase!r}")
        target = waveform
        if self.config.target_cutoff_hz > 0:
            target = low_pass(waveform, self.config.sample_rate, self.config.target_cutoff_hz, mask).to(waveform.dtype)
        if phase == "discriminator":
            return self._discriminator_loss(waveform, target, mask)
        return self._reconstruction_loss(waveform, target, mask, step)

    def si_snr_weight_at(self, step: int) -> float:
        """The SI-SNR term's weight at an optimizer step: 0 before its start, then ramped, then si_snr_weight."""
        config = self.config
        if step < config.si_snr_start:
            return 0.0
        if config.si_snr_ramp_steps == 0:
            return config.si_snr_weight
        return config.si_snr_weight * min(1.0, (step - config.si_snr_start + 1) / config.si_snr_ramp_steps)

    def _spectral_losses(self, reconstruction: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        config = self.config
        zero = reconstruction.new_zeros((), dtype=torch.float32)
        losses = {"waveform_loss": masked_l1(reconstruction, target, mask), "si_snr_loss": zero, "stft_loss": zero,
                  "mel_loss": zero}
        if config.si_snr_weight > 0:
            judged = (reconstruction, target)
            if config.si_snr_cutoff_hz > 0:
                judged = tuple(low_pass(signal, config.sample_rate, config.si_snr_cutoff_hz, mask) for signal in judged)
            losses["si_snr_loss"] = -si_snr(*judged, mask).mean()
        if config.stft_weight > 0:
            losses["stft_loss"] = multi_resolution_stft_loss(reconstruction, target, config.stft_fft_sizes, mask,
                                                             config.sample_rate, config.target_cutoff_hz)
        if config.mel_weight > 0:
            losses["mel_loss"] = mel_loss(reconstruction, target, self.mel_filterbank, config.mel_fft_size,
                                          config.mel_hop, mask)
        return losses

    def _reconstruction_loss(self, waveform: Tensor, target: Tensor, mask: Tensor,
                             step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's losses: `waveform` is encoded, the output is compared with `target` (the same
        clips, or their low band under `target_cutoff_hz`)."""
        config = self.config
        reconstruction, _, aux_loss, quantizer_metrics = self(waveform, mask)
        losses = self._spectral_losses(reconstruction, target, mask)
        total = (config.waveform_weight * losses["waveform_loss"] + config.stft_weight * losses["stft_loss"]
                 + config.mel_weight * losses["mel_loss"] + aux_loss)
        si_snr_weight = self.si_snr_weight_at(step)
        if si_snr_weight > 0:  # before its start the term is only logged
            total = total + si_snr_weight * losses["si_snr_loss"]
        metrics = {name: value.detach() for name, value in losses.items()}
        if self.use_gan:
            # Before the start the GAN terms are absent, but logged as 0 so every step has the same keys.
            g_loss = fm_loss = total.new_zeros(())
            if step >= config.discriminator_start:
                sample_mask = rearrange(mask, "b t -> b 1 t").to(reconstruction.dtype)
                fake = self._frozen_discriminator(reconstruction * sample_mask)
                g_loss = torch.stack([generator_loss(output.logits, config.gan_loss) for output in fake]).mean()
                total = total + config.gan_weight * g_loss
                if config.feature_matching_weight > 0:
                    with torch.no_grad():
                        real = self.discriminator(target * sample_mask)
                    fm_loss = feature_matching_loss(real, fake)
                    total = total + config.feature_matching_weight * fm_loss
            metrics.update(g_loss=g_loss.detach(), feature_matching_loss=fm_loss.detach())
        metrics.update(quantizer_loss=aux_loss.detach(),
                       **{name: value.detach() for name, value in quantizer_metrics.items()})
        return total, metrics

    def _frozen_discriminator(self, audio: Tensor):
        """Discriminator outputs whose gradient reaches `audio` but not the discriminator's weights."""
        detached = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        detached.update(dict(self.discriminator.named_buffers()))
        return functional_call(self.discriminator, detached, (audio,))

    def _discriminator_loss(self, waveform: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reals are the `target` clips the generator is asked for, fakes its output for `waveform`."""
        with torch.no_grad():  # eval mode: no codebook update, the generator phase already made it
            was_training = self.training
            self.eval()
            try:
                fake = self(waveform, mask)[0]
            finally:
                self.train(was_training)
        sample_mask = rearrange(mask, "b t -> b 1 t").to(waveform.dtype)
        real_outputs = self.discriminator(target * sample_mask)
        fake_outputs = self.discriminator(fake.to(waveform.dtype) * sample_mask)
        losses = [discriminator_loss(real.logits, fake.logits, self.config.gan_loss)
                  for real, fake in zip(real_outputs, fake_outputs)]
        d_loss = torch.stack(losses).mean()
        metrics = {
            "d_loss": d_loss.detach(),
            "logits_real": torch.stack([o.logits.detach().float().mean() for o in real_outputs]).mean(),
            "logits_fake": torch.stack([o.logits.detach().float().mean() for o in fake_outputs]).mean(),
        }
        return d_loss, metrics
