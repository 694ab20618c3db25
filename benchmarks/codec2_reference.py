"""Codec2, the open low-bitrate speech codec, scored on an audio run's test split as tokgen scores its codecs.

    apt-get install codec2      # Debian/Ubuntu: the c2enc and c2dec tools
    python benchmarks/codec2_reference.py configs/pipeline/fsdd_transformer.toml audio_data.path=fsdd.npz \
        --classifier-cache runs/x/classifier --out benchmarks/results/fsdd_codec2_reference.json

Codec2 (D. Rowe, https://github.com/drowe67/codec2) codes 8 kHz speech with a sinusoidal model:
pitch, voicing, energy and an LPC/LSP spectral envelope per 10-40 ms, at 3200 down to 700 bits/s.
Its 1600 mode sits at issue 4's bitrate, so it is the reference a reader asks for beside tokgen's
1.6 kbps codec. Each test clip (cropped and levelled as the run's data are) is written as 16-bit raw
PCM, encoded and decoded by the command-line tools, one call per clip so no state crosses clips, and
scored with `audio_eval.waveform_metrics` and the run's spoken-digit classifier.

A parametric codec rebuilds the phases itself, so it is not meant to match the waveform, and its
decoder adds a delay. SI-SNR is therefore also reported at the one lag (within +-max_lag samples)
that is best for the whole split, and at each clip's own best lag, an optimistic figure no codec
is scored by elsewhere in this project.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from pipelines import audio_eval
from pipelines.audio_data import lengths_to_mask, load_audio_dataset
from pipelines.classifier import classifier_accuracy
from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config
from tokenizers_vq.audio_losses import si_snr

try:
    from benchmarks.audio_codec_eval import machine, save_record, test_split
except ImportError:  # run as a script, `python benchmarks/codec2_reference.py`
    from audio_codec_eval import machine, save_record, test_split

MODES = ("3200", "2400", "1600", "1300", "1200", "700C")
CODEC2_RATE = 8000  # Codec2 codes 8 kHz narrow-band speech only
PCM_SCALE = 32767.0


def codec2_tools() -> tuple[str, str]:
    """Paths of c2enc and c2dec, or an error that says how to install them."""
    tools = shutil.which("c2enc"), shutil.which("c2dec")
    if None in tools:
        raise SystemExit("c2enc/c2dec not found on PATH: install Codec2 (Debian/Ubuntu: apt-get install codec2)")
    return tools


def codec2_version() -> str:
    """The installed Debian package's version, where dpkg can say (the tools print none)."""
    if shutil.which("dpkg-query") is None:
        return "unknown"
    query = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "codec2"], capture_output=True, text=True)
    return query.stdout.strip() or "unknown"


def codec2_roundtrip(clip: np.ndarray, mode: str, tools: tuple[str, str], workdir: Path) -> tuple[np.ndarray, int]:
    """A float clip in [-1, 1] through Codec2 `mode`: (the decoded clip, cut or zero-padded to the clip's
    length; the size of the coded stream in bits)."""
    raw_in, coded, raw_out = workdir / "in.raw", workdir / "coded.bit", workdir / "out.raw"
    np.clip(np.round(clip * PCM_SCALE), -32768, 32767).astype("<i2").tofile(raw_in)
    encoder, decoder = tools
    for command in ([encoder, mode, raw_in, coded], [decoder, mode, coded, raw_out]):
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    decoded = np.fromfile(raw_out, dtype="<i2").astype(np.float32) / PCM_SCALE
    return np.pad(decoded, (0, max(0, len(clip) - len(decoded))))[: len(clip)], coded.stat().st_size * 8


def codec2_decodings(waveforms: torch.Tensor, lengths: torch.Tensor, mode: str,
                     tools: tuple[str, str]) -> tuple[torch.Tensor, int]:
    """(n 1 t) clips through Codec2 `mode`, one call per clip, silent after each length; and the coded bits."""
    decoded, bits = torch.zeros_like(waveforms), 0
    with tempfile.TemporaryDirectory() as workdir:
        for index, length in enumerate(lengths.tolist()):
            clip, clip_bits = codec2_roundtrip(waveforms[index, 0, :length].numpy(), mode, tools, Path(workdir))
            decoded[index, 0, :length], bits = torch.from_numpy(clip), bits + clip_bits
    return decoded, bits


def lagged_si_snr(decoded: torch.Tensor, clips: torch.Tensor, mask: torch.Tensor, max_lag: int) -> torch.Tensor:
    """(n lags) SI-SNR of each (n t) decoded clip moved by every lag in [-max_lag, max_lag] against its
    original, over the original's real samples; a positive lag undoes a decoder's delay."""
    padded = F.pad(decoded, (max_lag, max_lag))
    rows = []
    for index in range(len(clips)):  # row k: decoded[t + k - max_lag], undoing a delay of k - max_lag samples
        shifted = padded[index].unfold(0, clips.shape[-1], 1)
        target = clips[index].expand_as(shifted)
        rows.append(si_snr(rearrange(shifted, "l t -> l 1 t"), rearrange(target, "l t -> l 1 t"),
                           mask[index].expand_as(shifted))[:, 0])
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an audio run config at 8 kHz (its data and classifier settings are used)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen")
    parser.add_argument("--classifier-cache", required=True, help="folder to keep the classifier in between runs")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Codec2 modes, comma-separated (of {MODES})")
    parser.add_argument("--max-lag", type=int, default=320, help="samples either way searched for the best lag")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    parser.add_argument("--threads", type=int, default=1)
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)
    tools = codec2_tools()
    config = load_run_config(args.config, args.overrides)
    if config.audio_data.sample_rate != CODEC2_RATE or config.audio_data.channels != 1:
        raise SystemExit(f"Codec2 codes 8 kHz mono speech; {args.config} has audio_data.sample_rate="
                         f"{config.audio_data.sample_rate}, channels={config.audio_data.channels}")
    data = load_audio_dataset(config.audio_data)
    waveforms, lengths, labels = test_split(data)
    mask = lengths_to_mask(lengths, waveforms.shape[-1])
    classifier, _ = audio_eval.dataset_audio_classifier(args.classifier_cache, data, config.audio.classifier)
    features = partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=CODEC2_RATE)
    real_features = features(waveforms)
    seconds = lengths.sum().item() / CODEC2_RATE

    results = []
    for mode in args.modes.split(","):
        decoded, bits = codec2_decodings(waveforms, lengths, mode, tools)
        row = {"mode": mode, "bitrate_bps": bits / seconds,
               **audio_eval.waveform_metrics(decoded, waveforms, lengths, CODEC2_RATE)}
        lagged = lagged_si_snr(decoded[:, 0], waveforms[:, 0], mask, args.max_lag).double()
        split_lag = int(lagged.mean(0).argmax())
        row.update(best_split_lag_samples=split_lag - args.max_lag,
                   si_snr_db_at_split_lag=lagged[:, split_lag].mean().item(),
                   si_snr_db_at_clip_lags=lagged.max(1).values.mean().item(),
                   **audio_eval.reconstruction_classifier_metrics(classifier, features(decoded), real_features,
                                                                  labels))
        results.append(row)
        print(f"Codec2 {mode:>4}: {row['bitrate_bps']:6.0f} bit/s, SI-SNR {row['si_snr_db']:6.2f} dB "
              f"({row['si_snr_db_at_split_lag']:6.2f} at lag {row['best_split_lag_samples']:+d}, "
              f"{row['si_snr_db_at_clip_lags']:6.2f} at each clip's best), STFT {row['stft_distance']:.3f}, "
              f"mel {row['mel_distance']:.3f}, recognised {row['reconstruction_class_accuracy']:.3f}")
    record = {"config": args.config, "overrides": args.overrides, "num_clips": len(waveforms), "max_lag": args.max_lag,
              "codec2": codec2_version(),
              "machine": machine(args),
              "real_clips_recognised": classifier_accuracy(classifier, real_features, labels),
              "modes": results}
    save_record(record, args.out)


if __name__ == "__main__":
    main()
