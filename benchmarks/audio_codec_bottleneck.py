"""Where a residual-VQ audio codec loses its SI-SNR: the quantizer, or the encoder and decoder.

    python benchmarks/audio_codec_bottleneck.py configs/pipeline/fsdd_transformer.toml RUN/tokenizer \
        audio_data.path=fsdd.npz --out benchmarks/results/fsdd_codec_bottleneck.json

Decodes the test split three ways with the same weights: the encoder's latents unquantized (what
the decoder could do with unlimited bits), the first residual level alone (half the bits), and
every level (the codec as trained). If the unquantized SI-SNR is far above the codec's, the bits
are the limit; if the two are close, the encoder and decoder are. Also the codec's SI-SNR per
speaker when the data are FSDD (its npz names the speaker of every clip), and per frequency band
the codec's output energy against the original's and the band's SNR. Test SI-SNR as in
`audio_eval.reconstruction_metrics` (per clip over real samples, then the mean and the median).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, reduce

from pipelines.audio_data import lengths_to_mask, load_audio_dataset
from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config
from tokenizers_vq import load_tokenizer
from tokenizers_vq.audio_losses import si_snr

try:
    from benchmarks.audio_codec_eval import codec_arguments
except ImportError:  # run as a script, `python benchmarks/audio_codec_bottleneck.py`
    from audio_codec_eval import codec_arguments


BAND_EDGES_HZ = (0, 500, 1000, 2000, 3000, 4000)


def band_energies(original: torch.Tensor, reconstruction: torch.Tensor, sample_rate: int,
                  edges_hz=BAND_EDGES_HZ, fft_size: int = 256) -> torch.Tensor:
    """(bands, 3) sums over (n c t) clips of |STFT|^2 in each band: original, reconstruction, difference.

    Padding must already be zero in both. Band k holds the bins in [edges[k], edges[k + 1]), the
    last one its upper edge too; a band above Nyquist is empty.
    """
    window = torch.hann_window(fft_size, device=original.device)
    spectra = [torch.stft(signal.flatten(0, 1).float(), fft_size, fft_size // 4, window=window, return_complex=True)
               for signal in (original, reconstruction)]
    frequencies = torch.arange(fft_size // 2 + 1, device=original.device) * sample_rate / fft_size
    rows = []
    for index, (low, high) in enumerate(zip(edges_hz[:-1], edges_hz[1:])):
        last = index == len(edges_hz) - 2
        in_band = (frequencies >= low) & ((frequencies <= high) if last else (frequencies < high))
        original_band, reconstruction_band = (spectrum[:, in_band] for spectrum in spectra)
        rows.append(torch.stack([original_band.abs().square().sum(), reconstruction_band.abs().square().sum(),
                                 (original_band - reconstruction_band).abs().square().sum()]))
    return torch.stack(rows).double()


def band_summary(totals: torch.Tensor, edges_hz) -> dict:
    """`band_energies` sums -> per band: its share of the original energy, the codec's output energy
    over the original's, and the SNR (dB).

    A codec that cannot match the phase of a band does best on SNR by saying less there, so an energy
    ratio far below 1 marks bands it gave up on (and that a listener, or a classifier, then misses).
    """
    original, output, error = totals.unbind(dim=1)
    columns = zip(edges_hz[:-1], edges_hz[1:], original / original.sum(), output / original,
                  10 * torch.log10(original / error))
    return {f"{low}-{high} Hz": {"energy_share": share.item(), "energy_ratio": ratio.item(), "snr_db": snr.item()}
            for low, high, share, ratio, snr in columns}


@torch.no_grad()
def score_test_split(tokenizer, waveforms: torch.Tensor, lengths: torch.Tensor,
                     batch_size: int = 50) -> tuple[dict, dict]:
    """Per-clip SI-SNR (dB) of the unquantized latents and of each prefix of the residual levels, and
    `band_summary` of the codec's output (every level), from one decode of each."""
    levels = tokenizer.num_codebooks
    sample_rate = int(tokenizer.config.sample_rate)
    edges = [edge for edge in BAND_EDGES_HZ if edge < sample_rate / 2] + [sample_rate // 2]
    results = {"unquantized": [], **{f"levels_{k}": [] for k in range(1, levels + 1)}}
    band_totals = torch.zeros(len(edges) - 1, 3, dtype=torch.float64)
    for start in range(0, len(waveforms), batch_size):
        clips, count = waveforms[start : start + batch_size], lengths[start : start + batch_size]
        mask = lengths_to_mask(count, clips.shape[-1])
        latents = tokenizer._latents(clips)
        decoded = {"unquantized": tokenizer._decode_codes(latents)}
        indices = tokenizer.quantizer.to_indices(latents)
        indices = indices if indices.ndim == 3 else indices.unsqueeze(-1)
        for kept in range(1, levels + 1):
            partial = indices.clone()
            partial[..., kept:] = -1  # a level left out (ResidualVQ.lookup)
            codes = tokenizer.quantizer.lookup(partial if levels > 1 else partial[..., 0])
            decoded[f"levels_{kept}"] = tokenizer._decode_codes(codes)
        for name, audio in decoded.items():
            audio = audio[..., : clips.shape[-1]].clamp(-1.0, 1.0)
            results[name].append(reduce(si_snr(audio, clips, mask), "b c -> b", "mean"))
            if name == f"levels_{levels}":  # the codec as it decodes
                sample_mask = rearrange(mask, "b t -> b 1 t")
                band_totals += band_energies(clips * sample_mask, audio * sample_mask, sample_rate, edges)
    per_clip = {name: torch.cat(values).double() for name, values in results.items()}
    return per_clip, band_summary(band_totals, edges)


def fsdd_test_speakers(path: str, test_lengths: np.ndarray, clip_samples: int) -> np.ndarray | None:
    """The speaker name of each test clip, from the FSDD npz, if its test clips line up with the split's."""
    arrays = np.load(path, allow_pickle=False)
    if "speaker" not in arrays.files:
        return None
    is_test = arrays["is_test"].astype(bool)
    lengths = np.minimum(np.diff(arrays["offsets"])[is_test], clip_samples)
    if len(lengths) != len(test_lengths) or not np.array_equal(lengths, test_lengths):
        return None  # another order than the npz's: no per-speaker figures rather than wrong ones
    return arrays["speaker_names"][arrays["speaker"][is_test]]


def summary(values: torch.Tensor) -> dict:
    return {"si_snr_db": values.mean().item(), "si_snr_db_median": values.median().item(), "clips": len(values)}


def main() -> None:
    parser = codec_arguments(__doc__.splitlines()[0])
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)
    run = load_run_config(args.config, args.overrides)
    if not run.is_audio:
        parser.error(f"{args.config} is not an audio run ([audio_data])")
    dataset = load_audio_dataset(run.audio_data)
    tokenizer = load_tokenizer(args.tokenizer).eval()
    waveforms, lengths = torch.from_numpy(dataset.test.waveforms), torch.from_numpy(dataset.test.lengths)
    started = time.perf_counter()
    per_clip, bands = score_test_split(tokenizer, waveforms, lengths)
    report = {
        "config": args.config, "tokenizer": args.tokenizer, "overrides": args.overrides,
        "machine": f"{platform.machine()} cpu, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - started,
        "test_split": {name: summary(values) for name, values in per_clip.items()},
    }
    report["codec_by_band"] = bands
    source = run.audio_data.source
    speakers = fsdd_test_speakers(run.audio_data.path, dataset.test.lengths, waveforms.shape[-1]) if source == "fsdd" else None
    if speakers is not None:
        codec = per_clip[f"levels_{tokenizer.num_codebooks}"]
        report["codec_by_speaker"] = {str(name): summary(codec[torch.from_numpy(speakers == name)])
                                      for name in sorted(set(speakers))}
    for name, row in report["test_split"].items():
        print(f"{name:<12} SI-SNR {row['si_snr_db']:6.2f} dB (median {row['si_snr_db_median']:6.2f})")
    for name, row in report["codec_by_band"].items():
        print(f"  band {name:<13} {100 * row['energy_share']:5.1f}% of the energy; output/original energy "
              f"{row['energy_ratio']:.2f}, SNR {row['snr_db']:5.1f} dB")
    for name, row in report.get("codec_by_speaker", {}).items():
        print(f"  speaker {name:<10} {row['si_snr_db']:6.2f} dB (median {row['si_snr_db_median']:6.2f}, {row['clips']} clips)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
