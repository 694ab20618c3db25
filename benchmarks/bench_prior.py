"""Prior throughput: training tokens/s of `TransformerPrior` against a plain nanoGPT-style model of the
same size, and sampling tokens/s of `TransformerPrior.sample` against transformers'
`model.generate(cache_implementation="static")` on the same network.

    python benchmarks/bench_prior.py --out benchmarks/results/prior.json [--quick] [--no-compile] [--profile DIR]

On CUDA: ~25M-parameter Llama prior (hidden 512, 8 layers), 256 tokens per sequence, batch 256, bf16
autocast for training and bf16 weights for sampling, `torch.compile` for both training models and
static cache + CUDA graphs for both samplers. Without CUDA (or with `--quick`) it runs tiny sizes on
the CPU, eagerly, and says so in the output and the JSON (`"device": "cpu"`, `"note"`). Timings are
medians over repeats after warm-up, with device synchronisation around each.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from priors import SamplingOptions, TransformerPrior, TransformerPriorConfig

try:
    from benchmarks.timing import profile_table, timed
except ImportError:  # run as a script, `python benchmarks/bench_prior.py`
    from timing import profile_table, timed

try:  # run as `python benchmarks/bench_prior.py` (script folder on sys.path) or as a module
    from bench_tokenizer import bench_tokenizer
except ImportError:
    from benchmarks.bench_tokenizer import bench_tokenizer


# ---- the baseline: a nanoGPT-style model in a few lines ----------------------------------------------


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_1, self.norm_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        q, k, v = self.qkv(self.norm_1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm_2(x))


class NanoGPT(nn.Module):
    """GPT-2 layout (learned positions, pre-LayerNorm, GELU MLP, tied head), loss as in nanoGPT."""

    def __init__(self, vocab: int, length: int, hidden: int, layers: int, heads: int):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Embedding(vocab, hidden), nn.Embedding(length, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, inputs, targets):
        x = self.token_embedding(inputs) + self.position_embedding(torch.arange(inputs.shape[1], device=inputs.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ---- training throughput ------------------------------------------------------------------------------


def slug(name: str) -> str:
    """A file name from a row's label: "TransformerPrior (HF Llama)" -> "transformerprior_hf_llama"."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def write_profile(profile_dir: Path | None, name: str, function, device: torch.device) -> None:
    """With --profile DIR: DIR/<name>.txt, the operators that took the most time in a few more calls."""
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        (profile_dir / f"{name}.txt").write_text(profile_table(function, device))


def bench_training(sizes: dict, device: torch.device, compile_models: bool,
                   profile_dir: Path | None = None) -> list[dict]:
    batch, length, vocab, classes = sizes["batch_size"], sizes["seq_len"], sizes["vocab_size"], sizes["num_classes"]
    tokens = torch.randint(0, vocab, (batch, length), device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    prior = TransformerPrior(prior_config(sizes)).to(device).train()
    nanogpt = NanoGPT(vocab + classes + 1, length, sizes["hidden_size"], sizes["num_layers"], sizes["num_heads"])
    nanogpt = nanogpt.to(device)
    # The baseline sees the same layout: conditioning token first, next-token targets.
    nano_inputs = torch.cat([labels[:, None] + vocab, tokens[:, :-1]], dim=1)

    def prior_loss():
        return prior.loss({"input_ids": tokens, "label": labels}, "main", 0)[0]

    def nanogpt_loss():
        return nanogpt(nano_inputs, tokens)

    results = []
    models = (("TransformerPrior (HF Llama)", prior, prior_loss), ("nanoGPT-style", nanogpt, nanogpt_loss))
    for name, model, loss_fn in models:
        loss_fn = torch.compile(loss_fn) if compile_models else loss_fn
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def train_step():
            with torch.autocast(**autocast):
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(train_step, device, sizes["train_repeats"], warmup=3)
        write_profile(profile_dir, "train_" + slug(name), train_step, device)
        results.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()),
                        "train_tokens_per_second": batch * length / seconds, "step_seconds": seconds})
    return results


# ---- sampling throughput ------------------------------------------------------------------------------


def prior_config(sizes: dict) -> TransformerPriorConfig:
    return TransformerPriorConfig(vocab_size=sizes["vocab_size"], seq_len=sizes["seq_len"],
                                  num_classes=sizes["num_classes"], architecture="llama",
                                  hidden_size=sizes["hidden_size"], num_layers=sizes["num_layers"],
                                  num_heads=sizes["num_heads"], label_dropout=0.1)


def bench_sampling(sizes: dict, device: torch.device, compile_models: bool,
                   profile_dir: Path | None = None) -> list[dict]:
    batch, length = sizes["sample_batch_size"], sizes["seq_len"]
    prior = TransformerPrior(prior_config(sizes)).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prior = prior.to(device=device, dtype=dtype)
    labels = torch.randint(0, sizes["num_classes"], (batch,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def ours():
        return prior.sample(batch, label=labels, options=SamplingOptions(), generator=generator, compile=compile_models)

    hf_model = copy.deepcopy(prior.model)
    cond_tokens = (labels + sizes["vocab_size"])[:, None]

    def hf_generate():
        # Same work: one conditioning token in, `length` sampled tokens out, plain multinomial sampling.
        return hf_model.generate(input_ids=cond_tokens, attention_mask=torch.ones_like(cond_tokens), do_sample=True,
                                 max_new_tokens=length, min_new_tokens=length, top_k=0, top_p=1.0, temperature=1.0,
                                 cache_implementation="static", pad_token_id=prior.config.null_token,
                                 eos_token_id=None, disable_compile=not compile_models)

    results = []
    samplers = (("TransformerPrior.sample", ours), ('HF generate(cache_implementation="static")', hf_generate))
    for name, function in samplers:
        with torch.no_grad():
            seconds = timed(function, device, sizes["sample_repeats"], warmup=2)
            write_profile(profile_dir, "sample_" + slug(name), function, device)
        results.append({"sampler": name, "sample_tokens_per_second": batch * length / seconds, "call_seconds": seconds,
                        "batch_size": batch, "tokens_per_sample": length, "dtype": str(dtype).replace("torch.", "")})
    return results


SIZES = {
    "cuda": dict(vocab_size=1024, num_classes=10, seq_len=256, hidden_size=512, num_layers=8, num_heads=8,
                 batch_size=256, sample_batch_size=256, train_repeats=10, sample_repeats=3),
    "cpu": dict(vocab_size=64, num_classes=10, seq_len=32, hidden_size=64, num_layers=2, num_heads=4,
                batch_size=8, sample_batch_size=8, train_repeats=3, sample_repeats=2),
}


def print_table(report: dict) -> None:
    print(f"device: {report['device']} ({report.get('gpu', platform.processor() or 'cpu')}); {report['note']}")
    print(f"{'training model':<45}{'params':>12}{'tokens/s':>14}")
    for row in report["training"]:
        print(f"{row['model']:<45}{row['parameters']:>12,}{row['train_tokens_per_second']:>14,.0f}")
    print(f"{'sampler':<45}{'batch x len':>12}{'tokens/s':>14}")
    for row in report["sampling"]:
        shape = f"{row['batch_size']}x{row['tokens_per_sample']}"
        print(f"{row['sampler']:<45}{shape:>12}{row['sample_tokens_per_second']:>14,.0f}")
    if "tokenizer" in report:
        row = report["tokenizer"]
        shape = "x".join(str(v) for v in row["image_shape"])
        print(f"{'tokenizer encode (images/s), ' + shape:<45}{row['batch_size']:>12}{row['encode_images_per_second']:>14,.0f}")
        print(f"{'tokenizer decode (images/s), ' + shape:<45}{row['batch_size']:>12}{row['decode_images_per_second']:>14,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prior.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="eager models and samplers on CUDA")
    parser.add_argument("--profile", type=Path, default=None,
                        help="folder for torch.profiler tables of each timed model and sampler (where the time goes)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    sizes = SIZES["cuda" if cuda else "cpu"]
    compile_models = cuda and not args.no_compile
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    if cuda:
        note = "CUDA, bf16 autocast training, bf16 sampling, " + (
            "torch.compile + static cache/CUDA graphs" if compile_models else "eager")
    else:
        note = "no CUDA (or --quick): tiny sizes on the CPU, eager fp32; not representative of GPU throughput"
    report = {"device": device.type, "note": note, "sizes": sizes, "compiled": compile_models,
              "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name()
    report["training"] = bench_training(sizes, device, compile_models, args.profile)
    report["sampling"] = bench_sampling(sizes, device, compile_models, args.profile)
    # Stage one's encode throughput belongs in the same report: it bounds how fast tokens can be exported.
    tokenizer_sizes = (dict(batch_size=1024, image_size=32, channels=3, hidden_channels=128, repeats=20) if cuda
                       else dict(batch_size=64, image_size=28, channels=1, hidden_channels=64, repeats=5))
    report["tokenizer"] = bench_tokenizer(device, compile_model=compile_models, **tokenizer_sizes)
    ours, theirs = (row["sample_tokens_per_second"] for row in report["sampling"])
    report["sampling_speedup_vs_hf_generate"] = ours / theirs
    report["train_speed_ratio_vs_nanogpt"] = (report["training"][0]["train_tokens_per_second"]
                                              / report["training"][1]["train_tokens_per_second"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"sampling speed vs HF generate: {report['sampling_speedup_vs_hf_generate']:.2f}x; "
          f"training speed vs nanoGPT: {report['train_speed_ratio_vs_nanogpt']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
