"""The `tokgen` command line: one verb per stage, and `run` for all of them.

    tokgen run [CONFIG] [key=value ...]           train tokenizer, export tokens, train prior, sample, evaluate
    tokgen train-tokenizer | export-tokens | train-prior | sample | eval  [CONFIG] [key=value ...]
    tokgen generate RUN_DIR --label 3 --num 16     ad-hoc conditioned samples from a finished run
    tokgen generate RUN_DIR --prompt FILE          continue the beginning of your own image or clip
    tokgen compare CONFIG [key=value ...]          train/evaluate a list of models on one split, one table
    tokgen compress RUN_DIR --split test           entropy-code a token split with the run's prior (file + bits)
    tokgen compress RUN_DIR --input FILE_OR_DIR... code your own audio or image files into one token file
    tokgen decompress FILE RUN_DIR                 decode such a file: tokens, and WAVs or PNGs

CONFIG is a TOML file (see configs/); without one the built-in CPU default runs on the MNIST subset
bundled with the package. Overrides use dotted keys: `prior_training.max_steps=200`.
Under `accelerate launch` every verb runs on all processes; training is data-parallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipelines.compression import CompressedFileError
from pipelines.config import ConfigError, load_run_config
from pipelines.data import DataError
from pipelines.loop import TrainingDivergedError, release_process_group
from pipelines.stages import RunError
from pipelines.tokenset import TokenSetError

logger = logging.getLogger("tokgen")

STAGE_VERBS = ("run", "train-tokenizer", "export-tokens", "train-prior", "sample", "eval")


def _stage_parser(subparsers, verb: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(verb, help=help_text)
    parser.add_argument("config", nargs="?", help="TOML run config (default: built-in CPU MNIST config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted training stage from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="recompute the stage(s) even if outputs exist for this config")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    _stage_parser(subparsers, "run", "run the whole two-stage pipeline")
    _stage_parser(subparsers, "train-tokenizer", "stage one: train the tokenizer")
    _stage_parser(subparsers, "export-tokens", "encode the dataset into a token set")
    _stage_parser(subparsers, "train-prior", "stage two: train the prior on the token set")
    _stage_parser(subparsers, "sample", "draw class grids, evaluation samples and completions")
    _stage_parser(subparsers, "eval", "evaluate and write metrics.json")
    compare = subparsers.add_parser("compare", help="train and evaluate several models on one split; write a table")
    compare.add_argument("config", help="TOML compare config (see configs/compare/)")
    compare.add_argument("overrides", nargs="*", help="key=value overrides; models.<name>.key=value for one model")
    generate = subparsers.add_parser("generate", help="sample images (or WAV clips) from a finished run")
    generate.add_argument("run_dir", type=Path)
    generate.add_argument("--label", type=int, default=None, help="class label (default: unconditional / null class)")
    generate.add_argument("--num", type=int, default=16)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--guidance-scale", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/samples/generated.png); for audio a folder "
                          "for the WAVs (default RUN_DIR/samples/generated/)")
    generate.add_argument("--prompt", type=Path, default=None,
                          help="an image (image run) or audio file (audio run) whose beginning the prior continues")
    generate.add_argument("--prompt-rows", type=int, default=None,
                          help="image prompt: token rows kept from the top (default: half of them)")
    generate.add_argument("--prompt-seconds", type=float, default=None,
                          help="audio prompt: seconds kept from the start (default: the run's audio.prefix_seconds)")
    compress = subparsers.add_parser("compress", help="entropy-code a run's token split, or your own files, with its "
                                     "tokenizer and prior; report the bits")
    compress.add_argument("run_dir", type=Path)
    source = compress.add_mutually_exclusive_group()
    source.add_argument("--split", default="test", help="a split of the run's own token set (default: test)")
    source.add_argument("--input", type=Path, nargs="+", default=None,
                        help="audio (image) files or folders of them, for an audio (image) run: coded through the "
                        "run's tokenizer; long audio in segments of the run's clip length")
    compress.add_argument("--out", type=Path, default=None,
                          help="default RUN_DIR/compressed/SPLIT.tgac (NAME.tgac or files.tgac for --input)")
    compress.add_argument("--conditioned", action="store_true",
                          help="a split only: code each item under its class label (sent along)")
    compress.add_argument("--batch-size", type=int, default=64)
    compress.add_argument("--limit", type=int, default=None, help="only the first N items of the split")
    compress.add_argument("--search-sweeps", type=int, default=0,
                          help="--input audio: sweeps of a search for the codes that decode closest to each file "
                          "(slower encoding; same decoder and plain bit rate)")
    compress.add_argument("--search-candidates", type=int, default=8, help="nearest codes tried at each position")
    compress.add_argument("--rate-weight", type=float, default=0.0,
                          help="with --search-sweeps: also weigh the prior's bits (squared-error units per bit)")
    compress.add_argument("--search-reach", type=int, default=None,
                          help="with --search-sweeps: frames each side a candidate is scored over (default: the "
                          "decoder's whole reach, exact; shorter is faster and approximate)")
    decompress = subparsers.add_parser("decompress", help="decode a `tokgen compress` file with the run that wrote it")
    decompress.add_argument("file", type=Path)
    decompress.add_argument("run_dir", type=Path)
    decompress.add_argument("--out", type=Path, default=None, help="folder (default: FILE without its suffix)")
    return parser


def compress_command(args) -> Path:
    from pipelines.compression import compress_split
    from pipelines.cpu_memory import keep_freed_memory
    from pipelines.file_compression import compress_files
    from pipelines.searched_encoding import CodeSearch

    if args.input is None:
        if args.search_sweeps or args.rate_weight:
            raise SystemExit("--search-sweeps and --rate-weight apply to --input audio files, not to a split's stored tokens")
        path, report = compress_split(args.run_dir, args.split, args.out, args.conditioned, args.batch_size, args.limit)
        record = report.as_dict()
    else:
        if args.conditioned or args.limit is not None:
            raise SystemExit("--conditioned and --limit apply to a split, not to --input files (which have no labels)")
        search = CodeSearch(args.search_sweeps, args.search_candidates, args.rate_weight, args.search_reach)
        try:
            search.check()
        except ValueError as error:
            raise SystemExit(f"tokgen compress: {error}") from None
        if search.sweeps:
            keep_freed_memory()  # the search decodes thousands of windows (pipelines/cpu_memory.py)
        path, report, quality = compress_files(args.run_dir, args.input, args.out, args.batch_size, search=search)
        record = dict(report.as_dict(), decoded=quality)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return path


def decompress_command(args) -> Path:
    """Tokens (`tokens.safetensors`) and what they decode to: one WAV per clip, trimmed, or a PNG grid."""
    import torch
    from safetensors.torch import save_file

    from pipelines.compression import decompress_file
    from pipelines.images import save_image_grid
    from pipelines.stages import decode_tokens
    from pipelines.tokenset import frames_of
    from tokenizers_vq import load_tokenizer

    # the token set's manifest was checked against this tokenizer's weights when the file was decoded
    decoded = decompress_file(args.file, args.run_dir, progress=True)
    tokens, compressed, manifest = decoded
    out = args.out or args.file.with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    if "sources" in compressed.header:  # the user's own files (`compress --input`): each back under its name
        from pipelines.file_compression import write_decoded_files

        write_decoded_files(decoded, args.run_dir, out, args.file)
        return out
    tokenizer = load_tokenizer(args.run_dir / "tokenizer").eval()
    columns = {"input_ids": tokens}
    for name in ("num_samples", "label"):
        values = [getattr(item, name) for item in compressed.items]
        if None not in values:
            columns[name] = torch.tensor(values, dtype=torch.long)
    if "num_samples" in columns:
        columns["num_frames"] = frames_of(columns["num_samples"], manifest.hop_length)
    save_file(columns, str(out / "tokens.safetensors"))
    if manifest.modality != "audio":
        save_image_grid(decode_tokens(tokenizer, tokens, manifest), out / "decoded.png", nrow=8)
        return out
    from pipelines.audio_stages import decode_audio_tokens, write_wavs

    clips = decode_audio_tokens(tokenizer, tokens, manifest)
    for index, (clip, samples) in enumerate(zip(clips, columns["num_samples"].tolist())):
        write_wavs(clip[None, :, :samples], [f"{index:05d}"], out, manifest.sample_rate)
    return out


def _split_config_and_overrides(args) -> tuple[str | None, list[str]]:
    """`tokgen run key=value` has no config file: argparse puts the first override in `config`."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return config, overrides


def run_stages(verb: str, config_path: str | None, overrides: list[str], resume: bool, force: bool) -> dict:
    from pipelines.evaluation_stage import evaluate_run
    from pipelines.generation import sample_stage
    from pipelines.stages import Run, export_tokens_stage, train_prior_stage, train_tokenizer_stage

    run = Run(load_run_config(config_path, overrides))
    run.write_resolved_config()
    logger.info("run folder: %s", run.directory)
    everything = verb == "run"
    if everything or verb == "train-tokenizer":
        train_tokenizer_stage(run, resume=resume, force=force)
    if everything or verb == "export-tokens":
        export_tokens_stage(run, force=force)
    if everything or verb == "train-prior":
        train_prior_stage(run, resume=resume, force=force)
    if everything or verb == "sample":
        sample_stage(run, force=force)
    if everything or verb == "eval":
        return evaluate_run(run)
    return {}


def generate_command(args) -> Path:
    import torch

    from pipelines.generation import sample_labelled
    from pipelines.images import save_image_grid
    from pipelines.stages import decode_tokens, load_matched_pair
    from priors import SamplingOptions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, prior, tokenset = load_matched_pair(args.run_dir, device)
    manifest = tokenset.manifest
    if args.label is not None and not 0 <= args.label < max(manifest.num_classes, 1):
        raise SystemExit(f"--label {args.label} is outside this run's {manifest.num_classes} classes")
    options = SamplingOptions(args.temperature, args.top_k, args.top_p, args.guidance_scale)
    if args.prompt is not None:
        return generate_from_prompt(args, tokenizer, prior, tokenset, options, device)
    if manifest.modality == "audio":  # WAVs (and a spectrogram PNG) instead of an image grid
        from pipelines.audio_stages import generate_audio_clips

        out = args.out or args.run_dir / "samples" / "generated"
        return generate_audio_clips(tokenizer, prior, tokenset, args.label, args.num, options, args.seed, out, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.label is None:
        tokens = prior.sample(args.num, options=options, generator=generator).cpu()
    else:
        labels = torch.full((args.num,), args.label, device=device)
        tokens = sample_labelled(prior, labels, options, generator, batch_size=256)
    out = args.out or args.run_dir / "samples" / "generated.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(decode_tokens(tokenizer, tokens, manifest), out, nrow=min(args.num, 8))
    return out


def generate_from_prompt(args, tokenizer, prior, tokenset, options, device) -> Path:
    from pipelines.prompting import continue_audio_prompt, continue_image_prompt

    common = dict(label=args.label, num=args.num, options=options, seed=args.seed, device=device)
    if tokenset.manifest.modality == "audio":
        out = args.out or args.run_dir / "samples" / "prompted"
        return continue_audio_prompt(args.prompt, args.run_dir, tokenizer, prior, tokenset, args.prompt_seconds,
                                     out_dir=out, **common)
    out = args.out or args.run_dir / "samples" / "prompted.png"
    return continue_image_prompt(args.prompt, tokenizer, prior, tokenset.manifest, args.prompt_rows, out=out, **common)


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_trailing_overrides(build_parser(), argv)


def parse_with_trailing_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, except that key=value overrides may also follow the flags (`tokgen run cfg.toml
    --resume a.b=1`): argparse alone takes positionals only up to the first flag and refuses the rest."""
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    finished = False  # only a finished command waits for the other processes before leaving
    try:
        if args.verb == "generate":
            print(f"wrote {generate_command(args)}")
            finished = True
            return 0
        if args.verb in ("compress", "decompress"):
            print(f"wrote {(compress_command if args.verb == 'compress' else decompress_command)(args)}")
            finished = True
            return 0
        if args.verb == "compare":
            from pipelines.compare import load_compare_config, run_comparison

            report = run_comparison(load_compare_config(args.config, args.overrides))
            table = Path(report["directory"]) / "comparison.md"
            print(f"{table.read_text()}\nwrote {table}, comparison.json and comparison.png")
            finished = True
            return 0
        config_path, overrides = _split_config_and_overrides(args)
        metrics = run_stages(args.verb, config_path, overrides, args.resume, args.force)
        finished = True
    except ConfigError as error:
        print(f"tokgen: config error: {error}", file=sys.stderr)
        return 2
    except (RunError, DataError, TokenSetError, CompressedFileError) as error:
        print(f"tokgen: {error}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        print(f"tokgen: training stopped: {error}", file=sys.stderr)
        return 3
    finally:
        release_process_group(wait_for_others=finished)
    if metrics:
        print(json.dumps(summarise(metrics), indent=2))
    return 0


def summarise(metrics: dict) -> dict:
    """The handful of figures a person looks at first; metrics.json has the rest."""
    keys = {
        "tokenizer": ("psnr", "si_snr_db", "stft_distance", "mel_distance", "bitrate_bps", "test_usage",
                      "test_perplexity"),
        "prior": ("nll_nats_per_item", "bits_per_token", "entropy_coded_bits_per_second"),
        "samples": ("class_accuracy", "class_accuracy_stderr", "frechet_distance", "frechet_floor", "classifier_test_accuracy"),
    }
    return {group: {k: metrics[group][k] for k in names if k in metrics.get(group, {})}
            for group, names in keys.items() if group in metrics}


if __name__ == "__main__":
    raise SystemExit(main())
