"""Sampling time per image of the pixel baselines: each model's own sampler beside the generic one.

    python benchmarks/bench_baseline_sampling.py --out benchmarks/results/baseline_sampling_cpu.json

The generic sampler (`AutoregressiveDensityModel.decode`) recomputes every conditional from the
tokens, one network pass per position; MADE and NADE carry a running pre-activation instead. Both
are timed on the same model, the same images and the same generator, and the draws are checked to
be equal. Sizes are binarized MNIST's (784 binary pixels) and the full compare config's (MADE: 4000
hidden units with direct connections; NADE: 500). Weights are random: the cost does not depend on
them.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from priors.baselines import MADE, NADE, AutoregressiveDensityModel, MADEConfig, NADEConfig
from priors.sampling import SamplingOptions

try:  # run as `python benchmarks/bench_baseline_sampling.py` or as a module
    from benchmarks.timing import measure
except ImportError:
    from timing import measure


def build(kind: str, num_masks: int = 1) -> torch.nn.Module:
    if kind == "made":
        config = MADEConfig(vocab_size=2, seq_len=784, hidden_sizes=(4000,), direct_connections=True, num_masks=num_masks)
        model = MADE(config)
    else:
        model = NADE(NADEConfig(vocab_size=2, seq_len=784, hidden_size=500))
    with torch.no_grad():  # random, non-zero everywhere (the direct term starts at zero)
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def time_sampler(model, images: int, generic: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """Median CPU seconds per image, and the tokens of the last run."""
    options = SamplingOptions()
    result = {}

    def run():
        generator = torch.Generator().manual_seed(1)
        if generic:
            tokens, classes, prefix_len, guided = model.prepare_sampling(images, None, None, options)
            with torch.no_grad():
                AutoregressiveDensityModel.decode(model, tokens, classes, prefix_len, guided, options, generator)
            result["tokens"] = tokens[:images]
        else:
            result["tokens"] = model.sample(images, options=options, generator=generator)

    _, cpu_seconds = measure(run, torch.device("cpu"), repeats=repeats, warmup=0)
    return cpu_seconds / images, result["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind in ("made", "nade"):
        model = build(kind)
        own, own_tokens = time_sampler(model, args.images, generic=False, repeats=args.repeats)
        generic, generic_tokens = time_sampler(model, args.images, generic=True, repeats=args.repeats)
        row = {"model": kind, "own_sampler_cpu_s_per_image": own, "generic_sampler_cpu_s_per_image": generic,
               "speedup": generic / own, "same_draws": bool(torch.equal(own_tokens, generic_tokens))}
        print(json.dumps(row))
        rows.append(row)
    # the ensemble: a component per image; with one hidden layer all images go through the positions together
    ensemble = build("made", num_masks=32)
    seconds, _ = time_sampler(ensemble, args.images * 5, generic=False, repeats=args.repeats)
    rows.append({"model": "made_32_masks", "own_sampler_cpu_s_per_image": seconds, "images": args.images * 5})
    print(json.dumps(rows[-1]))
    report = {"images": args.images, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
