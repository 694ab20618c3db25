"""Loss terms and a metric for audio tokenizers: masked waveform L1, multi-resolution STFT, mel, SI-SNR.

The multi-resolution STFT loss is that of Yamamoto et al. 2020 ("Parallel WaveGAN", section 2.3):
for several (FFT size, hop, window) triples, spectral convergence ||S| - |S^||_F / ||S||_F plus
the L1 distance of log magnitudes, averaged over resolutions. The mel loss is the L1 distance of
log mel spectrograms, the frequency-domain term of EnCodec (Defossez et al. 2022, "High Fidelity
Neural Audio Compression"), with a triangular mel filterbank built here (HTK mel scale
2595 log10(1 + f / 700), optional Slaney area normalisation), so no torchaudio is needed. SI-SNR
is the scale-invariant signal-to-noise ratio of Le Roux et al. 2019 ("SDR - half-baked or well
done?"). Every function takes an optional sample mask `(b t)`: padded samples are zeroed in both
signals and spectrogram frames whose centre lies in padding are left out of the averages, so a
batch of clips of different lengths scores only real audio. Everything is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange, reduce
from torch import Tensor

MEL_NORMS = ("slaney", "none")
EPSILON = 1e-7  # magnitude floor: keeps log and the gradient of sqrt finite at silence


def _prepare(estimate: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(b c t) or (b t) signals + (b t) mask -> masked float32 ((b c) t) signals and ((b c) t) mask."""
    if estimate.shape != target.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and target {tuple(target.shape)} differ in shape")
    if estimate.ndim == 2:
        estimate, target = rearrange(estimate, "b t -> b 1 t"), rearrange(target, "b t -> b 1 t")
    if estimate.ndim != 3:
        raise ValueError(f"expected signals (b c t) or (b t), got shape {tuple(estimate.shape)}")
    batch, channels, length = estimate.shape
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=estimate.device)
    if mask.shape != (batch, length):
        raise ValueError(f"mask must be (b t) = {(batch, length)}, got {tuple(mask.shape)}")
    mask = rearrange(mask, "b t -> b 1 t").expand(batch, channels, length).float()
    flat = "b c t -> (b c) t"
    return (rearrange(estimate.float() * mask, flat), rearrange(target.float() * mask, flat),
            rearrange(mask, flat))


def masked_l1(estimate: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean |estimate - target| over the unmasked samples of (b c t) signals."""
    estimate, target, mask = _prepare(estimate, target, mask)
    return (estimate - target).abs().sum() / mask.sum().clamp_min(1.0)


def _frame_mask(mask: Tensor, hop: int, frames: int) -> Tensor:
    """((b c) t) sample mask -> ((b c) frames) float: a centred frame counts when its centre sample does."""
    centres = (torch.arange(frames, device=mask.device) * hop).clamp_max(mask.shape[-1] - 1)
    return mask[:, centres]


def _magnitude(signal: Tensor, fft_size: int, hop: int, window_length: int) -> Tensor:
    """((b c) t) -> ((b c) frames freq) |STFT|, Hann window, centred frames with zero padding."""
    window = torch.hann_window(window_length, device=signal.device)
    spectrum = torch.stft(signal, fft_size, hop_length=hop, win_length=window_length, window=window,
                          center=True, pad_mode="constant", return_complex=True)
    power = spectrum.real.square() + spectrum.imag.square()
    return rearrange(power.clamp_min(EPSILON**2).sqrt(), "n f frames -> n frames f")


def stft_loss(estimate: Tensor, target: Tensor, fft_size: int, hop: int, window_length: int,
              mask: Tensor | None = None, num_bins: int | None = None) -> Tensor:
    """Spectral convergence + mean |log|S^| - log|S||, one resolution, over unmasked frames (and the
    lowest `num_bins` frequency bins only, if given)."""
    estimate, target, mask = _prepare(estimate, target, mask)
    estimate_magnitude = _magnitude(estimate, fft_size, hop, window_length)[..., :num_bins]
    target_magnitude = _magnitude(target, fft_size, hop, window_length)[..., :num_bins]
    frames = rearrange(_frame_mask(mask, hop, target_magnitude.shape[1]), "n frames -> n frames 1")
    difference = (target_magnitude - estimate_magnitude) * frames
    convergence = (reduce(difference.square(), "n frames f -> n", "sum").sqrt()
                   / reduce((target_magnitude * frames).square(), "n frames f -> n", "sum").sqrt().clamp_min(EPSILON))
    log_distance = (target_magnitude.log() - estimate_magnitude.log()).abs() * frames
    log_magnitude = log_distance.sum() / (frames.sum() * target_magnitude.shape[-1]).clamp_min(1.0)
    return convergence.mean() + log_magnitude


def multi_resolution_stft_loss(estimate: Tensor, target: Tensor, fft_sizes: Sequence[int],
                               mask: Tensor | None = None, sample_rate: int = 0,
                               max_frequency_hz: float = 0.0) -> Tensor:
    """Mean of `stft_loss` over FFT sizes n, each with window n and hop n / 4; with `max_frequency_hz`
    (and the `sample_rate`) only the bins up to that frequency are judged."""
    if not fft_sizes:
        raise ValueError("fft_sizes must name at least one FFT size")
    if max_frequency_hz > 0 and sample_rate <= 0:
        raise ValueError("max_frequency_hz needs the sample_rate")

    def bins(size: int) -> int | None:
        return int(max_frequency_hz * size / sample_rate) + 1 if max_frequency_hz > 0 else None

    losses = [stft_loss(estimate, target, size, max(size // 4, 1), size, mask, bins(size)) for size in fft_sizes]
    return torch.stack(losses).mean()


# --- mel ------------------------------------------------------------------------------------------


def hz_to_mel(frequency: Tensor) -> Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + frequency / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, fft_size: int, num_mels: int, min_frequency: float = 0.0,
                   max_frequency: float | None = None, norm: str = "slaney") -> Tensor:
    """(fft_size // 2 + 1, num_mels) triangular filters, equally spaced on the HTK mel scale.

    Filter m rises linearly from mel point m to m + 1 and falls to m + 2; with norm "slaney" each
    is scaled by 2 / (its width in Hz), so every filter has the same area (Slaney's Auditory
    Toolbox). Raises if a filter falls between FFT bins (too many mels for this FFT size).
    """
    if norm not in MEL_NORMS:
        raise ValueError(f"norm must be one of {MEL_NORMS}, got {norm!r}")
    max_frequency = sample_rate / 2 if max_frequency is None else max_frequency
    if not 0.0 <= min_frequency < max_frequency <= sample_rate / 2:
        raise ValueError(f"need 0 <= min_frequency < max_frequency <= {sample_rate / 2} Hz")
    bins = torch.linspace(0.0, sample_rate / 2, fft_size // 2 + 1, dtype=torch.float64)
    mel_points = torch.linspace(float(hz_to_mel(torch.tensor(min_frequency))),
                                float(hz_to_mel(torch.tensor(max_frequency))), num_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mel_points)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (rearrange(bins, "f -> f 1") - lower) / (centre - lower)
    falling = (upper - rearrange(bins, "f -> f 1")) / (upper - centre)
    filters = torch.minimum(rising, falling).clamp_min(0.0)
    if norm == "slaney":
        filters = filters * (2.0 / (upper - lower))
    empty = torch.nonzero(filters.amax(dim=0) == 0).flatten()
    if len(empty):
        raise ValueError(f"mel filters {empty.tolist()} cover no FFT bin: use fewer than {num_mels} mels "
                         f"or an FFT larger than {fft_size} at {sample_rate} Hz")
    return filters.float()


def mel_loss(estimate: Tensor, target: Tensor, filterbank: Tensor, fft_size: int, hop: int,
             mask: Tensor | None = None) -> Tensor:
    """Mean |log mel(estimate) - log mel(target)| over unmasked frames; `filterbank` is (freq mels)."""
    estimate, target, mask = _prepare(estimate, target, mask)
    filterbank = filterbank.to(device=estimate.device, dtype=torch.float32)
    estimate_mel = (_magnitude(estimate, fft_size, hop, fft_size) @ filterbank).clamp_min(1e-5).log()
    target_mel = (_magnitude(target, fft_size, hop, fft_size) @ filterbank).clamp_min(1e-5).log()
    frames = rearrange(_frame_mask(mask, hop, target_mel.shape[1]), "n frames -> n frames 1")
    return ((estimate_mel - target_mel).abs() * frames).sum() / (frames.sum() * filterbank.shape[1]).clamp_min(1.0)


# --- metric ---------------------------------------------------------------------------------------


def si_snr(estimate: Tensor, target: Tensor, mask: Tensor | None = None, epsilon: float = 1e-8) -> Tensor:
    """Scale-invariant SNR in dB per signal, `(b c t)` -> `(b c)` (or `(b t)` -> `(b,)`).

    With zero-mean s (target) and s^ (estimate) over the unmasked samples, the target part of s^
    is s_t = <s^, s> s / ||s||^2 and the error e = s^ - s_t; SI-SNR = 10 log10(||s_t||^2 / ||e||^2).
    `epsilon` only keeps the ratio finite for a perfect (or silent) estimate.
    """
    squeeze = estimate.ndim == 2
    batch = estimate.shape[0]
    estimate, target, mask = _prepare(estimate, target, mask)
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    estimate = (estimate - estimate.sum(dim=-1, keepdim=True) / count) * mask
    target = (target - target.sum(dim=-1, keepdim=True) / count) * mask
    scale = (estimate * target).sum(dim=-1, keepdim=True) / (target.square().sum(dim=-1, keepdim=True) + epsilon)
    projection = scale * target
    error = estimate - projection
    ratio = (projection.square().sum(dim=-1) + epsilon) / (error.square().sum(dim=-1) + epsilon)
    values = 10.0 * torch.log10(ratio)
    return values if squeeze else rearrange(values, "(b c) -> b c", b=batch)


def low_pass(signal: Tensor, sample_rate: int, cutoff_hz: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """(b c t) or (b t) signals with every FFT bin above `cutoff_hz` removed (one FFT over the whole,
    masked, signal; differentiable). For losses that should only judge the band a codec can match.
    `cutoff_hz` may be a (b,) tensor: each signal its own cutoff."""
    if mask is not None:
        signal = signal * (rearrange(mask, "b t -> b 1 t") if signal.ndim == 3 else mask).to(signal.dtype)
    spectrum = torch.fft.rfft(signal.float(), dim=-1)
    frequencies = torch.fft.rfftfreq(signal.shape[-1], d=1.0 / sample_rate, device=signal.device)
    if isinstance(cutoff_hz, Tensor):  # (b,) -> (b [1] 1), against (f,)
        cutoff_hz = cutoff_hz.to(signal.device).reshape(-1, *(1,) * (signal.ndim - 1))
    return torch.fft.irfft(spectrum * (frequencies <= cutoff_hz), n=signal.shape[-1], dim=-1)


def frames_per_second(sample_rate: int, hop: int) -> float:
    """Token frames per second of a tokenizer with this hop (bitrate = this * bits per frame)."""
    return sample_rate / hop


def bits_per_frame(codebook_size: int, num_codebooks: int) -> float:
    return num_codebooks * math.log2(codebook_size)
