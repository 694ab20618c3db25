"""What SI-SNR a codec perfect below a cutoff frequency could reach, and whether the classifier still hears the digit.

    python benchmarks/si_snr_band_oracles.py configs/pipeline/fsdd_transformer.toml audio_data.path=fsdd.npz \
        --classifier-cache runs/x/classifier --out benchmarks/results/fsdd_si_snr_band_oracles.json

No codec is trained: each test clip is rendered by two "oracles" that keep every frequency below the
cutoff exactly (amplitude and phase, an FFT over the clip's real samples), and above it either
  - `muted`: nothing, the quietest answer a waveform loss pushes a codec towards where it cannot
    match the phase, or
  - `random_phase`: the true magnitudes of 32 ms frames with random phases, what a codec that keeps
    the highs' energy and timing (so the spectral losses are satisfied) but not their phase would give.
Both are upper bounds for such codecs: a real one also errs below the cutoff. Reported per cutoff:
the test SI-SNR (as `audio_eval.reconstruction_metrics` computes it) and the share of the oracles'
clips that the spoken-digit classifier recognises (trained on the train split, or reused from
`--classifier-cache`, keyed as `tokgen eval` keys it).
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch

from pipelines import audio_eval
from pipelines.audio_data import lengths_to_mask, load_audio_dataset
from pipelines.classifier import classifier_accuracy
from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config
from tokenizers_vq.audio_losses import low_pass, si_snr

try:
    from benchmarks.audio_codec_eval import machine, save_record, test_split
except ImportError:  # run as a script, `python benchmarks/si_snr_band_oracles.py`
    from audio_codec_eval import machine, save_record, test_split

CUTOFFS_HZ = (500, 1000, 1500, 2000, 3000)
ORACLES = ("muted", "random_phase")


def render_oracle(clip: torch.Tensor, sample_rate: int, cutoff_hz: float, oracle: str,
                  generator: torch.Generator) -> torch.Tensor:
    """A 1-D clip kept below `cutoff_hz` and, above it, muted (one FFT of the whole clip: the low band
    exact) or given random phases frame by frame (an STFT of 32 ms windows, so each high-band burst
    keeps its time and energy, as a codec that misses only the phase would give; the low band as the
    STFT's overlap-add rebuilds it)."""
    if oracle == "muted":
        return low_pass(clip, sample_rate, cutoff_hz).to(clip.dtype)
    if oracle != "random_phase":
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    window_size = 2 ** round(math.log2(0.032 * sample_rate))
    window = torch.hann_window(window_size, dtype=torch.float64)
    frames = torch.stft(clip.double(), window_size, hop_length=window_size // 4, window=window, return_complex=True)
    high = torch.fft.rfftfreq(window_size, d=1.0 / sample_rate) > cutoff_hz
    phases = 2 * math.pi * torch.rand(int(high.sum()), frames.shape[-1], generator=generator, dtype=torch.float64)
    low_frames, true_high, random_high = frames.clone(), torch.zeros_like(frames), torch.zeros_like(frames)
    low_frames[high] = 0
    true_high[high] = frames[high]
    random_high[high] = frames[high].abs() * torch.polar(torch.ones_like(phases), phases)
    low_band, true_band, random_band = (torch.istft(part, window_size, hop_length=window_size // 4, window=window,
                                                    length=len(clip)) for part in (low_frames, true_high, random_high))
    # Overlapping frames of unrelated phases partly cancel: give the highs back the true band's energy.
    gain = (true_band.square().sum() / random_band.square().sum().clamp_min(1e-12)).sqrt()
    return (low_band + gain * random_band).to(clip.dtype)


def oracle_clips(waveforms: torch.Tensor, lengths: torch.Tensor, sample_rate: int, cutoff_hz: float, oracle: str,
                 seed: int = 0) -> torch.Tensor:
    """(n 1 t) clips rendered by the oracle over each clip's real samples; padding stays silent."""
    generator = torch.Generator().manual_seed(seed)
    rendered = torch.zeros_like(waveforms)
    for index, (clip, length) in enumerate(zip(waveforms[:, 0], lengths.tolist())):
        rendered[index, 0, :length] = render_oracle(clip[:length], sample_rate, cutoff_hz, oracle, generator)
    return rendered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an audio run config (its data and classifier settings are used)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen")
    parser.add_argument("--classifier-cache", required=True, help="folder to keep the classifier in between runs")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    parser.add_argument("--threads", type=int, default=1)
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)
    config = load_run_config(args.config, args.overrides)
    data = load_audio_dataset(config.audio_data)
    rate = config.audio_data.sample_rate
    waveforms, lengths, labels = test_split(data)
    mask = lengths_to_mask(lengths, waveforms.shape[-1])
    classifier, _ = audio_eval.dataset_audio_classifier(args.classifier_cache, data, config.audio.classifier)
    features = partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=rate)

    def recognised(clips: torch.Tensor) -> float:
        return classifier_accuracy(classifier, features(clips), labels)

    results = {"real_clips_recognised": recognised(waveforms), "oracles": []}
    for cutoff in CUTOFFS_HZ:
        for oracle in ORACLES:
            rendered = oracle_clips(waveforms, lengths, rate, cutoff, oracle)
            snr = si_snr(rendered[:, 0], waveforms[:, 0], mask).double()
            row = {"cutoff_hz": cutoff, "oracle": oracle, "si_snr_db": snr.mean().item(),
                   "si_snr_db_median": snr.median().item(), "recognised": recognised(rendered)}
            results["oracles"].append(row)
            print(f"{oracle:>12} above {cutoff:4d} Hz: test SI-SNR {row['si_snr_db']:6.2f} dB "
                  f"(median {row['si_snr_db_median']:6.2f}), recognised {row['recognised']:.3f}")
    record = {"config": args.config, "overrides": args.overrides, "num_clips": len(waveforms),
              "machine": machine(args), "metrics": results}
    save_record(record, args.out)


if __name__ == "__main__":
    main()
