"""Teach a finished codec's encoder to correct its codes from what its decoder made of them.

    python benchmarks/audio_refining_encoder.py RUN --steps 3000 --out refine.json --threads 2

The code search (`tokenizers_vq.audio_code_search`) gains 1.7-2.0 dB of SI-SNR at the same bit rate by
decoding candidate codes and keeping what decodes closer, which costs many decodes a code. Teaching the
encoder the searched codes one position at a time did not carry over to unseen clips
(`audio_encoder_tuning.py`, BENCHMARKS.md). This tries the search's feedback as a network instead, one
decode per pass: encode, quantize, decode; a refiner (a copy of the encoder, so it starts from features
that already mean something) reads the residual, original minus decoded, and moves the latents by a
learned per-channel gate (zero at the start, so step 0 is the codec as it is); quantize and decode again.

    z_0 = E(x);  x_k = D(Q(z_k));  z_{k+1} = z_k + gate * R(x - x_k)

The decoder and codebook stay fixed, so the bit rate and the decoder a listener runs are the codec's own.
The refiner trains (and the encoder, at `--encoder-lr-scale` of the rate) on the codec's loss of the last
pass's decoding, with the gradient passing each code choice straight through and the codec's commitment
term on every pass's latents. The validation split's SI-SNR after `--passes` passes picks the step; the test
split is then scored after 0-3 passes, each paired per clip against the untouched codec's own codes.
The run's prior learned the old codes, so its bits on refined codes include that mismatch.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from pipelines import audio_eval
from pipelines.audio_data import lengths_to_mask
from tokenizers_vq.audio_code_search import as_grid, from_grid

try:
    from benchmarks.audio_code_search import score
    from benchmarks.audio_codec_eval import machine, save_record
    from benchmarks.audio_encoder_tuning import (EVAL_BATCH, as_tensors, codec_commitment_weight, codec_loss, load_run,
                                                 real_frames, run_judge)
except ImportError:  # run as a script
    from audio_code_search import score
    from audio_codec_eval import machine, save_record
    from audio_encoder_tuning import (EVAL_BATCH, as_tensors, codec_commitment_weight, codec_loss, load_run,
                                      real_frames, run_judge)

TEST_PASSES = (0, 1, 2, 3)


class ResidualRefiner(nn.Module):
    """Moves `(b frames d)` latents by `gate * R(residual)`, R a copy of the codec's encoder."""

    def __init__(self, encoder: nn.Module, latent_dim: int):
        super().__init__()
        self.net = copy.deepcopy(encoder)
        self.gate = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, latents: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return latents + self.gate * rearrange(self.net(residual), "b d frames -> b frames d")


def refined_pass(tokenizer, refiner: ResidualRefiner, clips: torch.Tensor, lengths: torch.Tensor, passes: int):
    """Encode `(n c t)` clips and refine `passes` times. Returns the last decoding (unclamped, `(n c t)`), the
    codes `(n frames q)`, and each pass's commitment term (latents to their codes)."""
    length = clips.shape[-1]
    mask = lengths_to_mask(lengths, length)[:, None].to(clips.dtype)
    padding = -length % tokenizer.hop_length
    clips = clips * mask
    latents = tokenizer._latents(clips)
    commitments = []
    for done in range(passes + 1):
        with torch.no_grad():
            codes = tokenizer.quantizer.to_indices(latents)
        hard = tokenizer.quantizer.lookup(codes).to(latents)
        commitments.append(F.mse_loss(latents, hard.detach()))
        decoded = tokenizer._decode_codes(latents + (hard - latents).detach())[..., :length]
        if done < passes:
            residual = F.pad((clips - decoded) * mask, (0, padding))
            latents = refiner(latents, residual)
    return decoded, as_grid(codes), commitments


def refined_codes(tokenizer, refiner, clips: torch.Tensor, lengths: torch.Tensor, passes: int) -> torch.Tensor:
    """`(n frames q)` codes after `passes` refinements, in batches, without gradient."""
    with torch.no_grad():
        return torch.cat([refined_pass(tokenizer, refiner, part, part_lengths, passes)[1]
                          for part, part_lengths in zip(clips.split(EVAL_BATCH), lengths.split(EVAL_BATCH))])


def clip_si_snr(tokenizer, codes: torch.Tensor, clips: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`(n,)` SI-SNR (dB) of what the codec's own `decode` makes of `(n frames q)` codes."""
    with torch.no_grad():
        decoded = torch.cat([tokenizer.decode(from_grid(part, tokenizer.num_codebooks), length=clips.shape[-1])
                             for part in codes.split(EVAL_BATCH)])
    return audio_eval.per_clip_si_snr(decoded.float(), clips, lengths)


def training_loss(tokenizer, refiner, clips, lengths, passes: int, commitment_weight: float) -> torch.Tensor:
    """The codec's own loss (its weights) on the last pass's decoding, plus every pass's commitment term."""
    decoded, _, commitments = refined_pass(tokenizer, refiner, clips, lengths, passes)
    mask = lengths_to_mask(lengths, clips.shape[-1])
    return codec_loss(tokenizer, decoded, clips * mask[:, None], mask) + commitment_weight * sum(commitments)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished audio run (tokenizer, tokens, prior, classifier)")
    parser.add_argument("--passes", type=int, default=1, help="refinements in training (and to pick the step)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4, help="the refiner's peak rate (cosine to zero)")
    parser.add_argument("--encoder-lr-scale", type=float, default=0.1, help="the encoder's rate / the refiner's; 0 "
                                                                             "keeps it fixed")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    if args.passes < 1:
        raise SystemExit("--passes must be at least 1")
    config, dataset, tokenizer, prior, tokenset = load_run(args.run, args.threads, args.seed)
    tokenizer.eval()
    commitment_weight = codec_commitment_weight(tokenizer)
    refiner = ResidualRefiner(tokenizer.encoder, tokenizer.config.embedding_dim)
    record = {"run": str(args.run), "machine": machine(args), "date": datetime.date.today().isoformat(),
              **{key: value for key, value in vars(args).items() if key not in ("run", "out", "threads")},
              "commitment_weight": commitment_weight, "curve": []}
    clips, lengths = as_tensors(dataset.train)
    val_clips, val_lengths = as_tensors(dataset.val)
    test_clips, test_lengths = as_tensors(dataset.test)
    base_encoder = copy.deepcopy(tokenizer.encoder.state_dict())

    def val_si_snr() -> float:
        codes = refined_codes(tokenizer, refiner, val_clips, val_lengths, args.passes)
        return float(clip_si_snr(tokenizer, codes, val_clips, val_lengths).mean())

    for parameter in tokenizer.parameters():
        parameter.requires_grad_(False)
    groups = [{"params": list(refiner.parameters()), "lr": args.lr}]
    if args.encoder_lr_scale > 0:
        tokenizer.encoder.requires_grad_(True)
        groups.append({"params": list(tokenizer.encoder.parameters()), "lr": args.lr * args.encoder_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    best = {"step": 0, "val_si_snr_db": val_si_snr()}
    record["curve"].append(dict(best))
    print(f"step 0: val SI-SNR {best['val_si_snr_db']:.3f} dB", flush=True)
    best_state = copy.deepcopy((refiner.state_dict(), tokenizer.encoder.state_dict()))
    generator = np.random.default_rng(args.seed)
    started, losses = time.perf_counter(), []
    for step in tqdm(range(1, args.steps + 1), desc="training the refiner"):
        batch = generator.choice(len(clips), size=min(args.batch_size, len(clips)), replace=False)
        loss = training_loss(tokenizer, refiner, clips[batch], lengths[batch], args.passes, commitment_weight)
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step}: the loss is {float(loss)}; stopped")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            figures = {"step": step, "loss": float(np.mean(losses[-args.eval_every:])), "val_si_snr_db": val_si_snr(),
                       "gate_rms": float(refiner.gate.detach().pow(2).mean().sqrt())}
            record["curve"].append(figures)
            print(f"step {step}: val SI-SNR {figures['val_si_snr_db']:.3f} dB, loss {figures['loss']:.4f}, "
                  f"gate rms {figures['gate_rms']:.3f}", flush=True)
            if figures["val_si_snr_db"] > best["val_si_snr_db"]:
                best, best_state = figures, copy.deepcopy((refiner.state_dict(), tokenizer.encoder.state_dict()))
            save_record(record, args.out)
    record.update(train_seconds=time.perf_counter() - started, best_step=best["step"])

    refiner.load_state_dict(best_state[0])
    labels = torch.as_tensor(dataset.test.labels)
    judge = run_judge(args.run, config, dataset)
    tokenizer.encoder.load_state_dict(base_encoder)
    own = refined_codes(tokenizer, refiner, test_clips, test_lengths, 0)
    own_snr = clip_si_snr(tokenizer, own, test_clips, test_lengths)
    real = real_frames(test_lengths, tokenizer.hop_length, own.shape[1])
    tokenizer.encoder.load_state_dict(best_state[1])
    record["test"] = {}
    for passes in TEST_PASSES:
        started = time.perf_counter()
        codes = refined_codes(tokenizer, refiner, test_clips, test_lengths, passes)
        encode_seconds = time.perf_counter() - started
        figures = score(codes, tokenizer, prior, tokenset.manifest, test_clips, test_lengths, labels, judge)
        figures.update(audio_eval.paired_si_snr_gain(clip_si_snr(tokenizer, codes, test_clips, test_lengths), own_snr),
                       codes_changed=float((codes != own)[real].float().mean()), encode_seconds=encode_seconds)
        record["test"][str(passes)] = figures
        print(f"test, {passes} pass(es): SI-SNR {figures['si_snr_db']:.2f} dB "
              f"(median {figures['si_snr_db_median']:.2f}), paired gain {figures['si_snr_gain_db']:+.3f} "
              f"+- {figures['si_snr_gain_db_stderr']:.3f} dB "
              f"({100 * figures['si_snr_gain_clips_improved']:.0f}% of clips), recognised "
              f"{100 * figures['recognised']:.1f}%, codes changed {100 * figures['codes_changed']:.1f}%, "
              f"encode {encode_seconds:.1f} s", flush=True)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
