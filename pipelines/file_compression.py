"""A finished run as a codec for your own files: `tokgen compress RUN --input PATH...` and back.

`pipelines.compression` codes a run's own token splits. This module takes files the run has never
seen (EnCodec's `encodec in.wav out.ecdc` with its language model on, in tokgen's terms):

- **Audio**: each file is read as the run's data was (its rate and channels), cut into segments of
  the run's clip length (the sequence length the prior models), and each segment is brought to the
  run's peak level as the run's clips were. The segments' gains, in whole dB, are joined into a
  smooth curve (`gain_curve`), so a change of level makes no step; the file, divided by that curve
  and given whichever sign the codec codes closer (`better_polarity`), is encoded whole by the run's
  tokenizer in windows (`encode_chunked`). Each segment's tokens are one
  item of the token file, coded from its own start under the null class: segments share no
  context, but any one decodes alone. Decompressing joins a file's segments, decodes its codes whole
  (`decode_chunked`), so segment edges leave no seam, and multiplies the curve back in. With
  `search` (`--search-sweeps`), the codes are searched by synthesis rather than taken from the
  encoder (`pipelines.searched_encoding`): closer audio for the same decoder, slower to encode.
- **Images**: each file is converted as the run's images were (channels, size) and is one item.

The header lists the sources in order: a name, which is where decompressing writes the output (the
path below the folder given, without suffix, so `a/x.wav` and `b/x.wav` stay apart), and for audio
the file's samples, its segments' gains and its polarity. A name read from a file is checked before
it becomes a path.

On FSDD's test split as one 20 s file per speaker, per-segment levels against one level per file: the
SI-SNR over each clip's stretch rose from 1.3 to 2.0 dB (as the clips coded alone, 2.05 dB) for 5% more
bits (`benchmarks/long_file_coding.py`, BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
from einops import rearrange
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipelines import layouts
from pipelines.audio_data import AUDIO_EXTENSIONS, read_audio_file
from pipelines.compression import (CompressedFileError, CompressionReport, DecodedFile, TokensToCode, run_parts,
                                   write_checked)
from pipelines.data import IMAGE_EXTENSIONS, DataError, decode_image, pil_to_array, to_tensor_images
from pipelines.images import save_image_grid
from pipelines.polarity import closer_sign
from pipelines.prompting import resolved_run_config
from pipelines.searched_encoding import CodeSearch, searched_codes
from pipelines.stages import RunError, decode_tokens, module_device
from pipelines.tokenset import Manifest, encode_images, frames_of
from tokenizers_vq import load_tokenizer


class InputFile(NamedTuple):
    path: Path
    name: str  # relative, without suffix: where the decoded output goes


def input_files(paths: list[Path], extensions: set[str], kind: str) -> list[InputFile]:
    """Files as given, and the `extensions` files below each folder given (sorted), with unique names."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            if not files:
                raise DataError(f"{path} holds no {kind} files ({', '.join(sorted(extensions))})")
            found += [InputFile(f, f.relative_to(path).with_suffix("").as_posix()) for f in files]
        elif path.is_file():
            found.append(InputFile(path, path.stem))
        else:
            raise DataError(f"input {path} does not exist")
    names = [item.name for item in found]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise DataError(f"several inputs would decode to the same name(s) {clashes[:5]}: give files of the same "
                        "name from their folders (the names then keep the sub-folders)")
    return found


def output_path(folder: Path, name: str, suffix: str, path) -> Path:
    """Where a source's output goes; a name that would leave `folder` is refused, never followed."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts or ":" in name:
        raise CompressedFileError(f"{path}: source name {name!r} is not a relative path inside the output folder")
    return folder.joinpath(*parts).with_suffix(suffix)


def _segment_tokens(codes: torch.Tensor, num_samples: int, manifest: Manifest) -> tuple[torch.Tensor, list[int]]:
    """One file's `(frames q)` codes -> its segments as `(segments L)` sequences in the run's layout, and
    each segment's real samples (the last one's padding frames hold code 0; the mask leaves them out)."""
    frames, hop, window = manifest.token_grid[0], manifest.hop_length, segment_samples(manifest)
    starts = torch.arange(0, num_samples, window)
    first = starts // hop
    windows = layouts.frame_windows(codes[None].expand(len(starts), -1, -1), first,
                                     (len(codes) - first).clamp(max=frames), frames)
    samples = (num_samples - starts).clamp(max=window)
    return layouts.apply_layout(windows, manifest.order, manifest.codebook_size), samples.tolist()


def segment_samples(manifest: Manifest) -> int:
    """Samples in one segment of a long clip: the run's clip length, in whole frames."""
    return manifest.token_grid[0] * manifest.hop_length


def segments_of(num_samples: int, manifest: Manifest) -> int:
    return math.ceil(num_samples / segment_samples(manifest))


def segment_gains_db(clip: np.ndarray, window: int, level: float) -> list[int]:
    """Per segment of `window` samples, the gain in whole dB that scales it to about the run's peak
    `level`, as the run scaled each of its clips (0 dB when the run kept recorded levels). Whole dB
    keep the header small; a near-silent segment is raised no further than 30 dB below the file's
    loudest, so its noise is not coded as if it were speech."""
    peaks = np.array([np.abs(clip[..., start : start + window]).max(initial=0.0)
                      for start in range(0, clip.shape[-1], window)])
    if not level or peaks.max() == 0:
        return [0] * len(peaks)
    return [round(20 * math.log10(peak / level)) for peak in np.maximum(peaks, peaks.max() / 32)]


def gain_curve(gains_db: list[int], num_samples: int, window: int) -> np.ndarray:
    """`(t,)` float32 factors: the segments' gains joined smoothly (linear in dB between segment centres,
    flat beyond the first and last), so a change of level between segments makes no step in the audio."""
    centres = np.minimum(window * (np.arange(len(gains_db)) + 0.5), num_samples - 1)
    return (10.0 ** (np.interp(np.arange(num_samples), centres, gains_db) / 20)).astype(np.float32)


def _audio_tokens(files: list[InputFile], tokenizer, manifest: Manifest, data_config, progress: bool,
                  search: CodeSearch = CodeSearch(), prior=None) -> tuple[TokensToCode, list[dict], list[torch.Tensor]]:
    """Read and encode audio files (searching their codes if `search.sweeps`) -> their segments to code,
    the sources for the header, and each file as read (`(c t)`) to score the decoded audio against."""
    window = segment_samples(manifest)
    sources, clips, levelled, codes = [], [], [], []
    for item in tqdm(files, desc="read and encode files", disable=not progress):
        clip = read_audio_file(item.path, data_config)
        gains_db = segment_gains_db(clip, window, data_config.peak_level)
        polarity, signed, signed_codes = better_polarity(
            tokenizer, torch.from_numpy(clip / gain_curve(gains_db, clip.shape[-1], window)), manifest)
        levelled.append(signed)
        codes.append(signed_codes)
        sources.append({"name": item.name, "num_samples": clip.shape[-1], "gains_db": gains_db,
                        "polarity": polarity})
        clips.append(torch.from_numpy(clip))
    if search.sweeps:
        codes = searched_codes(tokenizer, prior, manifest, levelled, search, progress)
    sequences, samples = [], []
    for file_codes, clip in zip(codes, clips):
        segments, lengths = _segment_tokens(file_codes, clip.shape[-1], manifest)
        sequences.append(segments)
        samples += lengths
    num_samples = torch.tensor(samples, dtype=torch.long)
    mask = manifest.valid_token_mask(frames_of(num_samples, manifest.hop_length))
    return TokensToCode(torch.cat(sequences), mask, num_samples=num_samples), sources, clips


@torch.no_grad()
def better_polarity(tokenizer, clip: torch.Tensor, manifest: Manifest) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Whichever sign of a levelled `(c t)` clip the codec codes closer (`pipelines/polarity.py`): +1 or
    -1, the clip so signed, and its codes `(frames q)`. Costs one more encode and two decodes; the sign
    travels in the header."""
    device, window = module_device(tokenizer), segment_samples(manifest)

    def code(signed: torch.Tensor) -> torch.Tensor:
        return tokenizer.encode_chunked(signed[None].to(device), chunk_samples=window)

    def decode(tokens: torch.Tensor) -> torch.Tensor:
        return tokenizer.decode_chunked(tokens, chunk_frames=manifest.token_grid[0], length=clip.shape[-1])[0].cpu()

    sign, tokens = closer_sign(clip, code, decode)
    return sign, clip * sign, layouts.as_grid(tokens.cpu())[0]


def _image_tokens(files: list[InputFile], tokenizer, manifest: Manifest,
                  progress: bool) -> tuple[TokensToCode, list[dict], torch.Tensor]:
    channels, height, width = manifest.image_shape
    images = np.stack([pil_to_array(decode_image(str(item.path), str(item.path)), channels, (width, height))
                       for item in files])
    tokens = torch.from_numpy(encode_images(tokenizer, images, 64, module_device(tokenizer), progress, "files"))
    sources = [{"name": item.name} for item in files]
    return TokensToCode(tokens, torch.ones_like(tokens, dtype=torch.bool)), sources, to_tensor_images(images)


def compress_files(run_dir: str | Path, inputs: list[Path], out_path: str | Path | None = None,
                   batch_size: int = 64, progress: bool = True,
                   search: CodeSearch = CodeSearch()) -> tuple[Path, CompressionReport, dict]:
    """Code audio or image files (or folders of them) with a finished run's tokenizer and prior into one
    token file; decode it again to check, and report the bits and how close the decoded files come.
    Audio codes can be searched by synthesis first (`search`, `pipelines.searched_encoding`)."""
    run_dir = Path(run_dir)
    search.check()
    prior, tokenset, prior_sha256 = run_parts(run_dir)
    manifest = tokenset.manifest
    tokenizer = load_tokenizer(run_dir / "tokenizer").eval()
    audio = manifest.modality == "audio"
    files = input_files(inputs, AUDIO_EXTENSIONS if audio else IMAGE_EXTENSIONS, "audio" if audio else "image")
    if audio:
        coded, sources, originals = _audio_tokens(files, tokenizer, manifest, resolved_run_config(run_dir).audio_data,
                                                  progress, search, prior)
    elif search.sweeps:
        raise RunError(f"{run_dir} is an image run: code search (--search-sweeps) is for audio runs")
    else:
        coded, sources, originals = _image_tokens(files, tokenizer, manifest, progress)
    default = f"{files[0].name.replace('/', '_')}.tgac" if len(files) == 1 else "files.tgac"
    out_path = Path(out_path or run_dir / "compressed" / default)
    header = {"modality": manifest.modality, "sources": sources}
    _, report = write_checked(prior, prior_sha256, manifest, coded, header, out_path, run_dir, batch_size, progress)
    decoded = decode_sources(tokenizer, coded.sequences, sources, manifest, out_path)
    quality = (_audio_quality(decoded, originals, sources, manifest.sample_rate) if audio
               else _image_quality(torch.cat(decoded), originals, sources))
    if search.sweeps:
        quality["code_search"] = search._asdict()
    return out_path, report, quality


# --- tokens -> files ------------------------------------------------------------------------------


def decode_sources(tokenizer, tokens: torch.Tensor, sources: list[dict], manifest: Manifest,
                   path) -> list[torch.Tensor]:
    """A file's `(items L)` tokens -> per source its audio `(c t)` at its own level, or its image `(1 c h w)`."""
    check_sources(sources, manifest, path)
    return _render(tokenizer, _source_codes(tokens, sources, manifest, path), sources, manifest)


def _render(tokenizer, codes: list[torch.Tensor], sources: list[dict], manifest: Manifest) -> list[torch.Tensor]:
    """Each source's codes (`_source_codes`) -> its audio `(c t)` at its own level, or its image `(1 c h w)`."""
    if manifest.modality != "audio":
        tokens = rearrange(torch.stack(codes), "n h w q -> n (h w q)")
        return list(decode_tokens(tokenizer, tokens, manifest).split(1))
    device, window, clips = module_device(tokenizer), segment_samples(manifest), []
    for source, clip_codes in zip(sources, codes):
        # the real frames only: the last segment's padding codes would colour the file's last samples
        clip_codes = clip_codes[None] if manifest.num_codebooks > 1 else rearrange(clip_codes, "frames 1 -> 1 frames")
        clip = tokenizer.decode_chunked(clip_codes.to(device), chunk_frames=manifest.token_grid[0],
                                        length=source["num_samples"])
        curve = torch.from_numpy(gain_curve(source["gains_db"], source["num_samples"], window))
        clips.append(clip[0].float().cpu() * curve * source.get("polarity", 1))  # files written before it: +1
    return clips


def write_decoded_files(decoded: DecodedFile, run_dir: Path, out: Path, path) -> list[Path]:
    """Each source's output (`NAME.wav` or `NAME.png`) under `out`, and `codes.safetensors`: the codes of
    every source, `(frames q)` for a clip, `(h w q)` for an image, keyed by name, for downstream models.
    Its metadata `sources` is the header's source list: a clip's codes are of the file divided by its gain
    curve and times its polarity, so these are what it takes to decode them back to the file."""
    from pipelines.audio_stages import write_wavs

    manifest, sources = decoded.manifest, decoded.compressed.header["sources"]
    check_sources(sources, manifest, path)
    targets = [output_path(out, source["name"], ".wav" if manifest.modality == "audio" else ".png", path)
               for source in sources]
    codes = _source_codes(decoded.tokens, sources, manifest, path)
    outputs = _render(load_tokenizer(run_dir / "tokenizer").eval(), codes, sources, manifest)
    for target, output in zip(targets, outputs):
        target.parent.mkdir(parents=True, exist_ok=True)
        if manifest.modality == "audio":
            write_wavs(output[None], [target.stem], target.parent, manifest.sample_rate)
        else:
            save_image_grid(output, target, nrow=1, padding=0)
    save_file({source["name"]: code.contiguous() for source, code in zip(sources, codes)}, str(out / "codes.safetensors"),
              metadata={"sources": json.dumps(sources)})
    return targets


def check_sources(sources, manifest: Manifest, path) -> None:
    """The header's source list as `compress_files` writes it, or a `CompressedFileError` naming the file."""
    audio = manifest.modality == "audio"

    def fits(source) -> bool:
        if not isinstance(source, dict) or not isinstance(source.get("name"), str):
            return False
        if not audio:
            return True
        samples, gains = source.get("num_samples"), source.get("gains_db")
        return (isinstance(samples, int) and samples > 0 and isinstance(gains, list)
                and len(gains) == segments_of(samples, manifest) and all(isinstance(g, int) for g in gains)
                and type(source.get("polarity", 1)) is int and source.get("polarity", 1) in (1, -1))

    if not isinstance(sources, list) or not all(map(fits, sources)):
        needs = ", its samples, one whole-dB gain per segment and a polarity of 1 or -1" if audio else ""
        raise CompressedFileError(f"{path}: its list of sources is malformed (each needs a name{needs})")


def _source_codes(tokens: torch.Tensor, sources: list[dict], manifest: Manifest, path) -> list[torch.Tensor]:
    """Each source's codes: `(frames q)` of a clip, its segments joined and its padding dropped; `(h w q)` of an image."""
    if manifest.modality != "audio":
        if len(sources) != len(tokens):
            raise CompressedFileError(f"{path}: {len(sources)} sources but {len(tokens)} items")
        return list(rearrange(tokens, "n (h w q) -> n h w q", h=manifest.token_grid[0], q=manifest.num_codebooks))
    counts = [segments_of(source["num_samples"], manifest) for source in sources]
    if sum(counts) != len(tokens):
        raise CompressedFileError(f"{path}: its sources need {sum(counts)} segments, but it holds {len(tokens)} items")
    frames = manifest.token_grid[0]
    codes = layouts.undo_layout(tokens, manifest.order, frames, manifest.num_codebooks, manifest.codebook_size, fill=0)
    return [rearrange(segments, "segments frames q -> (segments frames) q")[: frames_of(source["num_samples"],
                                                                                      manifest.hop_length)]
            for source, segments in zip(sources, codes.split(counts))]


# --- how close the decoded files come -------------------------------------------------------------


def _audio_quality(decoded: list[torch.Tensor], originals: list[torch.Tensor], sources: list[dict],
                   sample_rate: int) -> dict:
    from tokenizers_vq.audio_losses import si_snr

    per_file = []
    for clip, original, source in zip(decoded, originals, sources):
        value = si_snr(clip[None], original[None])
        per_file.append({"name": source["name"], "seconds": clip.shape[-1] / sample_rate,
                         "si_snr_db": float(value.mean())})
    return {"si_snr_db": float(np.mean([f["si_snr_db"] for f in per_file])), "files": per_file}


def _image_quality(decoded: torch.Tensor, originals: torch.Tensor, sources: list[dict]) -> dict:
    # PSNR over [0, 255] pixels of the image as the run's tokenizer saw it (its size and channels)
    error = ((decoded.clamp(-1, 1) - originals) * 127.5).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0**2 / error.clamp_min(1e-10))).tolist()
    return {"psnr_db": float(np.mean(psnr)), "files": [{"name": s["name"], "psnr_db": p} for s, p in zip(sources, psnr)]}
