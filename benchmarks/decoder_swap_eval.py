"""Render a finished audio run's generated tokens with a fine-tuned decoder, and score both renderings.

    tokgen train-tokenizer configs/pipeline/fsdd_transformer.toml audio_data.path=fsdd.npz name=decoder \
        tokenizer_init=RUN_DIR/tokenizer tokenizer.train_decoder_only=true tokenizer.si_snr_weight=1
    python benchmarks/decoder_swap_eval.py configs/pipeline/fsdd_transformer.toml RUN_DIR \
        runs/decoder/tokenizer audio_data.path=fsdd.npz --out swap.json

A decoder trained with `tokenizer.train_decoder_only` keeps its codec's encoder and codebooks, so
the run's tokens and prior still fit it; this script checks that tensor by tensor. The run's
evaluation samples (`samples/eval_samples.safetensors`) are decoded twice, by the run's own
tokenizer and by the given one, and the run's spoken-digit classifier scores both, as `tokgen eval`
does: the same generated tokens, two decoders. Pass the config and overrides the run was made with.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines import audio_eval
from pipelines.audio_data import load_audio_dataset
from pipelines.audio_stages import decode_audio_tokens, silence_after
from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config
from pipelines.tokenset import read_manifest
from tokenizers_vq import load_tokenizer
from tokenizers_vq.checkpoint import WEIGHTS_NAME

try:
    from benchmarks.audio_codec_eval import machine, save_record, test_split
except ImportError:  # run as a script, `python benchmarks/decoder_swap_eval.py`
    from audio_codec_eval import machine, save_record, test_split


def tokens_differ(run_tokenizer: Path, other_tokenizer: Path) -> list[str]:
    """Names of the tensors outside the decoder that differ (or exist in one only): empty when the two
    codecs turn every clip into the same tokens."""
    first, second = load_file(run_tokenizer / WEIGHTS_NAME), load_file(other_tokenizer / WEIGHTS_NAME)
    names = sorted(name for name in first.keys() | second.keys() if not name.startswith("decoder."))
    return [name for name in names
            if name not in first or name not in second or not torch.equal(first[name], second[name])]


def score_decoders(config, run_dir: Path, tokenizer_dirs: dict[str, Path], device: str = "cpu") -> dict:
    """Class accuracy (by class too) and Frechet distance of the run's evaluation samples, decoded by each
    of `tokenizer_dirs` ({name: folder}), scored by the run's classifier."""
    manifest = read_manifest(run_dir / "tokens")
    stored = load_file(str(run_dir / "samples" / "eval_samples.safetensors"))
    data = load_audio_dataset(config.audio_data)
    classifier, _ = audio_eval.dataset_audio_classifier(run_dir / "classifier", data, config.audio.classifier, device)
    features = partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=manifest.sample_rate)
    test_waveforms, _, test_labels = test_split(data)
    test_features = features(test_waveforms)
    scores = {}
    for name, folder in tokenizer_dirs.items():
        tokenizer = load_tokenizer(folder).eval().to(device)
        clips = silence_after(decode_audio_tokens(tokenizer, stored["input_ids"], manifest), stored["num_samples"])
        generator = torch.Generator().manual_seed(config.seed)  # the same Frechet subsample for every decoder
        scores[name] = audio_eval.classifier_metrics(classifier, features(clips), stored["label"], test_features,
                                                     test_labels, generator)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run config the run was made with")
    parser.add_argument("run_dir", help="a finished audio run (tokenizer/, tokens/, samples/, classifier/)")
    parser.add_argument("tokenizer", help="the tokenizer folder with the other decoder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    parser.add_argument("--threads", type=int, default=1)
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)
    run_dir, other = Path(args.run_dir), Path(args.tokenizer)
    differ = tokens_differ(run_dir / "tokenizer", other)
    if differ:
        raise SystemExit(f"{other} does not give the tokens of {run_dir / 'tokenizer'}: {len(differ)} tensors outside "
                         f"the decoder differ, e.g. {', '.join(differ[:3])}")
    config = load_run_config(args.config, args.overrides)
    scores = score_decoders(config, run_dir, {"run_decoder": run_dir / "tokenizer", "other_decoder": other})
    record = {"config": args.config, "run_dir": str(run_dir), "tokenizer": str(other), "overrides": args.overrides,
              "machine": machine(args), "metrics": scores}
    print(json.dumps(record, indent=2, default=float))
    save_record(record, args.out)


if __name__ == "__main__":
    main()
