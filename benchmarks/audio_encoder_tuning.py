"""Fine-tune a finished codec's encoder alone, its decoder and codebook fixed, and measure its own codes after.

    python benchmarks/audio_code_search.py RUN --split train --clips 400 --sweeps 2 --codes train.safetensors
    python benchmarks/audio_encoder_tuning.py RUN --objective codes --codes train.safetensors --out codes.json
    python benchmarks/audio_encoder_tuning.py RUN --objective waveform --estimator softmax --out softmax.json \
        --tokenizer-out tuned_tokenizer

The search (`tokenizers_vq.audio_code_search`) finds codes that decode closer to the waveform than the
encoder's nearest codes, at the same bit rate, at the cost of many decodes a code. Two ways to move the
encoder itself towards such codes, so that its own encoding gains some of that at no cost in time:

- `--objective codes`: a cross-entropy towards the searched codes of train clips (`code_choice_logits`).
  Every tenth searched clip is held out, to measure how often the encoder picks the searched code on
  clips it did not learn from.
- `--objective waveform`: the codec's own reconstruction loss (its weights) on all train clips, through
  the fixed decoder, with the gradient reaching the latents by the straight-through copy the codec trained
  with (`--estimator ste`) or through a softmax over the code choice (`--estimator softmax`,
  `expected_codes`), which sees where the other codes lie.

Either way the validation split's own-code SI-SNR picks the best step (the encoder as it was, if no step
beats it), and the test split's figures (the search benchmark's `score`) compare the encoder before and
after. The run's prior learned the old encoder's codes, so its bits on new ones include what that mismatch
costs: not the rate a prior trained on them would reach (for that, run the pipeline again with
`tokenizer_init=` the `--tokenizer-out` folder and `tokenizer_training.max_steps=0`). On the FSDD codec
neither objective moved the test SI-SNR by more than 0.03 dB (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines import audio_eval
from pipelines.audio_data import lengths_to_mask, load_audio_dataset
from pipelines.cpu_memory import keep_freed_memory
from pipelines.prompting import resolved_run_config
from pipelines.stages import load_matched_pair
from pipelines.tokenset import frames_of
from tokenizers_vq.audio_code_search import as_grid, code_choice_logits, expected_codes, search_codes

try:
    from benchmarks.audio_code_search import codes_split, held_codes, score
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_code_search import codes_split, held_codes, score
    from audio_codec_eval import machine, save_record

EVAL_BATCH = 64  # clips encoded and decoded at once to score a split


def as_tensors(split, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An `AudioSplit`'s `(n c t)` float32 clips and `(n,)` lengths, all or `rows`."""
    rows = slice(None) if rows is None else rows
    return (torch.from_numpy(np.ascontiguousarray(split.waveforms[rows], dtype=np.float32)),
            torch.as_tensor(split.lengths[rows]))


def real_frames(lengths: torch.Tensor, hop: int, grid_frames: int) -> torch.Tensor:
    """`(n,)` lengths in samples -> `(n frames)` True where a frame holds real samples."""
    return torch.arange(grid_frames) < frames_of(lengths, hop)[:, None]


def own_codes(tokenizer, clips: torch.Tensor) -> torch.Tensor:
    """The encoder's `(n frames q)` codes of `(n c t)` clips."""
    with torch.no_grad():
        return as_grid(torch.cat([tokenizer.encode(part) for part in clips.split(EVAL_BATCH)]))


def own_si_snr(tokenizer, clips: torch.Tensor, lengths: torch.Tensor, sample_rate: int) -> float:
    """Mean SI-SNR (dB) of the codec's own reconstructions of `(n c t)` clips."""
    with torch.no_grad():
        decoded = torch.cat([tokenizer.decode(tokenizer.encode(part), length=clips.shape[-1]).float()
                             for part in clips.split(EVAL_BATCH)])
    decoded = decoded * lengths_to_mask(lengths, clips.shape[-1])[:, None]
    return audio_eval.waveform_metrics(decoded, clips, lengths, sample_rate)["si_snr_db"]


def nearest_gap(tokenizer, clips: torch.Tensor, real: torch.Tensor) -> float:
    """Median gap, in squared latent distance, between the nearest code and the second nearest at each real
    frame (first level): the scale of the choice logits."""
    with torch.no_grad():
        logits = torch.cat([code_choice_logits(tokenizer.quantizer, tokenizer._latents(part),
                                               torch.zeros(len(part), 1, tokenizer.num_codebooks, dtype=torch.long))[0]
                            for part in clips.split(EVAL_BATCH)])
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1])[real].median())


def codes_loss(tokenizer, clips: torch.Tensor, targets: torch.Tensor, real: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Cross-entropy of the encoder's code choice towards the searched codes, over real frames and levels."""
    logits = code_choice_logits(tokenizer.quantizer, tokenizer._latents(clips), targets)
    return sum(F.cross_entropy(level_logits[real] / temperature, targets[..., level][real])
               for level, level_logits in enumerate(logits)) / len(logits)


def waveform_loss(tokenizer, clips: torch.Tensor, lengths: torch.Tensor, estimator: str, temperature: float,
                  commitment_weight: float) -> torch.Tensor:
    """The codec's reconstruction loss (its own weights, the SI-SNR term at full weight) of its nearest codes,
    the gradient reaching the encoder by `estimator`, plus the commitment term that holds the latents near
    their codes (without it, the straight-through copy lets them drift until the codes they pick change
    at random: the validation SI-SNR fell from 7.97 to 6.88 dB in 200 steps on the FSDD codec)."""
    latents = tokenizer._latents(clips)
    with torch.no_grad():  # the codes of the latents just made: no second encoder pass
        codes = tokenizer.quantizer.to_indices(latents)
    hard = tokenizer.quantizer.lookup(codes).to(latents)
    codes = as_grid(codes)
    if estimator == "ste":
        quantized = latents + (hard - latents).detach()
    else:
        soft = expected_codes(tokenizer.quantizer, latents, codes, temperature)
        quantized = hard + soft - soft.detach()
    mask = lengths_to_mask(lengths, clips.shape[-1])
    reconstruction = tokenizer._decode_codes(quantized)[..., : clips.shape[-1]]
    commitment = F.mse_loss(latents, hard.detach())
    return codec_loss(tokenizer, reconstruction, clips, mask) + commitment_weight * commitment


def codec_loss(tokenizer, reconstruction: torch.Tensor, clips: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The codec's reconstruction loss with its own weights, the SI-SNR term at full weight."""
    config = tokenizer.config
    losses = tokenizer._spectral_losses(reconstruction, clips, mask)
    return (config.waveform_weight * losses["waveform_loss"] + config.stft_weight * losses["stft_loss"]
            + config.mel_weight * losses["mel_loss"] + config.si_snr_weight * losses["si_snr_loss"])


def codec_commitment_weight(tokenizer) -> float:
    """The weight of the commitment term the codec trained with (its first quantizer level's)."""
    return getattr(tokenizer.quantizer, "levels", [tokenizer.quantizer])[0].config.commitment_weight


def run_judge(run: Path, config, dataset):
    """The run's cached spoken-digit classifier and its features, as `score` takes them."""
    classifier, _ = audio_eval.dataset_audio_classifier(run / "classifier", dataset, config.audio.classifier)
    return classifier, partial(audio_eval.log_mel_features, config=config.audio.classifier,
                               sample_rate=dataset.sample_rate)


def load_run(run: Path, threads: int, seed: int):
    """A finished audio run on the CPU, set up for tuning: its resolved config, dataset, and matched
    tokenizer, prior and token set."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    keep_freed_memory()
    config = resolved_run_config(run)
    tokenizer, prior, tokenset = load_matched_pair(run, "cpu")
    return config, load_audio_dataset(config.audio_data), tokenizer, prior, tokenset


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished audio run (tokenizer, tokens, prior, classifier)")
    parser.add_argument("--objective", choices=("codes", "waveform"), required=True)
    parser.add_argument("--codes", type=Path, default=None,
                        help="--objective codes: searched codes of train clips (audio_code_search.py --split train)")
    parser.add_argument("--estimator", choices=("ste", "softmax"), default="softmax",
                        help="--objective waveform: how the gradient passes the code choice")
    parser.add_argument("--commitment-weight", type=float, default=None,
                        help="--objective waveform: weight of ||latent - its code||^2 (default: the codec's own)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="divides the choice logits (squared distances); 0: the median gap between the nearest "
                             "and second-nearest code's at the start, so close candidates differ by about one")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="")
    parser.add_argument("--tokenizer-out", type=Path, default=None,
                        help="folder for the tuned tokenizer (the best step's encoder, the run's decoder)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    if args.objective == "codes" and args.codes is None:
        raise SystemExit("--objective codes learns from --codes FILE (audio_code_search.py --split train --codes)")
    config, dataset, tokenizer, prior, tokenset = load_run(args.run, args.threads, args.seed)
    rate = dataset.sample_rate
    record = {"run": str(args.run), "objective": args.objective, "machine": machine(args),
              "date": datetime.date.today().isoformat(), "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "curve": []}
    val_clips, val_lengths = as_tensors(dataset.val)

    if args.objective == "codes":
        held = held_codes(args.codes)
        if codes_split(args.codes) != "train":
            raise SystemExit(f"{args.codes}: holds codes of {codes_split(args.codes)} clips; teach from train clips "
                             "(audio_code_search.py --split train), so the test split stays unseen")
        clips, lengths = as_tensors(dataset.train, held["clips"].numpy())
        targets = held["codes"].reshape(len(clips), -1, tokenizer.num_codebooks)
        real = real_frames(lengths, tokenizer.hop_length, targets.shape[1])
        check = np.arange(len(clips)) % 10 == 0
        learn_rows = np.flatnonzero(~check)
        record.update(codes=str(args.codes), searched_clips=len(clips), held_out_clips=int(check.sum()),
                      searched_sweeps=int(held["sweeps"]))
    else:
        clips, lengths = as_tensors(dataset.train)
        real = real_frames(lengths, tokenizer.hop_length, frames_of(clips.shape[-1], tokenizer.hop_length))
        learn_rows = np.arange(len(clips))
        commitment_weight = (codec_commitment_weight(tokenizer) if args.commitment_weight is None
                             else args.commitment_weight)
        record.update(estimator=args.estimator, commitment_weight=commitment_weight)
    temperature = args.temperature or nearest_gap(tokenizer, clips[learn_rows[:512]], real[learn_rows[:512]])
    record["temperature"] = temperature

    def agreement(rows: np.ndarray) -> float:
        """Share of real code positions where the encoder's own code is the searched one."""
        return float((own_codes(tokenizer, clips[rows]) == targets[rows])[real[rows]].float().mean())

    def evaluate(step: int, loss: float | None) -> dict:
        figures = {"step": step, "loss": loss, "val_si_snr_db": own_si_snr(tokenizer, val_clips, val_lengths, rate)}
        line = f"step {step}: val SI-SNR {figures['val_si_snr_db']:.3f} dB"
        if args.objective == "codes":
            figures.update(agreement_learned=agreement(learn_rows), agreement_held_out=agreement(np.flatnonzero(check)))
            line += (f", picks the searched code on {100 * figures['agreement_learned']:.1f}% (learned) / "
                     f"{100 * figures['agreement_held_out']:.1f}% (held-out clips)")
        print(line + ("" if loss is None else f", loss {loss:.4f}"), flush=True)
        return figures

    for parameter in tokenizer.parameters():
        parameter.requires_grad_(False)
    for parameter in tokenizer.encoder.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(tokenizer.encoder.parameters(), lr=args.lr, weight_decay=0.0)
    record["curve"].append(evaluate(0, None))
    base_encoder = copy.deepcopy(tokenizer.encoder.state_dict())
    best, best_encoder = record["curve"][0], copy.deepcopy(base_encoder)
    started, losses = time.perf_counter(), []
    generator = np.random.default_rng(args.seed)
    for step in tqdm(range(1, args.steps + 1), desc="tuning the encoder"):
        batch = generator.choice(learn_rows, size=min(args.batch_size, len(learn_rows)), replace=False)
        if args.objective == "codes":
            loss = codes_loss(tokenizer, clips[batch], targets[batch], real[batch], temperature)
        else:
            loss = waveform_loss(tokenizer, clips[batch], lengths[batch], args.estimator, temperature,
                                 commitment_weight)
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step}: the loss is {float(loss)}; stopped (no tokenizer written)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            figures = evaluate(step, float(np.mean(losses[-args.eval_every:])))
            record["curve"].append(figures)
            if figures["val_si_snr_db"] > best["val_si_snr_db"]:
                best, best_encoder = figures, copy.deepcopy(tokenizer.encoder.state_dict())
            save_record(record, args.out)
    record.update(train_seconds=time.perf_counter() - started, best_step=best["step"])

    test_clips, test_lengths = as_tensors(dataset.test)
    labels = torch.as_tensor(dataset.test.labels)
    judge = run_judge(args.run, config, dataset)
    for name, state in (("before", base_encoder), ("after", best_encoder)):
        tokenizer.encoder.load_state_dict(state)
        codes = search_codes(tokenizer, test_clips, test_lengths, sweeps=0).codes
        record[f"test_{name}"] = figures = score(codes, tokenizer, prior, tokenset.manifest, test_clips, test_lengths,
                                                 labels, judge)
        print(f"test, encoder {name}: SI-SNR {figures['si_snr_db']:.2f} dB (median {figures['si_snr_db_median']:.2f}),"
              f" recognised {100 * figures['recognised']:.1f}%, the run's prior {figures['prior_bits_per_second']:.0f}"
              " bit/s", flush=True)
    if args.tokenizer_out is not None:
        tokenizer.save_pretrained(args.tokenizer_out)
        record["tokenizer_out"] = str(args.tokenizer_out)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
