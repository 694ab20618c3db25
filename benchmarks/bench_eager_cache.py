"""Eager sampling with a preallocated (static) KV cache against a growing (dynamic) one, on finished runs.

    python benchmarks/bench_eager_cache.py runs/mnist_cpu runs/fsdd_cpu --num 1000 --threads 2 --out cache.json

Without `torch.compile` (every CPU run, and CUDA with `compile_sampling` off) the transformer prior
decodes token by token eagerly. transformers' `DynamicCache` appends each step's keys and values by
concatenation, copying the whole cache every step; a `StaticCache` writes them in place. For each
run's prior this draws `--num` class-conditional sequences under guidance (the sample stage's
setting) with each cache from the same seed, after a small warm-up draw with each, `--repeats` times in
alternation, and reports the best seconds and tokens per second of each, and
how many sequences both drew alike: the two caches sum attention in another order, so a draw that
falls on a rounding edge may differ, and the sequence goes its own way from there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import transformers

from priors import SamplingOptions, load_prior

try:
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_codec_eval import machine, save_record


def draw(prior, make_cache, num: int, guidance: float) -> tuple[float, torch.Tensor]:
    """`prior.sample` of `num` guided class-conditional sequences, eagerly, with the KV caches `make_cache` makes."""
    labels = torch.arange(num) % prior.config.num_classes if prior.config.num_classes else None
    prior.new_kv_cache = make_cache  # the sampler asks the prior for its cache: this instance's, for the test
    start = time.perf_counter()
    tokens = prior.sample(num, label=labels, options=SamplingOptions(guidance_scale=guidance),
                          generator=torch.Generator().manual_seed(0), compile=False)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished runs with a transformer prior")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {"machine": machine(args), "date": datetime.date.today().isoformat(), "num": args.num,
              "guidance": args.guidance, "runs": {}}
    for run in args.runs:
        prior = load_prior(run / "prior").eval()
        own_cache = prior.new_kv_cache  # the static one, before `draw` swaps it
        caches = {"static": own_cache, "dynamic": transformers.DynamicCache}
        for make in caches.values():  # warm-up: the first draw of a process pays for allocations the rest reuse
            draw(prior, make, 16, args.guidance)
        timings, drawn = {name: [] for name in caches}, {}
        for _ in range(args.repeats):  # alternating, the best of each kept
            for name, make in caches.items():
                seconds, drawn[name] = draw(prior, make, args.num, args.guidance)
                timings[name].append(seconds)
        static_seconds, dynamic_seconds = min(timings["static"]), min(timings["dynamic"])
        static, dynamic = drawn["static"], drawn["dynamic"]
        tokens = args.num * prior.config.seq_len
        result = {"sequence_length": prior.config.seq_len, "dynamic_seconds": dynamic_seconds,
                  "static_seconds": static_seconds, "dynamic_tokens_per_second": tokens / dynamic_seconds,
                  "static_tokens_per_second": tokens / static_seconds, "speedup": dynamic_seconds / static_seconds,
                  "same_tokens": bool(torch.equal(dynamic, static)),
                  "identical_sequences": float((dynamic == static).all(dim=1).float().mean())}
        record["runs"][str(run)] = result
        print(f"{run}: {args.num} x {prior.config.seq_len} tokens, dynamic {dynamic_seconds:.2f} s, static "
              f"{static_seconds:.2f} s ({result['speedup']:.2f}x), identical sequences: "
              f"{100 * result['identical_sequences']:.1f}%")
    save_record(record, args.out)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
