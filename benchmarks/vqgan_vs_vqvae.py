"""VQ-GAN against VQ-VAE on CIFAR-10 at one token budget (8x8 tokens): PSNR, SSIM, reconstruction Frechet.

    # the issue's comparison at the configs' full size (one GPU)
    python benchmarks/vqgan_vs_vqvae.py --full-size --out benchmarks/results/vqgan_vs_vqvae.json
    # a short CPU run at reduced size (numbers far from converged)
    python benchmarks/vqgan_vs_vqvae.py --steps 600 --discriminator-start 200 --hidden-channels 16 \
        --train-images 20000 --test-images 2000 --batch-size 32 --out benchmarks/results/vqgan_vs_vqvae_cpu.json

Issue 3's target: a VQ-GAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image
Synthesis") that beats the plain VQ-VAE of the same size in the Frechet distance of its
reconstructions to the originals, measured in the feature space of tokgen's own CIFAR-10 classifier
(`pipelines.evaluate.reconstruction_frechet`), while losing at most 1 dB PSNR. Both tokenizers come
from `configs/pipeline/cifar10_vqvae.toml` and `cifar10_vqgan.toml` (same autoencoder, quantizer,
data and training settings; the VQ-GAN adds only the patch discriminator) and are trained by the
project's own stage (`pipelines.stages.train_tokenizer_stage`, the one Accelerate loop), with the
same overrides applied to both. Then both reconstruct the same test images; one classifier, trained
once on the same train split, measures both. Reconstruction grids are written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipelines.classifier import ClassifierConfig, classifier_accuracy, load_or_train_classifier
from pipelines.config import load_run_config
from pipelines.data import to_tensor_images
from pipelines.evaluate import codebook_metrics, reconstruction_frechet, reconstruction_metrics
from pipelines.images import reconstruction_grid
from pipelines.stages import Run, train_tokenizer_stage
from tokenizers_vq import load_tokenizer

CONFIGS = {"vqvae": Path("configs/pipeline/cifar10_vqvae.toml"), "vqgan": Path("configs/pipeline/cifar10_vqgan.toml")}


def overrides(kind: str, args) -> list[str]:
    """Key=value overrides shared by both runs; the autoencoder's section differs by kind only in its path."""
    common = [f"data.path={json.dumps(str(args.data))}", f"output_dir={json.dumps(str(args.run_dir))}",
              f"name=cifar10_{kind}", f"data.max_train={args.train_images}", f"data.max_test={args.test_images}",
              f"seed={args.seed}", f"tokenizer_training.seed={args.seed}"]
    if args.full_size:
        return common
    section = "tokenizer" if kind == "vqvae" else "tokenizer.autoencoder"
    common += [
        f"{section}.hidden_channels={args.hidden_channels}", f"{section}.num_res_blocks={args.num_res_blocks}",
        f"{section}.embedding_dim={args.embedding_dim}",
        f"tokenizer_training.max_steps={args.steps}", f"tokenizer_training.batch_size={args.batch_size}",
        f"tokenizer_training.warmup_steps={args.warmup_steps}", "tokenizer_training.mixed_precision=\"no\"",
        "tokenizer_training.checkpoint_every=0", f"tokenizer_training.log_every={args.log_every}",
    ]
    if kind == "vqgan":
        common += [f"tokenizer.discriminator_start={args.discriminator_start}",
                   f"tokenizer.discriminator.base_channels={args.discriminator_channels}"]
        if args.discriminator_weight is not None:
            common.append(f"tokenizer.discriminator_weight={args.discriminator_weight}")
    return common


@torch.no_grad()
def reconstruct(tokenizer, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images -> (reconstructions through encode/decode, tokens), as the pipeline's evaluation does."""
    reconstructions, tokens = [], []
    for chunk in images.split(batch_size):
        chunk_tokens = tokenizer.encode(chunk)
        tokens.append(chunk_tokens)
        reconstructions.append(tokenizer.decode(chunk_tokens).float())
    return torch.cat(reconstructions), torch.cat(tokens)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10_jpeg.npz"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vqgan_vs_vqvae.json"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/vqgan_vs_vqvae"))
    parser.add_argument("--full-size", action="store_true", help="the configs' own sizes and schedules")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--discriminator-start", type=int, default=200)
    parser.add_argument("--discriminator-weight", type=float, default=None, help="default: the config's")
    parser.add_argument("--discriminator-channels", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--hidden-channels", type=int, default=16)
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=0, help="0: all 50,000")
    parser.add_argument("--test-images", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--classifier-channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--eval-batch-size", type=int, default=250)
    parser.add_argument("--grid-images", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--note", default="", help="free text recorded in the JSON (e.g. the machine's load)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.discriminator_start >= args.steps and not args.full_size:
        raise SystemExit(f"--discriminator-start {args.discriminator_start} >= --steps {args.steps}: "
                         "the discriminator would never train")
    runs, train_seconds = {}, {}
    for kind, config_path in CONFIGS.items():
        run = Run(load_run_config(config_path, overrides(kind, args)))
        run.write_resolved_config()
        started = time.perf_counter()
        train_tokenizer_stage(run)
        train_seconds[kind] = time.perf_counter() - started
        runs[kind] = run
        print(f"{kind}: trained in {train_seconds[kind]:.0f} s", flush=True)

    dataset = runs["vqvae"].dataset  # the same data config (and seed) for both runs
    test_images = to_tensor_images(dataset.test.images)
    classifier_config = ClassifierConfig(channels=tuple(args.classifier_channels), epochs=args.classifier_epochs,
                                         seed=args.seed)
    started = time.perf_counter()
    classifier, classifier_info = load_or_train_classifier(
        args.run_dir / "classifier", dataset.train.images, dataset.train.labels, classifier_config,
        dataset.num_classes, fingerprint={"data": dataset.source}, progress=False)
    classifier_seconds = time.perf_counter() - started
    classifier_info["test_accuracy"] = classifier_accuracy(classifier, test_images, torch.as_tensor(dataset.test.labels))

    results = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for kind, run in runs.items():
        tokenizer = load_tokenizer(run.path("tokenizer")).eval()
        stage = json.loads(run.path("tokenizer", "stage.json").read_text())
        reconstructions, tokens = reconstruct(tokenizer, test_images, args.eval_batch_size)
        quality = reconstruction_metrics(test_images, reconstructions)
        codebook = codebook_metrics(tokens, tokenizer.vocab_size)
        grid = args.out.with_name(f"{args.out.stem}_{kind}_reconstructions.png")
        reconstruction_grid(test_images[: args.grid_images], reconstructions[: args.grid_images], grid, scale=2)
        results[kind] = {
            "psnr_db": quality["psnr"], "ssim": quality["ssim"], "mse": quality["mse"],
            "reconstruction_frechet": reconstruction_frechet(classifier, test_images, reconstructions,
                                                             args.eval_batch_size),
            "test_usage": codebook["usage"], "test_perplexity": codebook["perplexity"],
            "token_grid": list(tokens.shape[1:]), "vocab_size": tokenizer.vocab_size,
            "steps": stage.get("steps"), "train_seconds": train_seconds[kind],
            "final_train_metrics": stage.get("final_metrics", {}), "reconstruction_grid": str(grid),
            "config": run.config.to_dict()["tokenizer"],
        }
        print(f"{kind}: {json.dumps({k: v for k, v in results[kind].items() if k not in ('config', 'final_train_metrics')})}",
              flush=True)
    gan, vae = results["vqgan"], results["vqvae"]
    verdict = {
        "frechet_improvement": vae["reconstruction_frechet"] - gan["reconstruction_frechet"],
        "psnr_loss_db": vae["psnr_db"] - gan["psnr_db"],
    }
    verdict["target_met"] = verdict["frechet_improvement"] > 0 and verdict["psnr_loss_db"] <= 1.0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    report = {"settings": {**vars(args), "data": str(args.data), "out": str(args.out), "run_dir": str(args.run_dir)},
              "device": device, "torch": torch.__version__, "train_images": len(dataset.train),
              "test_images": len(test_images), "classifier": {**classifier_info, "seconds": classifier_seconds},
              "results": results, "comparison": verdict}
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{'tokenizer':<10}{'PSNR dB':>9}{'SSIM':>7}{'Frechet':>10}{'usage':>8}{'train s':>9}")
    for kind, row in results.items():
        print(f"{kind:<10}{row['psnr_db']:>9.2f}{row['ssim']:>7.3f}{row['reconstruction_frechet']:>10.3f}"
              f"{row['test_usage']:>8.3f}{row['train_seconds']:>9.0f}")
    print(f"VQ-GAN - VQ-VAE: Frechet {-verdict['frechet_improvement']:+.3f}, PSNR {-verdict['psnr_loss_db']:+.2f} dB; "
          f"target {'met' if verdict['target_met'] else 'not met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
