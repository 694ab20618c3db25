"""tokgen's quantizers against lucidrains/vector-quantize-pytorch in the same tiny autoencoder on CIFAR-10.

    python -m venv /tmp/vqp && /tmp/vqp/bin/pip install torch vector-quantize-pytorch einops pillow numpy
    PYTHONPATH=/work/main /tmp/vqp/bin/python benchmarks/compare_vector_quantize_pytorch.py \
        --data /work/shared/data/cifar10_jpeg.npz --steps 200 --seeds 0 1 2 --out benchmarks/results/compare_vqp.json

Trains four autoencoders that differ only in the quantizer: tokgen `VectorQuantizer` vs
`vector_quantize_pytorch.VectorQuantize`, and tokgen `LookupFreeQuantizer` vs
`vector_quantize_pytorch.LFQ`, each pair with the same hyperparameters (EMA decay, commitment and
entropy weights, dead-code threshold, straight-through gradients). Encoder and decoder are
tokgen's `Encoder2d`/`Decoder2d` built from the same seed, trained with the same optimizer on the
same batches of CIFAR-10 (JPEG re-encodings, decoded with Pillow). Reported on held-out test
images: codebook usage and perplexity over the whole held-out set, PSNR of the reconstructions;
and the median time of the quantizer's forward pass in training and of a whole training step.
With `--seeds`, every seed draws its own images, batches and initial weights; the table gives the
means (and medians of the times), the JSON every seed's row too.
`vector-quantize-pytorch` is imported here only: it is not a tokgen dependency.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from tokenizers_vq.nets.conv2d import Decoder2d, Encoder2d
from tokenizers_vq.quantizers import LFQConfig, LookupFreeQuantizer, VectorQuantizer, VQConfig, usage_and_perplexity


def decode_jpegs(archive, split: str, indices: np.ndarray) -> torch.Tensor:
    """JPEGs `indices` of `split` -> (n 3 32 32) float32 in [-1, 1] (the data README's recipe)."""
    jpegs, offsets = archive[f"{split}_jpeg"], archive[f"{split}_offsets"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(jpegs[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                       for i in indices])
    return rearrange(torch.from_numpy(images).float() / 127.5 - 1.0, "n h w c -> n c h w")


class TokgenAdapter(nn.Module):
    """(b n d) -> (quantized, indices (b n), aux_loss) from a tokgen quantizer."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer
        self.codebook_size = quantizer.codebook_size

    def forward(self, z):
        output = self.quantizer(z)
        return output.quantized, output.indices, output.aux_loss


class VQPAdapter(nn.Module):
    """(b n d) -> (quantized, indices (b n), aux_loss) from a vector-quantize-pytorch module."""

    def __init__(self, quantizer: nn.Module, codebook_size: int):
        super().__init__()
        self.quantizer = quantizer
        self.codebook_size = codebook_size

    def forward(self, z):
        quantized, indices, aux_loss = self.quantizer(z)[:3]
        return quantized, indices.reshape(z.shape[:2]), aux_loss.sum()


def build_quantizers(args) -> dict[str, tuple[nn.Module, int]]:
    """name -> (adapter, latent dim); each pair shares every hyperparameter both libraries expose."""
    import vector_quantize_pytorch as vqp  # only here: not a tokgen dependency

    vq_common = dict(codebook_size=args.codebook_size, decay=0.99, commitment_weight=0.25)
    tokgen_vq = VectorQuantizer(VQConfig(**vq_common, ema=True, dead_code_threshold=args.dead_code_threshold,
                                         init_scale=args.vq_init_scale), args.vq_dim)
    lucid_vq = vqp.VectorQuantize(dim=args.vq_dim, **vq_common, threshold_ema_dead_code=args.dead_code_threshold,
                                  rotation_trick=args.rotation_trick)
    lfq_common = dict(entropy_weight=0.1, commitment_weight=0.25, diversity_gamma=1.0)
    tokgen_lfq = LookupFreeQuantizer(LFQConfig(bits=args.bits, entropy_temperature=0.01, **lfq_common), args.bits)
    lucid_lfq = vqp.LFQ(dim=args.bits, codebook_size=2**args.bits, entropy_loss_weight=0.1,
                        commitment_loss_weight=0.25, diversity_gamma=1.0)  # inv_temperature 100 = 1 / 0.01
    return {
        "tokgen VQ": (TokgenAdapter(tokgen_vq), args.vq_dim),
        "vqp VectorQuantize": (VQPAdapter(lucid_vq, args.codebook_size), args.vq_dim),
        "tokgen LFQ": (TokgenAdapter(tokgen_lfq), args.bits),
        "vqp LFQ": (VQPAdapter(lucid_lfq, 2**args.bits), args.bits),
    }


class Autoencoder(nn.Module):
    def __init__(self, quantizer: nn.Module, latent_dim: int, hidden_channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)  # identical encoder/decoder initialisation for every quantizer
        sizes = dict(hidden_channels=hidden_channels, channel_multipliers=(1, 2), num_res_blocks=1)
        self.encoder = Encoder2d(in_channels=3, out_channels=latent_dim, **sizes)
        self.decoder = Decoder2d(in_channels=latent_dim, out_channels=3, **sizes)
        self.quantizer = quantizer
        self.quantizer_seconds: list[float] = []

    def forward(self, x):
        latents = self.encoder(x)
        height, width = latents.shape[-2:]
        start = time.perf_counter()  # CPU: synchronous, so this is the quantizer's own time
        quantized, indices, aux_loss = self.quantizer(rearrange(latents, "b d h w -> b (h w) d"))
        self.quantizer_seconds.append(time.perf_counter() - start)
        reconstruction = self.decoder(rearrange(quantized, "b (h w) d -> b d h w", h=height, w=width))
        return reconstruction, indices, aux_loss


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(b c h w) in [-1, 1] -> (b,) PSNR in dB on [0, 1] pixels."""
    error = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / error.clamp_min(1e-10))


def train_and_evaluate(model: Autoencoder, train: torch.Tensor, test: torch.Tensor, args) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))
    step_seconds = []
    model.train()
    for step in range(args.steps):
        start = time.perf_counter()
        rows = order[(step * args.batch_size + torch.arange(args.batch_size)) % train.shape[0]]
        batch = train[rows]
        reconstruction, _, aux_loss = model(batch)
        loss = F.mse_loss(reconstruction, batch) + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
    model.eval()
    counts = torch.zeros(model.quantizer.codebook_size, dtype=torch.int64)
    psnrs = []
    with torch.no_grad():
        for start in range(0, test.shape[0], 250):
            batch = test[start:start + 250]
            reconstruction, indices, _ = model(batch)
            counts += torch.bincount(indices.flatten().long(), minlength=counts.numel())
            psnrs.append(psnr(reconstruction, batch))
    usage, perplexity = usage_and_perplexity(counts)
    quantizer_train_seconds = model.quantizer_seconds[2:args.steps]  # skip warm-up steps
    return {
        "codebook_size": model.quantizer.codebook_size,
        "held_out_usage": usage.item(), "held_out_perplexity": perplexity.item(),
        "held_out_psnr_db": torch.cat(psnrs).mean().item(), "final_train_loss": loss.item(),
        "quantizer_forward_ms": 1e3 * statistics.median(quantizer_train_seconds),
        "train_step_ms": 1e3 * statistics.median(step_seconds[2:]),
    }


def summarise(rows: list[dict]) -> dict:
    """Per-seed rows -> their means (times: medians), the spread of usage and PSNR, and the rows."""
    summary = {"codebook_size": rows[0]["codebook_size"], "seeds": len(rows)}
    for key in ("held_out_usage", "held_out_perplexity", "held_out_psnr_db", "final_train_loss"):
        summary[key] = statistics.fmean(row[key] for row in rows)
    for key in ("held_out_usage", "held_out_psnr_db"):
        summary[key + "_min"] = min(row[key] for row in rows)
        summary[key + "_max"] = max(row[key] for row in rows)
    for key in ("quantizer_forward_ms", "train_step_ms"):
        summary[key] = statistics.median(row[key] for row in rows)
    summary["per_seed"] = rows
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10_jpeg.npz"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_vector_quantize_pytorch.json"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--hidden-channels", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--vq-dim", type=int, default=32)
    parser.add_argument("--bits", type=int, default=10)
    parser.add_argument("--dead-code-threshold", type=float, default=1.0)
    parser.add_argument("--vq-init-scale", type=float, default=1.0,
                        help="tokgen VQConfig.init_scale (0.01: near-zero initial codes, about vqp's scale)")
    parser.add_argument("--rotation-trick", action="store_true", help="vqp's default estimator, not straight-through")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="several seeds: means, with every seed's row")
    parser.add_argument("--only", nargs="*", default=None, help="quantizer names to run (default: all four)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    archive = np.load(args.data, allow_pickle=False)
    seeds = args.seeds or [args.seed]
    per_seed: dict[str, list[dict]] = {}
    for seed in seeds:  # each seed draws its own images, batches and initial weights
        args.seed = seed
        generator = np.random.default_rng(seed)  # both splits are grouped by class: draw across them
        train = decode_jpegs(archive, "train", generator.permutation(len(archive["train_offsets"]) - 1)[:args.train_images])
        test = decode_jpegs(archive, "test", generator.permutation(len(archive["test_offsets"]) - 1)[:args.eval_images])
        for name, (quantizer, latent_dim) in build_quantizers(args).items():
            if args.only and name not in args.only:
                continue
            model = Autoencoder(quantizer, latent_dim, args.hidden_channels, seed)
            per_seed.setdefault(name, []).append({"seed": seed, **train_and_evaluate(model, train, test, args)})
            print(f"seed {seed} {name}: {json.dumps(per_seed[name][-1])}", flush=True)
    results = {name: summarise(rows) for name, rows in per_seed.items()}
    report = {"settings": vars(args) | {"data": str(args.data), "out": str(args.out), "seeds": seeds},
              "device": "cpu", "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "torch": torch.__version__,
              "vector_quantize_pytorch": importlib.metadata.version("vector-quantize-pytorch"),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'quantizer':<20}{'codes':>7}{'usage':>8}{'(min)':>7}{'perplex.':>10}{'PSNR dB':>9}{'q fwd ms':>10}"
          f"{'step ms':>9}")
    for name, row in results.items():
        print(f"{name:<20}{row['codebook_size']:>7}{row['held_out_usage']:>8.3f}{row['held_out_usage_min']:>7.3f}"
              f"{row['held_out_perplexity']:>10.1f}"
              f"{row['held_out_psnr_db']:>9.2f}{row['quantizer_forward_ms']:>10.2f}{row['train_step_ms']:>9.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
