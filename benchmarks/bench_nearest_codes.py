"""Time and peak memory of VQ's nearest-code search alone (`tokenizers_vq.quantizers.vq.nearest_codes`).

    python benchmarks/bench_nearest_codes.py [--tokens 65536] [--codes 16384] [--dim 256] [--out F]
    python benchmarks/bench_nearest_codes.py --chunk-entries 0   # the whole (n k) matrix at once

The search holds at most `chunk_entries` distances at a time (default: the library's
NEAREST_CODES_CHUNK_ENTRIES); `--chunk-entries 0` searches all rows in one piece, as the code did
before the chunking. Peak memory is CUDA's max_memory_allocated on a GPU and the growth of the
process's peak RSS on the CPU (run each setting in a fresh process: RSS peaks never go down).
Prints what it measured and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from tokenizers_vq.quantizers.vq import NEAREST_CODES_CHUNK_ENTRIES, nearest_codes


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-entries", type=int, default=NEAREST_CODES_CHUNK_ENTRIES,
                        help="distances held at once; 0: all rows in one piece")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    vectors = torch.randn(args.tokens, args.dim, device=device, generator=generator)
    codebook = torch.randn(args.codes, args.dim, device=device, generator=generator)
    chunk_entries = args.chunk_entries or args.tokens * args.codes

    def search():
        indices = nearest_codes(vectors, codebook, chunk_entries=chunk_entries)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return indices

    nearest_codes(vectors[:256], codebook, chunk_entries=chunk_entries)  # warm-up off the measured peak
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**30
    else:
        baseline = peak_rss_gib()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        indices = search()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    record = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "tokens": args.tokens, "codes": args.codes, "dim": args.dim, "chunk_entries": chunk_entries,
        "median_seconds": sorted(seconds)[len(seconds) // 2], "added_peak_memory_gib": peak - baseline,
        "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth",
        "index_checksum": int(indices.sum()),
    }
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
