"""Does the spoken-digit classifier judge speech, or the high band? Train it with band-limited copies and compare.

    python benchmarks/classifier_band_robustness.py configs/pipeline/fsdd_transformer.toml audio_data.path=fsdd.npz \
        --cache runs/classifier_band_robustness --out benchmarks/results/fsdd_references/classifier_band_robustness.json

The classifier that judges generated clips (`audio_eval`, trained on clean train clips) recognises
97.7% of real test clips but only 70.7% once everything above 3 kHz is muted, 1.6% of the energy,
though telephone-band speech stays intelligible (`si_snr_band_oracles.py`). A judge that leans on
the highs favours codecs that keep them. This script trains the run config's classifier twice, plain
and with `audio.classifier.band_limited_copies = --copies` (each train clip also low-passed that many
times, at cutoffs drawn uniformly from [--min-cutoff, the Nyquist frequency)), and scores both on:
the real test clips, the band oracles of `si_snr_band_oracles.py` (muted or random-phase above a
cutoff), and Codec2's decodings (`codec2_reference.py`; skipped without its tools).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from functools import partial
from pathlib import Path

import torch

from pipelines import audio_eval
from pipelines.audio_data import load_audio_dataset
from pipelines.classifier import classifier_accuracy
from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config

try:
    from benchmarks.audio_codec_eval import machine, save_record, test_split
    from benchmarks.codec2_reference import codec2_decodings, codec2_tools
    from benchmarks.si_snr_band_oracles import CUTOFFS_HZ, ORACLES, oracle_clips
except ImportError:  # run as a script, `python benchmarks/classifier_band_robustness.py`
    from audio_codec_eval import machine, save_record, test_split
    from codec2_reference import codec2_decodings, codec2_tools
    from si_snr_band_oracles import CUTOFFS_HZ, ORACLES, oracle_clips

CODEC2_MODES = ("3200", "1600", "700C")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an audio run config (its data and classifier settings are used)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen")
    parser.add_argument("--cache", required=True, help="folder for both classifiers (kept between runs)")
    parser.add_argument("--copies", type=int, default=2, help="low-passed copies of each train clip")
    parser.add_argument("--min-cutoff", type=float, default=1000.0, help="lowest cutoff of a copy (Hz)")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    parser.add_argument("--threads", type=int, default=1)
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)
    config = load_run_config(args.config, args.overrides)
    data, rate = load_audio_dataset(config.audio_data), config.audio_data.sample_rate
    features = partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=rate)

    plain_config = dataclasses.replace(config.audio.classifier, band_limited_copies=0)
    band_config = dataclasses.replace(config.audio.classifier, band_limited_copies=args.copies,
                                      band_limit_min_hz=args.min_cutoff)
    judges = {name: audio_eval.dataset_audio_classifier(Path(args.cache) / name, data, judge_config)[0]
              for name, judge_config in (("plain", plain_config), ("band_limited", band_config))}

    test, lengths, labels = test_split(data)
    sets = {"real": test}
    sets.update({f"{oracle} above {cutoff} Hz": oracle_clips(test, lengths, rate, cutoff, oracle)
                 for oracle in ORACLES for cutoff in CUTOFFS_HZ})
    if shutil.which("c2enc") and shutil.which("c2dec") and rate == 8000:
        tools = codec2_tools()
        sets.update({f"Codec2 {mode}": codec2_decodings(test, lengths, mode, tools)[0] for mode in CODEC2_MODES})
    rows = []
    for name, clips in sets.items():
        clip_features = features(clips)
        row = {"clips": name, **{judge: classifier_accuracy(model, clip_features, labels)
                                 for judge, model in judges.items()}}
        rows.append(row)
        print(f"{name:>28}: recognised {row['plain']:.3f} by the plain classifier, "
              f"{row['band_limited']:.3f} by the band-limited one")
    record = {"config": args.config, "overrides": args.overrides, "copies": args.copies,
              "min_cutoff_hz": args.min_cutoff, "num_test_clips": len(test),
              "machine": machine(args), "recognised": rows}
    save_record(record, args.out)


if __name__ == "__main__":
    main()
