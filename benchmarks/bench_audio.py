"""Audio tokenizer encode/decode speed in seconds of audio per second, CUDA bf16 when available, else CPU.

    python benchmarks/bench_audio.py [--out benchmarks/results/bench_audio_cpu.json] [--quick]

Times `encode` (waveform -> codes) and `decode` (codes -> waveform) of the audio VQ-VAE at 8 kHz,
hop 80 (100 frames/s), 2 x 256-code residual VQ = 1.6 kbps, for two widths: the CPU config's
(hidden_channels 8, configs/pipeline/fsdd_cpu.toml) and the GPU configs' (64,
fsdd_transformer.toml), with the configs' Snake activation (`--activation elu` for the old one).
Batches of 1 s clips, plus one long clip through `encode_chunked` / `decode_chunked` (1 s windows
with full-context overlap), with warm-up and device syncs, median of several repeats. Weights are
random: speed does not depend on them. "x real time" is seconds of audio per second of compute.
Without CUDA it runs small sizes on the CPU and says so; the default output file is named after
the device (bench_audio_cpu.json / bench_audio_cuda.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tokenizers_vq.audio import AudioVQVAE, AudioVQVAEConfig
from tokenizers_vq.nets.conv1d import ACTIVATIONS

try:
    from benchmarks.timing import timed
except ImportError:  # run as a script, `python benchmarks/bench_audio.py`
    from timing import timed

SAMPLE_RATE = 8000
WIDTHS = {"fsdd_cpu": 8, "fsdd_gpu": 64}


def bench_width(name: str, hidden_channels: int, device: torch.device, batch_size: int, long_seconds: float,
                repeats: int, activation: str) -> dict:
    config = AudioVQVAEConfig(hidden_channels=hidden_channels, embedding_dim=32 if hidden_channels < 32 else 64,
                              sample_rate=SAMPLE_RATE, activation=activation)
    model = AudioVQVAE(config).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    clips = 0.1 * torch.randn(batch_size, 1, SAMPLE_RATE, device=device, generator=generator)
    long_clip = 0.1 * torch.randn(1, 1, round(long_seconds * SAMPLE_RATE), device=device, generator=generator)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def autocast():  # quantizer distances stay fp32 inside (tokenizers_vq), the convolutions run in bf16
        return torch.autocast(device.type, dtype=dtype, enabled=cuda)

    with autocast():
        tokens = model.encode(clips)
        long_tokens = model.encode_chunked(long_clip, chunk_seconds=1.0)

    def encode():
        with autocast():
            model.encode(clips)

    def decode():
        with autocast():
            model.decode(tokens)

    def encode_long():
        with autocast():
            model.encode_chunked(long_clip, chunk_seconds=1.0)

    def decode_long():
        with autocast():
            model.decode_chunked(long_tokens, chunk_frames=SAMPLE_RATE // model.hop_length)

    batch_audio = batch_size * 1.0
    return {
        "model": name, "hidden_channels": hidden_channels, "activation": activation,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hop_length": model.hop_length, "bitrate_bps": SAMPLE_RATE / model.hop_length * 2 * 8,
        "batch_size": batch_size, "clip_seconds": 1.0, "long_clip_seconds": long_seconds, "dtype": str(dtype)[6:],
        "encode_x_real_time": batch_audio / timed(encode, device, repeats),
        "decode_x_real_time": batch_audio / timed(decode, device, repeats),
        "encode_chunked_x_real_time": long_seconds / timed(encode_long, device, repeats),
        "decode_chunked_x_real_time": long_seconds / timed(decode_long, device, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench_audio_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="force the small CPU sizes")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="snake",
                        help="the codec's activation (the FSDD configs use snake)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    sizes = dict(batch_size=256, long_seconds=600.0, repeats=10) if cuda else \
        dict(batch_size=8, long_seconds=10.0, repeats=3)
    results = [bench_width(name, width, device, activation=args.activation, **sizes) for name, width in WIDTHS.items()]
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "note": "" if cuda else "no CUDA device: small CPU sizes, fp32; not a GPU figure",
        "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    out = args.out or Path("benchmarks/results") / f"bench_audio_{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    columns = ("encode_x_real_time", "decode_x_real_time", "encode_chunked_x_real_time", "decode_chunked_x_real_time")
    print(f"{report['device']}  {report['note']}")
    print(f"{'model':<10}{'params':>10}" + "".join(f"{c.replace('_x_real_time', ''):>18}" for c in columns))
    for row in results:
        print(f"{row['model']:<10}{row['parameters']:>10}" + "".join(f"{row[c]:>18.1f}" for c in columns))
    print(f"wrote {out}  (x real time = seconds of audio per second)")


if __name__ == "__main__":
    main()
