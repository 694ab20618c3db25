"""Teach a codec's encoder the codes its search finds, and measure what its own codes then score.

    python benchmarks/audio_code_search.py RUN --split train --clips 400 --sweeps 2 --codes train.safetensors
    python benchmarks/audio_search_distill.py RUN --codes train.safetensors --steps 600 --out distill.json \
        --tokenizer-out tuned_tokenizer

The search (`tokenizers_vq.audio_code_search`) finds codes that decode closer to the waveform than the
encoder's nearest codes, at the same bit rate, but costs many decodes a code. Here the encoder alone is
fine-tuned, decoder and codebook fixed, by a cross-entropy towards the searched codes of train clips
(`code_choice_logits`): as far as it learns to pick them, the codec's own encoding gains the search's
SI-SNR at no cost in time. Every tenth searched clip is held out, to measure how often the encoder
picks the searched code on clips it did not learn from; the validation split's own-code SI-SNR picks
the best step (the encoder as it was, if no step beats it); the test split's figures (the search
benchmark's `score`) compare the encoder before and after. The run's prior learned the old encoder's
codes, so its bits on the new ones include what that mismatch costs: an upper bound on the rate a
prior trained on the new codes would reach, not that rate.
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
from tokenizers_vq.audio_code_search import code_choice_logits, search_codes

try:
    from benchmarks.audio_code_search import codes_split, held_codes, score
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_code_search import codes_split, held_codes, score
    from audio_codec_eval import machine, save_record

EVAL_BATCH = 64  # clips encoded and decoded at once to score a split


def real_frames(lengths: torch.Tensor, hop: int, grid_frames: int) -> torch.Tensor:
    """`(n,)` lengths in samples -> `(n frames)` True where a frame holds real samples."""
    return torch.arange(grid_frames) < (-(-lengths // hop))[:, None]


def agreement(tokenizer, clips: torch.Tensor, targets: torch.Tensor, real: torch.Tensor) -> float:
    """Share of real code positions where the encoder's own code is the searched one."""
    with torch.no_grad():
        picks = torch.cat([tokenizer.quantizer.to_indices(tokenizer._latents(part)) for part in clips.split(EVAL_BATCH)])
    picks = picks.reshape(targets.shape)
    return float((picks == targets)[real].float().mean())


def own_si_snr(tokenizer, clips: torch.Tensor, lengths: torch.Tensor, sample_rate: int) -> float:
    """Mean SI-SNR (dB) of the codec's own reconstructions of `(n c t)` clips."""
    with torch.no_grad():
        decoded = torch.cat([tokenizer.decode(tokenizer.encode(part), length=clips.shape[-1]).float()
                             for part in clips.split(EVAL_BATCH)])
    decoded = decoded * lengths_to_mask(lengths, clips.shape[-1])[:, None]
    return audio_eval.waveform_metrics(decoded, clips, lengths, sample_rate)["si_snr_db"]


def nearest_gap(tokenizer, clips: torch.Tensor, real: torch.Tensor) -> float:
    """Median gap, in squared latent distance, between the nearest code and the second nearest at each real
    frame (first level): the logits' natural scale."""
    with torch.no_grad():
        logits = torch.cat([code_choice_logits(tokenizer.quantizer, tokenizer._latents(part),
                                               torch.zeros(len(part), 1, tokenizer.num_codebooks, dtype=torch.long))[0]
                            for part in clips.split(EVAL_BATCH)])
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1])[real].median())


def choice_loss(tokenizer, clips: torch.Tensor, targets: torch.Tensor, real: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Cross-entropy of the encoder's code choice towards the searched codes, over real frames and levels."""
    logits = code_choice_logits(tokenizer.quantizer, tokenizer._latents(clips), targets)
    return sum(F.cross_entropy(level_logits[real] / temperature, targets[..., level][real])
               for level, level_logits in enumerate(logits)) / len(logits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished audio run (tokenizer, tokens, prior, classifier)")
    parser.add_argument("--codes", type=Path, required=True,
                        help="searched codes of train clips (audio_code_search.py --split train --codes)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="divides the logits (squared distances); 0: the median gap between the nearest and "
                             "second-nearest code's at the start, so close candidates differ by about one")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="")
    parser.add_argument("--tokenizer-out", type=Path, default=None,
                        help="folder for the tuned tokenizer (the best step's encoder, the run's decoder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    keep_freed_memory()
    held = held_codes(args.codes)
    if codes_split(args.codes) != "train":
        raise SystemExit(f"{args.codes}: holds codes of {codes_split(args.codes)} clips; teach from train clips "
                         "(audio_code_search.py --split train), so the test split stays unseen")
    config = resolved_run_config(args.run)
    dataset = load_audio_dataset(config.audio_data)
    tokenizer, prior, tokenset = load_matched_pair(args.run, "cpu")
    manifest, hop, rate = tokenset.manifest, tokenizer.hop_length, dataset.sample_rate
    chosen = held["clips"].numpy()
    clips = torch.from_numpy(np.ascontiguousarray(dataset.train.waveforms[chosen], dtype=np.float32))
    lengths = torch.from_numpy(dataset.train.lengths[chosen])
    targets = held["codes"].reshape(len(chosen), -1, tokenizer.num_codebooks)
    real = real_frames(lengths, hop, targets.shape[1])
    learn, check = np.arange(len(chosen)) % 10 != 0, np.arange(len(chosen)) % 10 == 0
    val_clips = torch.from_numpy(np.ascontiguousarray(dataset.val.waveforms, dtype=np.float32))
    val_lengths = torch.as_tensor(dataset.val.lengths)

    temperature = args.temperature or nearest_gap(tokenizer, clips[learn], real[learn])
    for parameter in tokenizer.parameters():
        parameter.requires_grad_(False)
    for parameter in tokenizer.encoder.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(tokenizer.encoder.parameters(), lr=args.lr, weight_decay=0.0)

    def evaluate(step: int, loss: float | None) -> dict:
        figures = {"step": step, "loss": loss, "val_si_snr_db": own_si_snr(tokenizer, val_clips, val_lengths, rate),
                   "agreement_learned": agreement(tokenizer, clips[learn], targets[learn], real[learn]),
                   "agreement_held_out": agreement(tokenizer, clips[check], targets[check], real[check])}
        print(f"step {step}: val SI-SNR {figures['val_si_snr_db']:.3f} dB, picks the searched code on "
              f"{100 * figures['agreement_learned']:.1f}% (learned) / {100 * figures['agreement_held_out']:.1f}% "
              f"(held-out clips)" + ("" if loss is None else f", loss {loss:.4f}"), flush=True)
        return figures

    record = {"run": str(args.run), "codes": str(args.codes), "machine": machine(args),
              "date": datetime.date.today().isoformat(), "searched_clips": len(chosen),
              "held_out_clips": int(check.sum()), "searched_sweeps": int(held["sweeps"]),
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "temperature": temperature,
              "curve": [evaluate(0, None)]}
    base_encoder = copy.deepcopy(tokenizer.encoder.state_dict())
    best, best_encoder = record["curve"][0], copy.deepcopy(base_encoder)
    learn_rows, started, losses = np.flatnonzero(learn), time.perf_counter(), []
    generator = np.random.default_rng(args.seed)
    for step in tqdm(range(1, args.steps + 1), desc="teaching the encoder"):
        batch = generator.choice(learn_rows, size=min(args.batch_size, len(learn_rows)), replace=False)
        loss = choice_loss(tokenizer, clips[batch], targets[batch], real[batch], temperature)
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step}: the loss is {float(loss)}; stopped, the best step so far is kept")
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

    test = dataset.test
    test_clips = torch.from_numpy(np.ascontiguousarray(test.waveforms, dtype=np.float32))
    test_lengths, labels = torch.as_tensor(test.lengths), torch.as_tensor(test.labels)
    classifier, _ = audio_eval.dataset_audio_classifier(args.run / "classifier", dataset, config.audio.classifier)
    judge = classifier, partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=rate)
    for name, state in (("before", base_encoder), ("after", best_encoder)):
        tokenizer.encoder.load_state_dict(state)
        codes = search_codes(tokenizer, test_clips, test_lengths, sweeps=0).codes
        record[f"test_{name}"] = figures = score(codes, tokenizer, prior, manifest, test_clips, test_lengths, labels, judge)
        print(f"test, encoder {name}: SI-SNR {figures['si_snr_db']:.2f} dB (median {figures['si_snr_db_median']:.2f}),"
              f" recognised {100 * figures['recognised']:.1f}%, the run's prior {figures['prior_bits_per_second']:.0f}"
              " bit/s", flush=True)
    if args.tokenizer_out is not None:
        tokenizer.save_pretrained(args.tokenizer_out)
        record["tokenizer_out"] = str(args.tokenizer_out)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
