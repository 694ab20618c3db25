"""Tokenizer encode/decode throughput (images/s) of the VQ-VAE, CUDA bf16 when available, else CPU.

    python benchmarks/bench_tokenizer.py --out benchmarks/results/tokenizer.json [--quick]

Times `encode` (image -> tokens) and `decode` (tokens -> image) with warm-up and device syncs,
median of several repeats. On a machine without CUDA it runs small sizes on the CPU and says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tokenizers_vq.quantizers.vq import VQConfig
from tokenizers_vq.vqvae import VQVAE, VQVAEConfig

try:
    from benchmarks.timing import timed
except ImportError:  # run as a script, `python benchmarks/bench_tokenizer.py`
    from timing import timed


def bench_tokenizer(device: torch.device, batch_size: int, image_size: int, channels: int, hidden_channels: int,
                    repeats: int, compile_model: bool) -> dict:
    config = VQVAEConfig(in_channels=channels, hidden_channels=hidden_channels, channel_multipliers=(1, 2),
                         num_res_blocks=2, embedding_dim=64, quantizer=VQConfig(codebook_size=512))
    model = VQVAE(config).to(device).eval()
    images = torch.rand(batch_size, channels, image_size, image_size, device=device) * 2 - 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encode, decode = model.encode, model.decode
    if compile_model:
        encode, decode = torch.compile(model.encode), torch.compile(model.decode)

    def run_encode():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return encode(images)

    tokens = run_encode()

    def run_decode():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return decode(tokens)

    encode_seconds = timed(run_encode, device, repeats)
    decode_seconds = timed(run_decode, device, repeats)
    return {
        "model": "vqvae", "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch_size, "image_shape": [channels, image_size, image_size],
        "token_grid": list(tokens.shape[1:]), "dtype": str(dtype).replace("torch.", ""), "compiled": compile_model,
        "encode_images_per_second": batch_size / encode_seconds,
        "decode_images_per_second": batch_size / decode_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tokenizer.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--compile", action="store_true", help="torch.compile encode/decode (CUDA)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    sizes = dict(batch_size=1024, image_size=32, channels=3, hidden_channels=128, repeats=20) if cuda else \
        dict(batch_size=64, image_size=28, channels=1, hidden_channels=64, repeats=5)
    result = bench_tokenizer(device, compile_model=args.compile and cuda, **sizes)
    result.update({
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "note": "" if cuda else "no CUDA device: small CPU sizes; not a GPU figure",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'metric':<28}{'value':>14}")
    for key in ("device", "batch_size", "image_shape", "token_grid", "dtype",
                "encode_images_per_second", "decode_images_per_second"):
        value = result[key]
        print(f"{key:<28}{value:>14.1f}" if isinstance(value, float) else f"{key:<28}{str(value):>14}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
