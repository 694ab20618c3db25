"""How much the code search tightens a trained two-stage bound, on a random subset of a split.

    python benchmarks/two_stage_code_search.py configs/compare/binarized_mnist_cpu.toml \
        /tmp/runs/compare_binarized_mnist_cpu transformer_vq --items 500 --out search.json

`tokgen compare ... evaluation.code_search_sweeps=1` scores the whole split, which on a CPU takes
hours (sequence_length * (vocab_size - 1) decoder and prior passes per image). This scores `--items`
images drawn at random from the split (never a prefix: the test split is sorted by class) and reports
the paired gain of the searched bound over the encoder's codes with its standard error, and what that gain predicts for the
whole split: an estimate, labelled as one. Pass the compare config and overrides the run used, so
the data match.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from pipelines.cli import parse_with_trailing_overrides
from pipelines.code_search import search_codes_in_batches
from pipelines.compare import load_compare_config, prepare_dataset, split_inputs, two_stage_log_joint
from pipelines.data import load_image_dataset
from pipelines.tokenset import load_tokenset
from priors import load_prior
from tokenizers_vq import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the compare config the run used")
    parser.add_argument("directory", help="the comparison's folder (comparison.json, models/, tokenizers/)")
    parser.add_argument("model", help="the two-stage model's name in the comparison")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen compare")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--items", type=int, default=500, help="images drawn at random from the split")
    parser.add_argument("--sweeps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    args = parse_with_trailing_overrides(parser)
    torch.set_num_threads(args.threads)

    config = load_compare_config(args.config, args.overrides)
    directory = Path(args.directory)
    rows = {row["name"]: row for row in json.loads((directory / "comparison.json").read_text())["models"]}
    if args.model not in rows:
        raise SystemExit(f"{directory / 'comparison.json'} has no model {args.model!r}; it has {sorted(rows)}")
    tokenizer_dir = directory / "tokenizers" / rows[args.model]["tokenizer_folder"]
    tokenizer = load_tokenizer(tokenizer_dir / "tokenizer").eval()
    tokenset = load_tokenset(tokenizer_dir / "tokens", tokenizer_dir=tokenizer_dir / "tokenizer")
    prior = load_prior(directory / "models" / args.model / "prior").eval()
    manifest = tokenset.manifest
    dataset = prepare_dataset(load_image_dataset(config.data), config.binarize, config.conditional)
    tokens, labels, images = split_inputs(tokenset, dataset, args.split, config, args.model)
    chosen = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(args.seed))[: args.items]

    started = time.perf_counter()
    result = search_codes_in_batches(two_stage_log_joint(tokenizer, prior, manifest), images[chosen], tokens[chosen],
                                     None if labels is None else labels[chosen], manifest.vocab_size, args.sweeps,
                                     args.batch_size, "cpu")
    seconds = time.perf_counter() - started
    gain = result.log_sum_joint - result.start_log_joint
    row, prefix = rows[args.model], "" if args.split == "test" else "val_"
    # The encoder's bound: a row scored with the search on has it apart from its (searched) NLL.
    whole_split = row.get(f"{prefix}encoder_bound_nats", row.get(f"{prefix}nll_nats_per_image"))
    figures = {
        "model": args.model, "split": args.split, "items": len(chosen), "split_items": len(tokens),
        "sweeps": args.sweeps, "sequence_length": manifest.sequence_length, "vocab_size": manifest.vocab_size,
        "encoder_bound_nats": -result.start_log_joint.mean().item(),
        "best_searched_code_nats": -result.log_joint.mean().item(),
        "searched_bound_nats": -result.log_sum_joint.mean().item(),  # what compare reports: the sum over codes scored
        "gain_nats": gain.mean().item(),
        "gain_standard_error": (gain.std() / math.sqrt(len(gain))).item() if len(gain) > 1 else None,
        "changed_tokens_per_image": result.changed_positions.double().mean().item(),
        "seconds_per_image": seconds / len(chosen),
        "whole_split_encoder_bound_nats": whole_split,
        "whole_split_searched_bound_estimate_nats": None if whole_split is None else whole_split - gain.mean().item(),
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
