"""Score a trained audio tokenizer alone: test SI-SNR, STFT/mel distances, latents against codes, what the classifier hears.

    tokgen train-tokenizer configs/pipeline/fsdd_cpu.toml audio_data.path=fsdd.npz output_dir=/tmp/sweep
    python benchmarks/audio_codec_eval.py configs/pipeline/fsdd_cpu.toml /tmp/sweep/fsdd_cpu/tokenizer \
        audio_data.path=fsdd.npz --out /tmp/sweep/codec.json

For codec sweeps without training a prior: the same metrics as `metrics.json["tokenizer"]` of a
whole run (`audio_eval.reconstruction_metrics` and `reconstruction_classifier_metrics`) on the
run config's test split, with the run config's spoken-digit classifier (trained here on the train
split, or reused from `--classifier-cache`). Pass the same overrides as for training, so the data
(clip length, `peak_level`) match what the tokenizer saw. `--against OTHER_TOKENIZER` adds the
per-clip SI-SNR gain over another codec, paired on the same clips (`si_snr_gain_db` and its standard
error): on FSDD a training cycle's gain of 0.05 dB is a third of either mean's own standard error
(0.15 dB) and twice the paired one (0.026 dB). `--flip-polarity` and `--delay N` score the test clips
(not the train clips) sign-flipped or delayed, as the training augmentation would present them.
"""

from __future__ import annotations

import argparse
import json
import platform
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipelines import audio_eval
from pipelines.audio_data import lengths_to_mask, load_audio_dataset
from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config
from pipelines.tokenset import frames_of
from tokenizers_vq import load_tokenizer


def test_split(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An `AudioDataset`'s test split: (n c t) float32 waveforms, their lengths in samples, their labels."""
    return (torch.from_numpy(np.ascontiguousarray(data.test.waveforms, dtype=np.float32)),
            torch.as_tensor(data.test.lengths), torch.as_tensor(data.test.labels))


def transformed_clips(waveforms: torch.Tensor, lengths: torch.Tensor, flip_polarity: bool = False,
                      delay: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test clips with every sign flipped and/or each clip delayed by `delay` samples of silence: the
    training augmentation's transforms, applied to all clips alike, to ask whether the codec codes such
    input as well as the original. A delayed clip longer than the window loses its last samples."""
    if delay < 0:
        raise ValueError(f"--delay must be >= 0, got {delay}")
    window = waveforms.shape[-1]
    if delay:
        waveforms = torch.nn.functional.pad(waveforms, (delay, 0))[..., :window]
        lengths = (lengths + delay).clamp(max=window)
    return (-waveforms if flip_polarity else waveforms), lengths


def machine(args) -> str:
    """Where a script ran: the GPU (`args.device`, if the script has one) or the CPU and its thread count."""
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, fp32, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}"


def save_record(record: dict, out: str) -> None:
    """A script's figures as JSON at `out` (nothing when it is empty: they were printed)."""
    if out:
        Path(out).write_text(json.dumps(record, indent=2, default=float))


def codec_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that score a trained audio codec on its run's test split."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="the run config the tokenizer was trained with")
    parser.add_argument("tokenizer", help="the tokenizer folder (config.json + model.safetensors)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    parser.add_argument("--threads", type=int, default=1)
    return parser


@torch.no_grad()
def latent_statistics(tokenizer, waveforms: torch.Tensor, lengths: torch.Tensor, batch_size: int = 100) -> dict:
    """How the encoder's outputs z sit against their codes q on frames that hold audio: mean z^2 and q^2
    per dimension, |z - q|^2 / |z|^2 and the mean cosine of z and q. A codec whose latents shrink or
    drift from their codes shows it here before its SI-SNR says why."""
    sums = torch.zeros(4, dtype=torch.float64)  # z^2, q^2, (z - q)^2, cosine
    frames, dims = 0, 1
    for start in range(0, len(waveforms), batch_size):
        latents = tokenizer._latents(waveforms[start:start + batch_size].to(next(tokenizer.parameters()).device))
        held = lengths_to_mask(frames_of(lengths[start:start + batch_size], tokenizer.hop_length),
                               latents.shape[1]).to(latents.device)
        z = latents[held].double()
        q = tokenizer.quantizer.lookup(tokenizer.quantizer.to_indices(latents))[held].double()
        sums += torch.stack([z.square().sum(), q.square().sum(), (z - q).square().sum(),
                             torch.nn.functional.cosine_similarity(z, q, dim=-1).sum()]).cpu()
        frames, dims = frames + z.shape[0], z.shape[1]
    return {"latent_mean_square": float(sums[0] / (frames * dims)), "code_mean_square": float(sums[1] / (frames * dims)),
            "quantization_relative_error": float(sums[2] / sums[0]), "latent_code_cosine": float(sums[3] / frames)}


def main() -> None:
    parser = codec_arguments(__doc__.splitlines()[0])
    parser.add_argument("--train-clips", type=int, default=300,
                        help="also the SI-SNR of this many train clips, spread over the split (0: skip): "
                             "far above the test figure, the codec has learnt its clips")
    parser.add_argument("--against", default="",
                        help="another tokenizer folder for the same config (say, the codec before a training cycle): "
                             "also the per-clip SI-SNR gain over it on the test clips, with the paired standard error")
    parser.add_argument("--flip-polarity", action="store_true",
                        help="score the test clips with their sign flipped (as tokenizer.augment_polarity does)")
    parser.add_argument("--delay", type=int, default=0,
                        help="score the test clips each delayed by this many samples of silence")
    parser.add_argument("--classifier-cache", default="", help="folder to keep the classifier in between runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the codec and the classifier run (default: CUDA when there is one)")
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)

    config = load_run_config(args.config, args.overrides)
    if not config.is_audio:
        raise SystemExit(f"{args.config} is not an audio run config (no [audio_data] section)")
    data = load_audio_dataset(config.audio_data)
    tokenizer = load_tokenizer(args.tokenizer).eval().to(args.device)
    waveforms, lengths, labels = test_split(data)
    waveforms, lengths = transformed_clips(waveforms, lengths, args.flip_polarity, args.delay)
    metrics, _, reconstructions = audio_eval.reconstruction_metrics(tokenizer, waveforms, lengths)
    metrics.update(latent_statistics(tokenizer, waveforms, lengths))
    if args.against:
        baseline = load_tokenizer(args.against).eval().to(args.device)
        _, baseline_reconstructions = audio_eval.reconstruct(baseline, waveforms, lengths)  # its SI-SNR only
        metrics.update(audio_eval.paired_si_snr_gain(
            audio_eval.per_clip_si_snr(reconstructions, waveforms, lengths),
            audio_eval.per_clip_si_snr(baseline_reconstructions, waveforms, lengths)))
    if args.train_clips:
        spread = np.unique(np.linspace(0, len(data.train) - 1, min(args.train_clips, len(data.train))).round()
                           .astype(np.int64))  # every part of the split: FSDD's train clips come grouped by speaker
        train_metrics, _, _ = audio_eval.reconstruction_metrics(
            tokenizer, torch.from_numpy(data.train.waveforms[spread]), torch.as_tensor(data.train.lengths[spread]))
        metrics.update(train_si_snr_db=train_metrics["si_snr_db"],
                       train_si_snr_db_median=train_metrics["si_snr_db_median"], train_clips=len(spread))
    if data.num_classes:
        cache = Path(args.classifier_cache or Path(args.tokenizer).parent / "codec_eval_classifier")
        classifier, _ = audio_eval.dataset_audio_classifier(cache, data, config.audio.classifier, args.device)
        features = partial(audio_eval.log_mel_features, config=config.audio.classifier,
                           sample_rate=config.audio_data.sample_rate)
        metrics.update(audio_eval.reconstruction_classifier_metrics(
            classifier, features(reconstructions), features(waveforms), labels))
    record = {"config": args.config, "tokenizer": args.tokenizer, "against": args.against or None,
              "overrides": args.overrides,
              "test_clips": {"flip_polarity": args.flip_polarity, "delay": args.delay},
              "machine": machine(args),
              "metrics": metrics}
    print(json.dumps(record, indent=2, default=float))
    save_record(record, args.out)


if __name__ == "__main__":
    main()
