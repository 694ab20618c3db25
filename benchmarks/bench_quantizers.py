"""Quantizer throughput (tokens/s) of a training step: `__call__` plus backward, bf16 autocast on CUDA.

    python benchmarks/bench_quantizers.py            # writes benchmarks/results/bench_quantizers_{cuda,cpu}.json
    python benchmarks/bench_quantizers.py --quick    # CPU smoke run at small sizes

Times one quantizer training step per case: VQ with 1024 and 16384 codes (plain, and the
LlamaGen-style cosine codes in an 8-dimensional factorised space), LFQ with 2^14 and 2^18 codes
(per-bit factorised entropy) and residual VQ with 4 levels of 1024 codes. Each step runs the
forward pass in training mode (EMA statistics, dead-code restarts, usage counts) and the backward
pass of `mean(quantized^2) + aux_loss`, with warm-up and device syncs, median of several repeats.
On CUDA the input is bf16, as an encoder's output under bf16 autocast would be, and the step runs
under bf16 autocast (the quantizers keep their distances in fp32 themselves). On a machine without
CUDA (or with --quick) it runs small sizes on the CPU in float32 and says so. `dead_codes` is the
number of codes the step found dead (VQ restarts them): with few tokens per step and large
codebooks the default restart threshold restarts many codes per step, which is part of the cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import torch

from tokenizers_vq.quantizers import LFQConfig, ResidualVQConfig, VQConfig, build_quantizer

try:
    from benchmarks.timing import measure
except ImportError:  # run as a script, `python benchmarks/bench_quantizers.py`
    from timing import measure


def cases(dim: int) -> dict[str, tuple[object, int]]:
    """name -> (quantizer config, input dim). LFQ takes dim = bits (MAGVIT-v2: no projection)."""
    return {
        "vq_1024": (VQConfig(codebook_size=1024), dim),
        "vq_16384": (VQConfig(codebook_size=16384), dim),
        "vq_16384_cosine_dim8": (VQConfig(codebook_size=16384, use_cosine=True, codebook_dim=8), dim),
        "lfq_2^14": (LFQConfig(bits=14), 14),
        "lfq_2^18": (LFQConfig(bits=18), 18),
        "residual_vq_4x1024": (ResidualVQConfig(num_quantizers=4, quantizer=VQConfig(codebook_size=1024)), dim),
    }


def bench_case(config, dim: int, device: torch.device, tokens: int, repeats: int) -> dict:
    quantizer = build_quantizer(config, dim).to(device).train()
    generator = torch.Generator(device=device).manual_seed(0)
    use_autocast = device.type == "cuda"
    dtype = torch.bfloat16 if use_autocast else torch.float32
    z = torch.randn(tokens // 256, 256, dim, device=device, generator=generator, dtype=dtype).requires_grad_()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            output = quantizer(z)
            loss = output.quantized.float().square().mean() + output.aux_loss
        loss.backward()
        z.grad = None
        quantizer.zero_grad(set_to_none=True)
        return output

    seconds, cpu_seconds = measure(step, device, repeats)
    output = step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "kind": config.kind, "config": dataclasses.asdict(config),
        "codebook_size": quantizer.codebook_size, "num_codebooks": quantizer.num_codebooks, "input_dim": dim,
        "tokens": z.shape[0] * z.shape[1], "seconds_per_step": seconds, "tokens_per_second": z.shape[0] * z.shape[1] / seconds,
        "process_cpu_seconds_per_step": cpu_seconds,
        "usage": float(output.metrics["usage"]), "dead_codes": float(output.metrics["dead_codes"]),
        "input_dtype": str(dtype).removeprefix("torch."), "peak_memory_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/bench_quantizers_{cuda,cpu}.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    args.out = args.out or Path(f"benchmarks/results/bench_quantizers_{device.type}.json")
    tokens, dim, repeats = (65536, 256, 20) if cuda else (2048, 64, 5)
    if not cuda:
        print(f"no CUDA device{' requested' if args.quick else ''}: CPU float32 at small sizes "
              f"({tokens} tokens); these figures are not GPU throughput")
    results = []
    for name, (config, input_dim) in cases(dim).items():
        if args.only and name not in args.only:
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results.append({"name": name, **bench_case(config, input_dim, device, tokens, repeats)})
    report = {
        "device": torch.cuda.get_device_name(device) if cuda
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "autocast": "bf16" if cuda else "none (float32)",
        "measure": "quantizer training step: forward (train mode) + backward", "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'case':<24}{'codes':>10}{'q':>3}{'dim':>5}{'tokens':>8}{'ms/step':>10}{'cpu ms':>9}{'Mtok/s':>9}"
          f"{'dead':>8}{'peak MiB':>10}")
    for row in results:
        peak = f"{row['peak_memory_mib']:.0f}" if row["peak_memory_mib"] is not None else "-"
        print(f"{row['name']:<24}{row['codebook_size']:>10}{row['num_codebooks']:>3}{row['input_dim']:>5}"
              f"{row['tokens']:>8}{1e3 * row['seconds_per_step']:>10.2f}{1e3 * row['process_cpu_seconds_per_step']:>9.2f}"
              f"{row['tokens_per_second'] / 1e6:>9.3f}{row['dead_codes']:>8.0f}{peak:>10}")
    print(f"device: {report['device']}, torch {report['torch']}, autocast {report['autocast']}; wrote {args.out}")


if __name__ == "__main__":
    main()
