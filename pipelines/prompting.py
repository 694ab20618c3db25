"""Continue a user's own prompt from a finished run: `tokgen generate RUN_DIR --prompt FILE`.

An image prompt keeps its top `prompt_rows` rows of tokens, an audio prompt its first
`prompt_seconds`; the prior samples the rest, with the class label and guidance when given. The
file goes through what the run's data went through (channels and size for an image; rate,
channels and peak level for a clip) and is then encoded by the run's own tokenizer, so a file of
another size, rate or channel count works, and an unreadable one is a `DataError` naming it. An
audio prompt is cut at `prompt_seconds` before it is encoded (zeros after it, as the run pads its
clips), so the codes it gives the prior have heard nothing after the prompt; it is coded in whichever
sign the codec codes closer, and its continuations are turned back to the prompt's sign. An image is encoded
whole, as the sample stage's completions of test images are: a convolutional encoder's top rows of
codes can carry a little of the pixels just below them, so give a partial image for a strict prompt
(an image has no neutral filler the way silence is one for a clip). Outputs sit beside each other for
a person to compare: a PNG grid with the prompt first, or the prompt's WAV, the continuations' WAVs
and their spectrograms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipelines import layouts
from pipelines.audio_data import normalize_peak, read_audio_file
from pipelines.config import run_config_from_dict
from pipelines.data import DataError, decode_image, pil_to_array, to_tensor_images
from pipelines.generation import sample_labelled
from pipelines.images import save_image_grid
from pipelines.polarity import closer_sign
from pipelines.stages import RunError, decode_tokens, module_device
from pipelines.tokenset import encode_clips, encode_images


def check_prompt_length(given: int, total: int, unit: str, option: str) -> None:
    """A prompt must leave the prior something to sample, and give it something to continue."""
    if not 1 <= given < total:
        raise DataError(f"{option} gives {given} of the run's {total} {unit}; it must give at least 1 and "
                        f"fewer than {total}, so that there is a prompt and something left to continue")


def image_prompt_tokens(path: Path, tokenizer, manifest, prompt_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image at `path` as the run's tokenizer sees it -> (its first `prompt_rows` token rows (1 P),
    the converted image (1 c h w) in [-1, 1])."""
    channels, height, width = manifest.image_shape
    token_rows, token_columns = manifest.token_grid
    check_prompt_length(prompt_rows, token_rows, "token rows", "--prompt-rows")
    array = np.array(pil_to_array(decode_image(str(path), str(path)), channels, (width, height)))[None]  # writable
    device = module_device(tokenizer)
    tokens = torch.from_numpy(encode_images(tokenizer, array, 1, device, progress=False, name="prompt"))
    return tokens[:, : prompt_rows * token_columns * manifest.num_codebooks], to_tensor_images(array)


def resolved_run_config(run_dir: Path):
    """The run's config as it resolved and recorded it (an audio prompt is read as the run's data was)."""
    path = run_dir / "config.resolved.json"
    if not path.is_file():
        raise RunError(f"{path} is missing: an audio prompt is read with the run's data settings, which it records")
    return run_config_from_dict(json.loads(path.read_text()))


def audio_prompt_frames(manifest, prompt_seconds: float) -> int:
    """The whole frames an audio prompt of `prompt_seconds` keeps (its samples: this times the hop)."""
    return round(prompt_seconds * manifest.sample_rate / manifest.hop_length)


def audio_prompt_tokens(path: Path, tokenizer, manifest, data_config, prompt_seconds: float,
                        try_both_signs: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first `prompt_seconds` of the file at `path` -> (its tokens in the run's layout (1 P), the
    prompt as the run's data would hold it (1 c s), s = its samples, and the sign it was coded in).

    The prompt is coded in whichever sign the codec codes closer (`pipelines/polarity.py`): a codec
    that learned its recordings' polarity hands the prior a garbled prompt otherwise. `try_both_signs`
    False codes it as given (`benchmarks/prompt_polarity.py` measures what the choice buys)."""
    from pipelines.audio_stages import decode_audio_tokens

    clip_samples = manifest.image_shape[-1]
    frames = manifest.token_grid[0]
    prompt_frames = audio_prompt_frames(manifest, prompt_seconds)
    check_prompt_length(prompt_frames, frames, f"frames of {manifest.hop_length} samples", "--prompt-seconds")
    clip = read_audio_file(path, data_config)
    if data_config.peak_level:  # as the run's clips were scaled, on the whole file
        clip = normalize_peak(clip, data_config.peak_level)
    prompt_samples = prompt_frames * manifest.hop_length
    if clip.shape[-1] < prompt_samples:
        raise DataError(f"audio file {path} holds {clip.shape[-1] / manifest.sample_rate:.3f} s, less than the "
                        f"{prompt_samples / manifest.sample_rate:.3f} s prompt asked for")
    prompt_clip = torch.from_numpy(np.ascontiguousarray(clip[None, :, :prompt_samples], dtype=np.float32))
    device = module_device(tokenizer)

    def code(signed: torch.Tensor) -> torch.Tensor:  # zeros after the prompt, as the run pads its clips
        window = torch.nn.functional.pad(signed, (0, clip_samples - prompt_samples))
        return torch.from_numpy(encode_clips(tokenizer, window.numpy(), manifest.order, 1, device, progress=False,
                                             name="prompt"))

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        return decode_audio_tokens(tokenizer, tokens, manifest)[..., :prompt_samples]

    sign, tokens = closer_sign(prompt_clip, code, decode) if try_both_signs else (1, code(prompt_clip))
    prompt_length = layouts.prefix_length(manifest.order, prompt_frames, manifest.num_codebooks)
    return tokens[:, :prompt_length], prompt_clip, sign


def continue_prompt(prior, prompt: torch.Tensor, label: int | None, num: int, options, seed: int,
                    device) -> torch.Tensor:
    """(1 P) prompt tokens -> (num L) sequences that begin with them, on the CPU."""
    if not getattr(prior, "supports_prefix", True):
        raise RunError(f"a {type(prior).__name__} prior cannot continue a prompt: it has no conditionals of later "
                       "tokens given earlier ones")
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.full((num,), label, device=device) if label is not None else None
    return sample_labelled(prior, labels, options, generator, batch_size=256, prefix=prompt.to(device).expand(num, -1))


def continue_image_prompt(path: Path, tokenizer, prior, manifest, prompt_rows: int | None, label: int | None,
                          num: int, options, seed: int, out: Path, device) -> Path:
    """A grid PNG at `out`: the prompt image as converted, then `num` completions of its top token rows."""
    prompt_rows = prompt_rows if prompt_rows is not None else max(1, manifest.token_grid[0] // 2)
    prompt, image = image_prompt_tokens(path, tokenizer, manifest, prompt_rows)
    completed = continue_prompt(prior, prompt, label, num, options, seed, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(torch.cat([image, decode_tokens(tokenizer, completed, manifest)]), out, nrow=min(num + 1, 8))
    return out


def continue_audio_prompt(path: Path, run_dir: Path, tokenizer, prior, tokenset, prompt_seconds: float | None,
                          label: int | None, num: int, options, seed: int, out_dir: Path, device) -> Path:
    """WAVs in `out_dir`: `prompt.wav` and `num` continuations, with `continuations.png` (their spectrograms).

    Each continuation is as long as a train clip of the class (at least the prompt), as in `generate`.
    """
    from pipelines.audio_stages import decode_audio_tokens, draw_lengths, plot_spectrograms, silence_after, write_wavs

    manifest = tokenset.manifest
    config = resolved_run_config(run_dir)
    prompt_seconds = prompt_seconds if prompt_seconds is not None else config.audio.prefix_seconds
    prompt, prompt_clip, sign = audio_prompt_tokens(path, tokenizer, manifest, config.audio_data, prompt_seconds)
    continued = continue_prompt(prior, prompt, label, num, options, seed, device)
    train = tokenset.tensors("train")
    labels = torch.full((num,), label) if label is not None else None
    lengths = draw_lengths(labels, num, train["num_samples"], train.get("label"), torch.Generator().manual_seed(seed))
    clips = sign * silence_after(decode_audio_tokens(tokenizer, continued, manifest),  # back in the prompt's sign
                                 lengths.clamp_min(prompt_clip.shape[-1]))
    write_wavs(prompt_clip, ["prompt"], out_dir, manifest.sample_rate)
    write_wavs(clips, [f"continued_{i}" for i in range(num)], out_dir, manifest.sample_rate)
    padded = torch.nn.functional.pad(prompt_clip, (0, clips.shape[-1] - prompt_clip.shape[-1]))  # one time axis
    flipped = ", coded sign-flipped" if sign < 0 else ""
    rows = [(f"prompt, {prompt_clip.shape[-1] / manifest.sample_rate:g} s{flipped}", padded), ("continued", clips)]
    plot_spectrograms(rows, out_dir / "continuations.png", manifest.sample_rate, config.audio.classifier)
    return out_dir
