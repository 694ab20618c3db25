"""Peak memory and time of exporting FSDD audio tokens with shifted train copies (`audio.train_shifted_copies`).

    python benchmarks/export_memory.py --fsdd ../shared/data/fsdd.npz --copies 15 \
        [--out benchmarks/results/fsdd_token_augmentation/export_memory.json]

Loads FSDD as configs/pipeline/fsdd_cpu.toml does (0.75 s clips), builds an untrained codec of that
config's shape (memory and time do not depend on the weights), and runs `export_audio_tokens` once.
Peak memory is the process's peak resident set (ru_maxrss, Linux), read before and after the export;
the difference is what the export added on top of the loaded data. Run it in a fresh process per figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from pipelines.audio_data import AudioDataConfig, load_audio_dataset
from pipelines.tokenset import export_audio_tokens, load_tokenset
from tokenizers_vq.audio import AudioVQVAE, AudioVQVAEConfig
from tokenizers_vq.quantizers import ResidualVQConfig, VQConfig


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fsdd", default="../shared/data/fsdd.npz")
    parser.add_argument("--copies", type=int, default=15)
    parser.add_argument("--hidden-channels", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_audio_dataset(AudioDataConfig(source="fsdd", path=args.fsdd, sample_rate=8000, clip_seconds=0.75,
                                              val_fraction=0.05, peak_level=0.9))
    codec = AudioVQVAE(AudioVQVAEConfig(
        hidden_channels=args.hidden_channels, strides=(4, 4, 5), embedding_dim=32,
        quantizer=ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=256)))).eval()
    with tempfile.TemporaryDirectory() as scratch:
        codec.save_pretrained(f"{scratch}/tokenizer")
        before, start = peak_mib(), time.perf_counter()
        export_audio_tokens(codec, f"{scratch}/tokenizer", data, f"{scratch}/tokens", progress=False,
                            train_shifted_copies=args.copies, max_shift_samples=400, seed=0)
        seconds, after = time.perf_counter() - start, peak_mib()
        train_rows = load_tokenset(f"{scratch}/tokens").manifest.split_sizes["train"]
    result = {
        "benchmark": "export_memory", "copies": args.copies, "hidden_channels": args.hidden_channels,
        "train_clips": len(data.train.waveforms), "train_rows": train_rows,
        "peak_rss_before_export_mib": round(before), "peak_rss_after_export_mib": round(after),
        "added_by_export_mib": round(after - before), "export_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
