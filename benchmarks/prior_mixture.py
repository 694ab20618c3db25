"""What an ensemble of trained priors would score: the uniform mixture of K exact densities.

    python benchmarks/prior_mixture.py TOKENS_DIR PRIOR_DIR [PRIOR_DIR ...] --out mixture.json

Each PRIOR_DIR is a trained prior folder (`tokgen.json`, `model.safetensors`, `token_manifest.json`), for
example `runs/<comparison>/models/made/prior` of several `tokgen compare` runs that differ only in their
training seed; TOKENS_DIR is the token set they were trained on. The mixture p(x) = (1/K) sum_k p_k(x)
is an exact, normalised density too, so its NLL sits on the same scale as its members'. The script
scores the validation and test splits (whole) under every member and under the mixtures of the first
k members, k = 2..K, and reports the members' mean, their spread, and what mixing gains. By Jensen's
inequality the mixture is never worse than the members' mean NLL, and it is never more than log K nats
worse than its best member (each item keeps at least 1/K of that member's probability).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

from pipelines.compare import batched_log_prob
from pipelines.stages import check_prior_matches_tokens
from pipelines.tokenset import load_tokenset
from priors import load_prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokens", type=Path, help="the token set folder the priors were trained on")
    parser.add_argument("priors", type=Path, nargs="+", help="trained prior folders, two or more")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if len(args.priors) < 2:
        parser.error("a mixture needs two or more priors")
    tokenset = load_tokenset(args.tokens)
    priors = [load_prior(prior_dir).eval() for prior_dir in args.priors]
    for prior, prior_dir in zip(priors, args.priors):
        check_prior_matches_tokens(prior, prior_dir, tokenset.manifest)
    conditional = tokenset.manifest.num_classes > 0
    report = {"tokens": str(args.tokens), "priors": [str(p) for p in args.priors], "splits": {},
              "machine": platform.machine(), "torch": torch.__version__}
    for split in args.splits:
        data = tokenset.tensors(split)
        labels = data.get("label") if conditional else None
        # a stochastic estimate (a VAE's) draws from the generator; the exact models ignore it
        members = torch.stack([batched_log_prob(p, data["input_ids"], labels, args.batch_size, "cpu",
                                                torch.Generator().manual_seed(0)) for p in priors])
        member_nll = [-float(m.mean()) for m in members]
        mixtures = {k: -float((torch.logsumexp(members[:k], dim=0) - math.log(k)).mean())
                    for k in range(2, len(priors) + 1)}
        mean = sum(member_nll) / len(member_nll)
        spread = math.sqrt(sum((x - mean) ** 2 for x in member_nll) / (len(member_nll) - 1))
        report["splits"][split] = {"items": len(data["input_ids"]), "member_nll_nats": member_nll,
                                   "member_mean_nats": mean, "member_std_nats": spread,
                                   "mixture_nll_nats": mixtures,
                                   "gain_over_member_mean_nats": mean - mixtures[len(priors)]}
        print(f"{split} ({len(data['input_ids'])} items): members {', '.join(f'{x:.3f}' for x in member_nll)} "
              f"(mean {mean:.3f}, std {spread:.3f}); mixtures of the first k: "
              + ", ".join(f"k={k} {v:.3f}" for k, v in mixtures.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
