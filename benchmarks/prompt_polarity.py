"""What coding an audio prompt in the sign the codec prefers buys `tokgen generate --prompt`.

    python -m benchmarks.prompt_polarity RUN_DIR --clips 300 --num 2 --out prompt_polarity.json

Test clips of the run's data (those at least as long as the prompt), cut at the run's
`audio.prefix_seconds`, are given as prompts from WAV files, as recorded and sign-flipped, each coded
as given and in the closer sign (`prompting.audio_prompt_tokens`). The prior continues each prompt
`--num` times with no class label, so only the prompt tells it which digit it is saying. Per case:
the prompt's SI-SNR as the continuations begin (what a listener hears of their own prompt), and how
often the run's spoken-digit classifier hears the prompt's digit in the continued clip (cut at the
real clip's length).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import soundfile
import torch

from benchmarks.audio_codec_eval import machine, save_record, test_split
from pipelines import audio_eval
from pipelines.audio_data import load_audio_dataset
from pipelines.audio_stages import decode_audio_tokens, silence_after
from pipelines.classifier import classifier_logits
from pipelines.generation import sample_labelled, sampling_options
from pipelines.prompting import audio_prompt_frames, audio_prompt_tokens, resolved_run_config
from pipelines.stages import load_matched_pair
from priors import SamplingOptions
from tokenizers_vq.audio_losses import si_snr

CASES = {"as recorded, coded as given": (1, False), "as recorded, closer sign": (1, True),
         "sign-flipped, coded as given": (-1, False), "sign-flipped, closer sign": (-1, True)}


def prompt_case(paths: list[Path], tokenizer, manifest, data_config, prompt_seconds: float, try_both_signs: bool):
    """Every prompt file coded -> ((n P) tokens, (n c s) prompts as read, (n,) signs)."""
    coded = [audio_prompt_tokens(path, tokenizer, manifest, data_config, prompt_seconds, try_both_signs)
             for path in paths]
    return (torch.cat([c[0] for c in coded]), torch.cat([c[1] for c in coded]),
            torch.tensor([c[2] for c in coded], dtype=torch.float32))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--clips", type=int, default=300, help="test clips, evenly spaced over those long enough")
    parser.add_argument("--num", type=int, default=2, help="continuations per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = resolved_run_config(args.run_dir)
    tokenizer, prior, tokenset = load_matched_pair(args.run_dir, "cpu")
    manifest = tokenset.manifest
    data = load_audio_dataset(config.audio_data)
    waveforms, lengths, labels = test_split(data)
    prompt_seconds = config.audio.prefix_seconds
    prompt_samples = audio_prompt_frames(manifest, prompt_seconds) * manifest.hop_length
    long_enough = torch.nonzero(lengths >= prompt_samples)[:, 0]  # a prompt file must hold the whole prompt
    chosen = long_enough[torch.linspace(0, len(long_enough) - 1, min(args.clips, len(long_enough))).round().long()]
    waveforms, lengths, labels = waveforms[chosen], lengths[chosen], labels[chosen]
    classifier, _ = audio_eval.dataset_audio_classifier(args.run_dir / "classifier", data, config.audio.classifier)
    features = partial(audio_eval.log_mel_features, config=config.audio.classifier, sample_rate=manifest.sample_rate)
    plain = sampling_options(config.sampling)  # no label, so no guidance
    options = SamplingOptions(temperature=plain.temperature, top_k=plain.top_k, top_p=plain.top_p)

    record = {"run_dir": str(args.run_dir), "clips": len(chosen), "test_clips_long_enough": len(long_enough),
              "continuations_per_prompt": args.num, "prompt_seconds": prompt_seconds, "machine": machine(args),
              "cases": {}}
    with tempfile.TemporaryDirectory() as folder:
        files = {sign: [] for sign in (1, -1)}  # the prompt files, as recorded and sign-flipped
        for sign, paths in files.items():
            for index, (clip, length) in enumerate(zip(waveforms, lengths)):
                paths.append(Path(folder) / f"{sign}_{index}.wav")
                soundfile.write(paths[-1], sign * clip[0, :length].numpy(), manifest.sample_rate, subtype="FLOAT")
        for case, (sign, try_both_signs) in CASES.items():
            started = time.perf_counter()
            tokens, prompts, signs = prompt_case(files[sign], tokenizer, manifest, config.audio_data, prompt_seconds,
                                                 try_both_signs)
            generator = torch.Generator().manual_seed(args.seed)
            continued = sample_labelled(prior, None, options, generator, batch_size=256,
                                        prefix=tokens.repeat_interleave(args.num, dim=0))
            signed = signs.repeat_interleave(args.num)[:, None, None]  # back in each prompt's sign
            clips = decode_audio_tokens(tokenizer, continued, manifest) * signed
            clips = silence_after(clips, lengths.repeat_interleave(args.num).clamp_min(prompts.shape[-1]))
            heard = prompts.repeat_interleave(args.num, dim=0)
            prompt_snr = si_snr(clips[..., : prompts.shape[-1]], heard).mean(dim=-1)
            predicted = classifier_logits(classifier, features(clips)).argmax(dim=-1)
            same_digit = (predicted == labels.repeat_interleave(args.num)).float()
            record["cases"][case] = {
                "prompt_si_snr_db": prompt_snr.mean().item(),
                "prompt_si_snr_db_stderr": audio_eval.mean_standard_error(prompt_snr),
                "continuations_heard_as_the_prompts_digit": same_digit.mean().item(),
                "continuations_heard_as_the_prompts_digit_stderr": audio_eval.mean_standard_error(same_digit),
                "prompts_coded_flipped": int((signs < 0).sum()),
                "seconds": time.perf_counter() - started,
            }
            print(f"{case:32s} prompt SI-SNR {prompt_snr.mean():6.2f} dB, continuations heard as the prompt's digit "
                  f"{same_digit.mean():.1%}, {int((signs < 0).sum())} of {len(signs)} coded flipped", flush=True)
    save_record(record, args.out)


if __name__ == "__main__":
    main()
