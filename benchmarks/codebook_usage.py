"""Codebook health at scale: test-split usage, perplexity, PSNR and SSIM of quantizers on CIFAR-10.

    # the issue's grid, on a GPU (about 10,000 test images x 64 tokens = 640,000 test tokens)
    python benchmarks/codebook_usage.py --data /work/shared/data/cifar10_jpeg.npz --device cuda --bf16 \
        --steps 5000 --out benchmarks/results/codebook_usage.json
    # a CPU check of the script itself (numbers far from converged)
    python benchmarks/codebook_usage.py --quantizers vq1024 lfq10 --steps 100 --train-images 2000 --batch-size 32

Issue 3's targets: >= 99% of the codebook used by the test split's tokens for VQ with k-means
initialisation and dead-code restarts (van den Oord et al. 2017; Dhariwal et al. 2020, "Jukebox")
at 1024 and 16384 codes, and for lookup-free quantization (Yu et al. 2024, "Language Model Beats
Diffusion: Tokenizer is Key to Visual Generation", MAGVIT-v2) at 2^10, 2^14 and 2^16 codes. Every
case trains the same small autoencoder, tokgen's `Encoder2d` -> quantizer -> `Decoder2d` (32x32
images -> 8x8 tokens), from the same seed on the same batches with Adam on MSE + the quantizer's
loss; only the quantizer changes. Then the test images are encoded and decoded in eval mode: usage,
perplexity and dead codes of the test tokens (`pipelines.evaluate.codebook_metrics`), PSNR and SSIM
of the reconstructions (`pipelines.evaluate.reconstruction_metrics`). Usage has a sampling ceiling:
N test tokens can use at most N codes, and a perfectly uniform code distribution over K codes still
leaves about K exp(-N/K) unused, so large codebooks need the whole test split. The data are the
JPEG re-encodings of CIFAR-10 (lossy; `pipelines.data` source "cifar10_jpeg").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pipelines.data import DataConfig, load_image_dataset, to_tensor_images
from pipelines.evaluate import codebook_metrics, reconstruction_metrics
from tokenizers_vq.nets.conv2d import Decoder2d, Encoder2d
from tokenizers_vq.quantizers import LFQConfig, VQConfig, build_quantizer

# name -> (kind, size): VQ cases are "vq<codes>", LFQ cases "lfq<bits>".
CASES = {"vq1024": ("vq", 1024), "vq16384": ("vq", 16384), "lfq10": ("lfq", 10), "lfq14": ("lfq", 14),
         "lfq16": ("lfq", 16), "lfq18": ("lfq", 18)}


def quantizer_config(name: str, args, tokens_per_batch: int):
    """The quantizer config of case `name` and the latent dimension the encoder must produce."""
    kind, size = CASES[name]
    if kind == "lfq":
        return LFQConfig(bits=size, entropy_weight=args.entropy_weight, commitment_weight=0.25,
                         exact_entropy_max_bits=args.lfq_exact_entropy_max_bits,
                         entropy_subsample=args.lfq_entropy_subsample), size
    # Restart threshold in assignments per batch: a code is dead when it gets fewer than half the
    # average share of a batch (capped at 1), so 16384 codes on 16384 tokens do not restart half the book.
    threshold = args.dead_code_threshold or min(1.0, 0.5 * tokens_per_batch / size)
    config = VQConfig(codebook_size=size, commitment_weight=0.25, ema=True, decay=args.decay,
                      dead_code_threshold=threshold, kmeans_init=True, use_cosine=args.vq_cosine,
                      codebook_dim=args.vq_codebook_dim, rotation_trick=args.vq_rotation_trick)
    return config, args.vq_dim


class Autoencoder(nn.Module):
    """(b 3 32 32) in [-1, 1] -> 8x8 tokens -> reconstruction; the quantizer is the only variable."""

    def __init__(self, quantizer_cfg, latent_dim: int, hidden_channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)  # identical encoder/decoder initialisation in every case
        sizes = dict(hidden_channels=hidden_channels, channel_multipliers=(1, 2), num_res_blocks=1)
        self.encoder = Encoder2d(in_channels=3, out_channels=latent_dim, **sizes)
        self.quantizer = build_quantizer(quantizer_cfg, latent_dim)
        self.decoder = Decoder2d(in_channels=latent_dim, out_channels=3, **sizes)

    def forward(self, images: torch.Tensor):
        latents = self.encoder(images)
        height = latents.shape[-2]
        output = self.quantizer(rearrange(latents, "b d h w -> b (h w) d"))
        reconstruction = self.decoder(rearrange(output.quantized, "b (h w) d -> b d h w", h=height))
        return reconstruction, output

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode encode -> indices (b (h w)) -> decode, as a tokenizer's encode/decode would."""
        latents = self.encoder(images)
        height = latents.shape[-2]
        indices = self.quantizer.to_indices(rearrange(latents, "b d h w -> b (h w) d"))
        codes = self.quantizer.lookup(indices).to(latents.dtype)
        return self.decoder(rearrange(codes, "b (h w) d -> b d h w", h=height)), indices


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_and_evaluate(name: str, train_images: np.ndarray, test_images: np.ndarray, args,
                       device: torch.device) -> dict:
    tokens_per_batch = args.batch_size * 64
    config, latent_dim = quantizer_config(name, args, tokens_per_batch)
    model = Autoencoder(config, latent_dim, args.hidden_channels, args.seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_pixels = torch.from_numpy(train_images).to(device)  # uint8 (n h w c), converted per batch
    generator = torch.Generator().manual_seed(args.seed)  # same batches in every case
    order = torch.randperm(len(train_pixels), generator=generator)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    step_seconds, position, started = [], 0, time.perf_counter()
    model.train()
    for step in range(args.steps):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(train_pixels), generator=generator), 0
        rows = order[position : position + args.batch_size].to(device)
        position += args.batch_size
        batch = rearrange(train_pixels[rows], "b h w c -> b c h w").float() / 127.5 - 1.0
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(**autocast):
            reconstruction, output = model(batch)
        loss = F.mse_loss(reconstruction.float(), batch) + output.aux_loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: loss is {loss.item()} at step {step}")
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"{name} step {step + 1}/{args.steps}: loss {loss.item():.4f}, batch usage "
                  f"{float(output.metrics['usage']):.4f}, dead {float(output.metrics['dead_codes']):.0f}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    train_seconds = time.perf_counter() - started

    model.eval()
    originals = to_tensor_images(test_images)
    reconstructions, indices = [], []
    with torch.autocast(**autocast):
        for chunk in originals.split(args.eval_batch_size):
            reconstruction, chunk_indices = model.reconstruct(chunk.to(device))
            reconstructions.append(reconstruction.float().clamp(-1.0, 1.0).cpu())
            indices.append(chunk_indices.cpu())
    indices = torch.cat(indices)
    codebook = codebook_metrics(indices, model.quantizer.codebook_size)
    quality = reconstruction_metrics(originals, torch.cat(reconstructions))
    return {
        "quantizer": dataclasses.asdict(config),
        "codebook_size": model.quantizer.codebook_size,
        "test_tokens": indices.numel(),
        "test_usage": codebook["usage"], "test_perplexity": codebook["perplexity"],
        "test_dead_codes": codebook["dead_codes"],
        # the best usage a uniform code distribution reaches with this many test tokens
        "usage_ceiling_uniform": 1.0 - math.exp(-indices.numel() / model.quantizer.codebook_size),
        "test_psnr_db": quality["psnr"], "test_ssim": quality["ssim"], "test_mse": quality["mse"],
        "final_train_loss": loss.item(),
        "final_train_batch_usage": float(output.metrics["usage"]),
        "train_step_ms_median": 1e3 * statistics.median(step_seconds[min(2, len(step_seconds) - 1):]),
        "train_seconds": train_seconds,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10_jpeg.npz"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codebook_usage.json"))
    parser.add_argument("--quantizers", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training and evaluation")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    # 200 images = 12,800 tokens: the (tokens x 16384) float32 distance matrix stays under 1 GiB
    parser.add_argument("--eval-batch-size", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=0, help="0: all 50,000 (class-balanced subset otherwise)")
    parser.add_argument("--test-images", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--hidden-channels", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vq-dim", type=int, default=32, help="latent dimension of the VQ cases")
    parser.add_argument("--vq-codebook-dim", type=int, default=0, help="> 0: factorised VQ codes (LlamaGen)")
    parser.add_argument("--vq-cosine", action="store_true", help="l2-normalised VQ codes (LlamaGen)")
    parser.add_argument("--vq-rotation-trick", action="store_true",
                        help="the rotation trick in place of the straight-through gradient (Fifty et al. 2024)")
    parser.add_argument("--decay", type=float, default=0.99, help="VQ EMA decay")
    parser.add_argument("--dead-code-threshold", type=float, default=0.0,
                        help="VQ restart threshold; 0: min(1, half the mean assignments per code per batch)")
    parser.add_argument("--entropy-weight", type=float, default=0.1, help="LFQ entropy loss weight")
    parser.add_argument("--lfq-exact-entropy-max-bits", type=int, default=LFQConfig.exact_entropy_max_bits,
                        help="LFQ codebook entropy over the full softmax up to this many bits, bit groups above")
    parser.add_argument("--lfq-entropy-subsample", type=float, default=1.0,
                        help="fraction of each batch's tokens in the LFQ entropy terms (cheaper on CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--log-every", type=int, default=50, help="progress line every this many steps (0: none)")
    parser.add_argument("--note", default="", help="free text recorded in the JSON (e.g. the machine's load)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    dataset = load_image_dataset(DataConfig(source="cifar10_jpeg", path=str(args.data), val_fraction=0.0,
                                            max_train=args.train_images, max_test=args.test_images, seed=args.seed))
    print(f"CIFAR-10 decoded in {time.perf_counter() - started:.1f} s: train {len(dataset.train)}, "
          f"test {len(dataset.test)} images", flush=True)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    results = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.quantizers:
        results[name] = train_and_evaluate(name, dataset.train.images, dataset.test.images, args, device)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'quantizer'})}", flush=True)
        # Written after every case, so that an interrupted grid keeps the cases it finished.
        report = {"settings": {**vars(args), "data": str(args.data), "out": str(args.out)},
                  "device": device_name, "torch": torch.__version__, "train_images": len(dataset.train),
                  "test_images": len(dataset.test), "results": results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'case':<9}{'codes':>7}{'usage':>8}{'ceiling':>9}{'perplex.':>10}{'dead':>7}{'PSNR dB':>9}"
          f"{'SSIM':>7}{'step ms':>9}")
    for name, row in results.items():
        print(f"{name:<9}{row['codebook_size']:>7}{row['test_usage']:>8.4f}{row['usage_ceiling_uniform']:>9.4f}"
              f"{row['test_perplexity']:>10.1f}{row['test_dead_codes']:>7.0f}{row['test_psnr_db']:>9.2f}"
              f"{row['test_ssim']:>7.3f}{row['train_step_ms_median']:>9.1f}")
    print(f"{args.steps} steps of {args.batch_size} images on {device_name}{' (bf16)' if args.bf16 else ''}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
