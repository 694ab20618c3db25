"""What an analysis-by-synthesis encoder buys a finished audio run: the same decoder and bit rate, codes
searched for the waveform (`tokenizers_vq.audio_code_search`).

    python benchmarks/audio_code_search.py runs/fsdd_cpu --clips 100 --sweeps 2 --candidates 8 --out search.json

On `--clips` clips spread over the run's test split (0: all; `--split train` or `val` for another), as
the run holds them (its peak level), this scores the reconstructions of the encoder's codes and of the
searched codes after each sweep: SI-SNR (mean and median), STFT and mel distances, the share the run's
spoken-digit classifier recognises, and what the run's prior would spend on the codes (its NLL, in bits
per second and per token: the entropy-coded rate to within about 1%, BENCHMARKS.md). The search
minimises squared waveform error (plus `--rate-weight` x the prior's bits, if given), so what it does to
the classifier and to the prior is measured, not assumed. `--reach R` scores each candidate over R frames
each side instead of the decoder's whole reach: faster, and approximate. Searched train clips are what
`audio_encoder_tuning.py` teaches the encoder from.

`--codes FILE` keeps the searched codes (safetensors) after every sweep; run again with the same file and a
larger `--sweeps` and the search goes on from the sweeps it holds, as each sweep starts from the last one's
codes anyway. A search grows to more clips in pieces: `--except-codes DONE` searches the chosen clips that
DONE does not hold, and `--join-codes DONE REST --codes ALL` joins the pieces (the same sweeps, other clips),
so a run with `--sweeps` equal to theirs scores the whole set without searching.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipelines import audio_eval, layouts
from pipelines.audio_data import load_audio_dataset, lengths_to_mask
from pipelines.classifier import classifier_logits
from pipelines.cpu_memory import keep_freed_memory
from pipelines.prompting import resolved_run_config
from pipelines.stages import load_matched_pair
from pipelines.tokenset import frames_of
from tokenizers_vq.audio_code_search import decode_batch_size, from_grid, search_codes

try:
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_codec_eval import machine, save_record


def score(codes, tokenizer, prior, manifest, clips, lengths, labels, judge) -> dict:
    """Waveform figures, recognition and the prior's cost of one set of `(n frames q)` codes."""
    with torch.no_grad():
        decoded = tokenizer.decode(from_grid(codes, tokenizer.num_codebooks), length=clips.shape[-1])
    decoded = decoded.float() * lengths_to_mask(lengths, clips.shape[-1])[:, None]
    figures = audio_eval.waveform_metrics(decoded, clips, lengths, manifest.sample_rate)
    classifier, features = judge
    predictions = classifier_logits(classifier, features(decoded)).argmax(dim=-1)
    figures["recognised"] = float((predictions == labels).float().mean())
    rows = torch.arange(len(codes))
    bits = sum(float(prior_bits(prior, manifest, lengths, codes[part], rows[part]).sum())
               for part in rows.split(64))
    tokens = float(manifest.valid_token_mask(frames_of(lengths, manifest.hop_length)).sum())
    figures.update(prior_bits_per_second=bits * manifest.sample_rate / float(lengths.sum()),
                   prior_bits_per_token=bits / tokens)
    return figures


def prior_bits(prior, manifest, lengths: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor,
               at: torch.Tensor | None = None) -> torch.Tensor:
    """`(m frames q)` codes of the clips `rows` -> `(m,)` bits the prior would spend on them (each clip is
    one sequence of the prior, so whichever frame `at` changed, the whole clip is scored)."""
    sequences = layouts.apply_layout(codes.cpu(), manifest.order, manifest.codebook_size)
    mask = manifest.valid_token_mask(frames_of(lengths[rows.cpu()], manifest.hop_length))
    with torch.no_grad():
        return -prior.log_prob(sequences, None, mask) / np.log(2.0)


def saved_sweeps(path: Path, chosen: np.ndarray, codes: torch.Tensor, split: str) -> tuple[int, torch.Tensor]:
    """The sweeps done and codes held by a `--codes` file of these clips; (0, codes) when there is none."""
    if not path.exists():
        return 0, codes
    held = held_codes(path)
    if codes_split(path) != split:
        raise SystemExit(f"{path}: holds codes of {codes_split(path)} clips; this search is of {split} clips")
    done, clips, saved = int(held["sweeps"]), held["clips"], held["codes"]
    if not torch.equal(clips, torch.from_numpy(chosen)) or saved.shape != codes.shape:
        raise SystemExit(f"{path}: holds codes of other clips or another codec (codes {tuple(saved.shape)}, "
                         f"{len(clips)} clips; this search: {tuple(codes.shape)}, {len(chosen)} clips)")
    return done, saved.to(codes.dtype)


def held_codes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `--codes` file, or a message naming the file."""
    try:
        held = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - whatever safetensors makes of a torn file, the same message
        raise SystemExit(f"{path}: not a code-search codes file ({error!r})") from None
    missing = {"sweeps", "clips", "codes"} - held.keys()
    if missing:
        raise SystemExit(f"{path}: not a code-search codes file (it lacks {', '.join(sorted(missing))})")
    return held


def codes_split(path: Path) -> str:
    """The split whose clips a `--codes` file indexes (test for files written before the split was kept)."""
    with safe_open(str(path), "pt") as handle:
        return (handle.metadata() or {}).get("split", "test")


def save_codes(path: Path, codes: torch.Tensor, clips: torch.Tensor, sweeps: int, split: str) -> None:
    """A `--codes` file: the searched codes, the indices of their clips in `split`, the sweeps done."""
    save_file({"codes": codes.contiguous(), "clips": clips, "sweeps": torch.tensor(sweeps)}, str(path),
              metadata={"split": split})


def join_codes(pieces: list[Path], out: Path) -> None:
    """Joins codes files of other clips of one codec, searched for the same sweeps, into one file `out`,
    clips in order."""
    held = [held_codes(path) for path in pieces]
    sweeps = {int(piece["sweeps"]) for piece in held}
    if len(sweeps) > 1:
        raise SystemExit(f"--join-codes: the pieces hold different sweeps ({sorted(sweeps)}); search each to the "
                         "same number first")
    clips = torch.cat([piece["clips"] for piece in held])
    if len(clips.unique()) < len(clips):
        raise SystemExit("--join-codes: the pieces share clips; join searches of other clips only")
    if len({piece["codes"].shape[1:] for piece in held}) > 1:
        raise SystemExit("--join-codes: the pieces hold codes of different shapes (another codec or clip length)")
    splits = {codes_split(path) for path in pieces}
    if len(splits) > 1:
        raise SystemExit(f"--join-codes: the pieces hold clips of different splits ({sorted(splits)})")
    order = clips.argsort()
    save_codes(out, torch.cat([piece["codes"] for piece in held])[order], clips[order], sweeps.pop(), splits.pop())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished audio run (tokenizer, tokens, prior, classifier)")
    parser.add_argument("--data", default=None, help="the run's audio data path, if it has moved")
    parser.add_argument("--clips", type=int, default=100, help="clips spread over the split; 0: all")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="the run's split to search (train: targets to teach an encoder the searched codes)")
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--rate-weight", type=float, default=0.0,
                        help="> 0: judge candidates by squared error + this x the prior's bits (rate-distortion)")
    parser.add_argument("--device", default="cpu", help="where the codec decodes its candidates (cuda on a GPU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=None,
                        help="candidate windows decoded at once (default: 16 on the CPU, 256 elsewhere)")
    parser.add_argument("--reach", type=int, default=None,
                        help="frames each side a candidate is scored over (default: the decoder's whole reach, "
                             "exact); shorter is faster and approximate")
    parser.add_argument("--out", default="")
    parser.add_argument("--codes", type=Path, default=None,
                        help="safetensors file of the searched codes, written after every sweep; if it exists, "
                             "the search goes on from it")
    parser.add_argument("--except-codes", type=Path, nargs="+", default=[],
                        help="codes files of clips already searched: search the chosen clips they do not hold")
    parser.add_argument("--join-codes", type=Path, nargs="+", default=[],
                        help="codes files of other clips, the same sweeps: join them into --codes first")
    args = parser.parse_args(argv)
    if args.join_codes:
        if args.codes is None or args.codes.exists():
            raise SystemExit("--join-codes writes a new --codes file: name one that does not exist yet")
        join_codes(args.join_codes, args.codes)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    batch_size = args.batch_size or decode_batch_size(args.device)
    config = resolved_run_config(args.run)
    data_config = config.audio_data if args.data is None else dataclasses.replace(config.audio_data, path=args.data)
    tokenizer, prior, tokenset = load_matched_pair(args.run, "cpu")
    searcher = tokenizer if args.device == "cpu" else copy.deepcopy(tokenizer).to(args.device)
    manifest, dataset = tokenset.manifest, load_audio_dataset(data_config)
    split = dataset.splits()[args.split]
    chosen = (np.arange(len(split)) if not args.clips or args.clips >= len(split)
              else np.linspace(0, len(split) - 1, args.clips).round().astype(int))
    searched = [held_codes(path)["clips"].numpy() for path in args.except_codes]  # each file readable first
    for path in args.except_codes:
        if codes_split(path) != args.split:
            raise SystemExit(f"--except-codes: {path} holds codes of {codes_split(path)} clips, not {args.split}")
    chosen = np.setdiff1d(chosen, np.concatenate(searched)) if searched else chosen
    if not len(chosen):
        raise SystemExit("--except-codes: the files hold every chosen clip; nothing is left to search")
    clips, lengths = torch.from_numpy(split.waveforms[chosen]), torch.from_numpy(split.lengths[chosen])
    labels = torch.from_numpy(split.labels[chosen])
    classifier, _ = audio_eval.dataset_audio_classifier(args.run / "classifier", dataset, config.audio.classifier)
    judge = classifier, partial(audio_eval.log_mel_features, config=config.audio.classifier,
                                sample_rate=manifest.sample_rate)
    parts = (tokenizer, prior, manifest, clips, lengths, labels, judge)
    record = {"run": str(args.run), "machine": machine(args), "date": datetime.date.today().isoformat(),
              "split": args.split, "clips": len(chosen), "except_codes": [str(path) for path in args.except_codes],
              "joined_from": [str(path) for path in args.join_codes], "candidates": args.candidates,
              "batch_size": batch_size, "rate_weight": args.rate_weight, "sweeps": {}}
    audio_seconds = float(lengths.sum()) / manifest.sample_rate
    rate = partial(prior_bits, prior, manifest, lengths) if args.rate_weight > 0 else None

    def report(name: str, figures: dict) -> None:
        print(f"{name:>16}: SI-SNR {figures['si_snr_db']:.2f} dB (median {figures['si_snr_db_median']:.2f}), STFT "
              f"{figures['stft_distance']:.3f}, mel {figures['mel_distance']:.3f}, recognised "
              f"{100 * figures['recognised']:.1f}%, prior {figures['prior_bits_per_second']:.0f} bit/s "
              f"({figures['prior_bits_per_token']:.2f} bits/token)", flush=True)

    codes = search_codes(searcher, clips, lengths, sweeps=0).codes
    record["sweeps"]["0"] = figures = score(codes, *parts)
    report("encoder's codes", figures)
    done = 0
    if args.codes is not None:
        done, codes = saved_sweeps(args.codes, chosen, codes, args.split)
        if done:
            record["resumed_from"] = {"codes": str(args.codes), "sweeps": done}
            record["sweeps"][str(done)] = figures = score(codes, *parts)
            report(f"{done} sweep(s), saved", figures)
    for sweep in range(done + 1, args.sweeps + 1):  # one sweep at a time, each from the last one's codes
        started = time.perf_counter()
        result = search_codes(searcher, clips, lengths, args.candidates, 1, progress=True, initial=codes, rate=rate,
                              rate_weight=args.rate_weight, batch_size=batch_size, reach=args.reach)
        seconds, codes = time.perf_counter() - started, result.codes
        figures = score(codes, *parts)
        figures.update(changed_positions=float(result.changed.float().mean()), sweep_seconds=seconds,
                       reach=result.reach, audio_seconds_per_second=audio_seconds / seconds)
        record["sweeps"][str(sweep)] = figures
        report(f"{sweep} sweep(s)", figures)
        save_record(record, args.out)  # kept after every sweep: a long search may be stopped
        if args.codes is not None:
            save_codes(args.codes, codes, torch.from_numpy(chosen), sweep, args.split)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
