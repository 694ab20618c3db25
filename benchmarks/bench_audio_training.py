"""Audio codec training steps per second, eager Snake against compiled (fused) Snake, CUDA bf16 when available.

    python benchmarks/bench_audio_training.py [--config configs/pipeline/fsdd_transformer.toml] [--out PATH] [--quick]
        [--batch-size N] [--clip-seconds S] [--repeats N] [--threads N] [key=value overrides, as for tokgen]

One step is what the tokenizer stage runs: the config's codec loss (waveform L1, multi-resolution
STFT, mel, quantizer) on a batch of 1 s clips (`--clip-seconds`) under bf16 autocast, backward, gradient clipping and
an AdamW step. Timed twice from the same initial weights, once with `TOKGEN_FUSED_SNAKE=0` (eager
Snake) and once with the compiled Snake (tokenizers_vq/nets/conv1d.py), median of repeats after a
warm-up that includes the compile. Also reports the largest difference between the two paths' loss
on the first step, and Snake's own output and gradient differences on one activation (same
inputs), so a speed-up that changed the numbers would show. Last, the compiled path at a batch of
256: clips per second against the config's 64 say whether a larger batch would come nearly free
(the GPU idle between small kernels) or cost its size in time. Without CUDA (or with `--quick`) it
runs on the CPU in float32, where the compiled Snake is inductor's C++ (`TOKGEN_FUSED_SNAKE=1` opts a
CPU run in); by default a small batch, or pass the CPU config's own sizes, e.g.
`--config configs/pipeline/fsdd_cpu.toml --batch-size 12 --clip-seconds 0.75 --repeats 20 --threads 1
tokenizer.hidden_channels=16 tokenizer.strides=[4,5,2] tokenizer.quantizer.num_quantizers=1`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from pipelines.cli import parse_with_trailing_overrides
from pipelines.config import load_run_config
from tokenizers_vq.audio import AudioVQVAE
from tokenizers_vq.nets import conv1d

try:
    from benchmarks.timing import timed
except ImportError:  # run as a script, `python benchmarks/bench_audio_training.py`
    from timing import timed


def training_step(model, optimizer, clips, autocast):
    with autocast():
        loss, _ = model.loss({"waveform": clips}, "main", step=1000)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def snake_differences(device: torch.device, batch_size: int) -> dict:
    """Fused against eager Snake on an activation the size of the GPU codec's first block (64 channels)."""
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch_size, 64, 8000, device=device, generator=generator).requires_grad_()
    alpha = (0.5 + torch.rand(1, 64, 1, device=device, generator=generator)).requires_grad_()
    results = {}
    for name, function in (("eager", conv1d.snake), ("fused", conv1d.fused_snake)):
        out = function(x, alpha)
        grads = torch.autograd.grad(out.square().mean(), (x, alpha))
        results[name] = (out.detach(), *grads)
    return {f"snake_max_abs_diff_{part}": (results["eager"][i] - results["fused"][i]).abs().max().item()
            for i, part in enumerate(("output", "grad_x", "grad_alpha"))}


def bench(config_path: str, device: torch.device, batch_size: int, repeats: int, larger_batches=(),
          overrides: list[str] = (), clip_seconds: float = 1.0) -> dict:
    run = load_run_config(config_path, overrides)
    tokenizer_config = run.tokenizer_config()
    torch.manual_seed(0)
    initial = AudioVQVAE(tokenizer_config)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    # eager and fused at the config's batch, then fused at larger batches: is the GPU busy at the first?
    runs = [("eager", batch_size), ("fused", batch_size), *((f"fused_batch_{b}", b) for b in larger_batches)]
    rows = {}
    for mode, batch in runs:
        os.environ[conv1d.FUSED_SNAKE_ENV] = "0" if mode == "eager" else "1"
        clips = 0.3 * torch.randn(batch, 1, round(clip_seconds * tokenizer_config.sample_rate), device=device,
                                  generator=torch.Generator(device=device).manual_seed(0))
        model = copy.deepcopy(initial).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.manual_seed(0)  # the k-means initialisation draws: the same for both modes
        first_loss = training_step(model, optimizer, clips, autocast).item()  # k-means init, compile
        seconds = timed(lambda: training_step(model, optimizer, clips, autocast), device, repeats, warmup=3)
        rows[mode] = {"batch_size": batch, "steps_per_second": 1.0 / seconds, "clips_per_second": batch / seconds,
                      "seconds_per_step": seconds, "first_step_loss": first_loss,
                      "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    os.environ.pop(conv1d.FUSED_SNAKE_ENV, None)
    return {
        "config": config_path, "overrides": list(overrides), "hidden_channels": tokenizer_config.hidden_channels,
        "decoder_hidden_channels": tokenizer_config.decoder_width,
        "activation": tokenizer_config.activation, "batch_size": batch_size, "clip_seconds": clip_seconds,
        "dtype": "bfloat16 autocast" if cuda else "float32", "repeats": repeats,
        **rows,
        "speedup": rows["eager"]["seconds_per_step"] / rows["fused"]["seconds_per_step"],
        "first_step_loss_diff": abs(rows["eager"]["first_step_loss"] - rows["fused"]["first_step_loss"]),
        **snake_differences(device, batch_size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pipeline/fsdd_transformer.toml")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/bench_audio_training_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="the CPU even if CUDA is there (default sizes: small)")
    parser.add_argument("--batch-size", type=int, default=None, help="clips a step (default 64 on CUDA, 2 on the CPU)")
    parser.add_argument("--clip-seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 20 on CUDA, 2 on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tokgen")
    args = parse_with_trailing_overrides(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    batch_size = args.batch_size or (64 if cuda else 2)
    larger_batches = (256,) if cuda else (2 * batch_size,)
    result = bench(args.config, device, batch_size=batch_size, repeats=args.repeats or (20 if cuda else 2),
                   larger_batches=larger_batches, overrides=args.overrides, clip_seconds=args.clip_seconds)
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "note": "" if cuda else "no CUDA device: float32 on the CPU, the compiled Snake in C++; not a GPU figure",
        "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        **result,
    }
    out = args.out or Path("benchmarks/results") / f"bench_audio_training_{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{report['device']}  {report['note']}")
    for mode in ("eager", "fused", *(f"fused_batch_{b}" for b in larger_batches)):
        row = report[mode]
        print(f"{mode:<15} Snake, batch {row['batch_size']}: {row['steps_per_second']:.2f} steps/s "
              f"({row['clips_per_second']:.0f} clips/s), first-step loss {row['first_step_loss']:.5f}")
    print(f"speed-up {report['speedup']:.2f}x; Snake max |diff| output {report['snake_max_abs_diff_output']:.2e}, "
          f"grad x {report['snake_max_abs_diff_grad_x']:.2e}, grad alpha {report['snake_max_abs_diff_grad_alpha']:.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
