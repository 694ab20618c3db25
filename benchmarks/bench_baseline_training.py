"""Training-step time of binary NADE: the fused CPU loss, blocked matmul pre-activations, the cumulative sum.

    python benchmarks/bench_baseline_training.py --out benchmarks/results/baseline_training_cpu.json

One step is the forward and backward pass of the mean NLL on a batch of binarized-MNIST-sized
inputs (784 binary pixels, 500 hidden units, batch 100: the full compare config). `fused` is
`NADE.loss` on the CPU (`BinaryNADENLL`: loss and gradients in one blocked pass); `blocked` is
autograd through `NADE.token_logits` (the pre-activations by blocked matmuls), which `NADE.loss`
uses on a GPU; `cumsum` is the same model through `NADE.cumsum_token_logits`, an exclusive
cumulative sum over positions, which is how the categorical model computes them. The losses and
weight gradients are checked to agree. Runs alternate, so that a shared machine slows all alike;
process CPU time is reported beside wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from priors.baselines import NADE, NADEConfig

try:  # run as `python benchmarks/bench_baseline_training.py` or as a module
    from benchmarks.timing import measure
except ImportError:
    from timing import measure


def training_step(model: NADE, logits_fn, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL per image and the input-weight gradient of one forward and backward pass;
    `logits_fn` None: through `NADE.loss`."""
    model.zero_grad(set_to_none=True)
    if logits_fn is None:
        loss = model.loss({"input_ids": input_ids}, "main", 0)[0] * input_ids.shape[1]
    else:
        class_index = torch.full((input_ids.shape[0],), model.null_class, dtype=torch.long, device=input_ids.device)
        logits = logits_fn(input_ids, class_index)
        loss = F.cross_entropy(rearrange(logits, "b l v -> (b l) v"), input_ids.reshape(-1)) * input_ids.shape[1]
    loss.backward()
    return loss.detach(), model.input_weight.grad.detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hidden-size", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 10, 2 repeats")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats = 10, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = NADE(NADEConfig(vocab_size=2, seq_len=args.seq_len, hidden_size=args.hidden_size)).to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.rand(args.batch_size, args.seq_len, generator=generator) < 0.13).long().to(device)
    variants = {"blocked": model.token_logits, "cumsum": model.cumsum_token_logits}
    if device.type == "cpu":  # NADE.loss takes the fused pass on the CPU only
        variants = {"fused": None, **variants}

    (reference_loss, reference_grad), *others = (training_step(model, fn, inputs) for fn in variants.values())
    agree = all(torch.allclose(reference_loss, loss, rtol=1e-5) and torch.allclose(reference_grad, grad, rtol=1e-4, atol=1e-7)
                for loss, grad in others)
    times = {name: {"wall": [], "cpu": []} for name in variants}
    for _ in range(args.repeats):  # alternate the variants, one timed step each
        for name, fn in variants.items():
            wall, cpu = measure(lambda: training_step(model, fn, inputs), device, repeats=1, warmup=0)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    rows = {name: {"wall_s_per_step": statistics.median(t["wall"]), "cpu_s_per_step": statistics.median(t["cpu"])}
            for name, t in times.items()}
    report = {
        "model": "nade", "seq_len": args.seq_len, "hidden_size": args.hidden_size, "batch_size": args.batch_size,
        "device": str(device), "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "losses_and_gradients_agree": agree,
        "rows": rows,
        # each variant's speed over the cumulative sum, from the medians
        "speedup_cpu": {name: rows["cumsum"]["cpu_s_per_step"] / row["cpu_s_per_step"] for name, row in rows.items()},
        "speedup_wall": {name: rows["cumsum"]["wall_s_per_step"] / row["wall_s_per_step"] for name, row in rows.items()},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
