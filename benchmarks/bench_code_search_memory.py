"""What the allocator costs the audio code search on the CPU: window decodes at several batch sizes, with
glibc's default thresholds and with freed memory kept for reuse (`pipelines/cpu_memory.py`).

    python benchmarks/bench_code_search_memory.py RUN/fsdd_cpu/tokenizer --windows 1024 --out memory.json

The search (`tokenizers_vq/audio_code_search.py`) decodes each candidate code in a window of
`4 x reach + 1` frames; this decodes `--windows` such windows of random codes with the given tokenizer
(trained or not: the time does not depend on the weights), `--batch-sizes` at a time. Each setting runs in
a fresh process, as the allocator's settings hold for a whole process, and reports its wall time and the
user and system CPU time it spent: system time is the kernel handing out fresh zeroed pages.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_codec_eval import machine, save_record


def decode_windows(tokenizer_dir: str, windows: int, batch_size: int, keep: bool, threads: int) -> dict:
    """Time `windows` window decodes, `batch_size` at a time, after one warm-up batch (in this process)."""
    from pipelines.cpu_memory import keep_freed_memory
    from tokenizers_vq import load_tokenizer
    from tokenizers_vq.audio_code_search import from_grid

    torch.set_num_threads(threads)
    kept = keep_freed_memory() if keep else False
    tokenizer = load_tokenizer(tokenizer_dir).eval()
    width = 4 * tokenizer.decoder_reach_frames + 1
    codes = from_grid(torch.randint(0, tokenizer.quantizer.codebook_size, (batch_size, width, tokenizer.num_codebooks),
                                    generator=torch.Generator().manual_seed(0)), tokenizer.num_codebooks)
    batches = max(1, windows // batch_size)
    with torch.no_grad():
        tokenizer.decode(codes)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(batches):
            tokenizer.decode(codes)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"batch_size": batch_size, "keep_freed_memory": keep, "setting_took": kept, "windows": batches * batch_size,
            "window_frames": width, "wall_seconds": wall, "user_seconds": after.ru_utime - before.ru_utime,
            "system_seconds": after.ru_stime - before.ru_stime}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="a tokenizer folder (config.json + model.safetensors)")
    parser.add_argument("--windows", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one setting, in its own process
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(decode_windows(args.tokenizer, args.windows, args.batch_sizes[0], args.keep, args.threads)))
        return
    record = {"tokenizer": args.tokenizer, "machine": machine(args), "date": datetime.date.today().isoformat(),
              "settings": []}
    for batch_size in args.batch_sizes:
        for keep in (False, True):
            command = [sys.executable, str(Path(__file__).resolve()), args.tokenizer, "--child", "--windows",
                       str(args.windows), "--batch-sizes", str(batch_size), "--threads", str(args.threads)]
            done = subprocess.run(command + (["--keep"] if keep else []), capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            record["settings"].append(figures)
            print(f"batch {batch_size:>4}, freed memory {'kept    ' if keep else 'returned'}: "
                  f"{figures['wall_seconds']:6.2f} s for {figures['windows']} windows of {figures['window_frames']} "
                  f"frames (user {figures['user_seconds']:.2f} s, system {figures['system_seconds']:.2f} s)",
                  flush=True)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
