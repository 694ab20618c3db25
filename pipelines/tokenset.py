"""The token set: where stage one hands over to stage two.

`export_tokens` encodes every split of an image data set with a trained tokenizer, flattens each
token grid row-major into an `input_ids` sequence and writes, per split, a Hugging Face
`datasets` folder (`save_to_disk`) and a Parquet file, then a `manifest.json` that says exactly
which tokenizer made the tokens (kind, config, sha256 of its weights) and what they are (vocab
size, grid, order, sequence length, classes, data source, split sizes). `load_tokenset` checks all
of it before a prior sees a single token, and refuses tokens made by another tokenizer or shaped
for another prior. This is the code-extraction step of two-stage models such as VQ-VAE (van den
Oord et al. 2017, "Neural Discrete Representation Learning") and LlamaGen (Sun et al. 2024):
encode once, then train the prior on stored codes instead of re-encoding on every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from einops import rearrange
from tqdm.auto import tqdm

from pipelines import layouts
from pipelines.data import ImageDataset, to_tensor_images

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
SPLITS = ("train", "val", "test")
ORDER = "row-major"
MODALITIES = ("image", "audio")
# Manifest keys added after format 1 was first written; older manifests lack them and get the defaults.
OPTIONAL_MANIFEST_FIELDS = ("modality", "codebook_size", "pad_token", "sample_rate", "hop_length",
                            "train_shifted_copies", "max_shift_samples")
LENGTH_COLUMNS = ("num_frames", "num_samples")  # audio: real frames and samples of each clip


class TokenSetError(ValueError):
    """A token set that is missing, corrupt or inconsistent with its manifest."""


class TokenSetMismatchError(TokenSetError):
    """Tokens made by another tokenizer, or shaped for another prior, than the caller's."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so that large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value):
    """Dataclasses, tuples and numpy scalars -> plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


@dataclass(frozen=True)
class Manifest:
    format_version: int
    tokenizer_kind: str
    tokenizer_config: dict
    tokenizer_sha256: str
    vocab_size: int  # ids a prior models: the codes, plus the pad token of a "delayed" layout
    token_grid: list[int]  # (h', w') of one image's tokens, or (frames,) of one clip's
    sequence_length: int  # h' * w' * num_codebooks, or `layouts.sequence_length` for audio
    order: str  # "row-major": token (i, j[, q]) is input_ids[(i * w' + j) * num_codebooks + q];
    #             audio: a `layouts.LAYOUTS` name ("flattened" or "delayed")
    num_codebooks: int
    num_classes: int  # 0 = unconditional
    class_names: list[str]
    data_source: dict
    split_sizes: dict[str, int]
    image_shape: list[int]  # the input shape of one item: (c, h, w), or (c, t) for audio
    # Added with audio; manifests written before them read as images with these defaults.
    modality: str = "image"  # "image" | "audio"
    codebook_size: int = -1  # the tokenizer's codes; -1 = vocab_size (no pad token)
    pad_token: int = -1  # the layout's pad id, -1 = none
    sample_rate: int = 0  # audio only: Hz of the clips
    hop_length: int = 0  # audio only: samples per frame
    # Audio only: the train split also holds this many delayed copies of each clip (`iter_shifted_copies`),
    # after the originals; val and test never do.
    train_shifted_copies: int = 0
    max_shift_samples: int = 0

    def __post_init__(self):
        if self.codebook_size == -1:
            object.__setattr__(self, "codebook_size", self.vocab_size)

    @property
    def has_lengths(self) -> bool:
        """Audio splits carry per-clip `num_frames` and `num_samples` columns (variable-length clips)."""
        return self.modality == "audio"

    def to_json(self) -> dict:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        """Strict: unknown or missing keys, wrong types and inconsistent sizes are all errors."""
        if not isinstance(data, dict):
            raise TokenSetError(f"a manifest is a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = sorted(set(names) - set(data) - set(OPTIONAL_MANIFEST_FIELDS))
        if unknown or missing:
            raise TokenSetError(f"manifest has unknown key(s) {unknown} and lacks key(s) {missing}; "
                                f"valid keys: {names}")
        if data["format_version"] != FORMAT_VERSION:
            raise TokenSetError(f"manifest format_version {data['format_version']!r}; "
                                f"this tokgen reads {FORMAT_VERSION}")
        expected_types = {"tokenizer_kind": str, "tokenizer_config": dict, "tokenizer_sha256": str, "vocab_size": int,
                          "token_grid": list, "sequence_length": int, "order": str, "num_codebooks": int,
                          "num_classes": int, "class_names": list, "data_source": dict, "split_sizes": dict,
                          "image_shape": list, "modality": str, "codebook_size": int, "pad_token": int,
                          "sample_rate": int, "hop_length": int, "train_shifted_copies": int,
                          "max_shift_samples": int}
        wrong = [name for name, kind in expected_types.items() if name in data
                 and (not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)))]
        if wrong:
            raise TokenSetError(f"manifest field(s) {wrong} have the wrong type")
        manifest = cls(**data)
        manifest.check()
        return manifest

    def check(self) -> None:
        problems = []
        if self.modality not in MODALITIES:
            problems.append(f"modality {self.modality!r} (one of {list(MODALITIES)})")
        elif self.modality == "image":
            problems += self._image_problems()
        else:
            problems += self._audio_problems()
        if self.num_classes != len(self.class_names):
            problems.append(f"num_classes {self.num_classes} but {len(self.class_names)} class names")
        if sorted(self.split_sizes) != sorted(SPLITS) or any(not isinstance(v, int) for v in self.split_sizes.values()):
            problems.append(f"split_sizes must give an integer size for each of {list(SPLITS)}: {self.split_sizes}")
        if problems:
            raise TokenSetError("inconsistent manifest: " + "; ".join(problems))

    def _image_problems(self) -> list[str]:
        problems = []
        if self.vocab_size < 1 or self.num_codebooks < 1 or len(self.token_grid) != 2:
            problems.append(f"vocab_size {self.vocab_size}, num_codebooks {self.num_codebooks}, grid {self.token_grid}")
        elif self.sequence_length != math.prod(self.token_grid) * self.num_codebooks:
            problems.append(f"sequence_length {self.sequence_length} != grid {self.token_grid} "
                            f"x {self.num_codebooks} codebook(s)")
        if self.order != ORDER:
            problems.append(f"order {self.order!r} (only {ORDER!r} is defined for images)")
        if len(self.image_shape) != 3:
            problems.append(f"image_shape {self.image_shape} is not (c, h, w)")
        if self.codebook_size != self.vocab_size or self.pad_token != -1:
            problems.append(f"an image token set has no pad token (codebook_size {self.codebook_size}, "
                            f"vocab_size {self.vocab_size}, pad_token {self.pad_token})")
        return problems

    def _audio_problems(self) -> list[str]:
        if self.order not in layouts.LAYOUTS:
            return [f"order {self.order!r} (audio layouts are {list(layouts.LAYOUTS)})"]
        if self.codebook_size < 1 or self.num_codebooks < 1 or len(self.token_grid) != 1:
            return [f"codebook_size {self.codebook_size}, num_codebooks {self.num_codebooks}, grid {self.token_grid}"]
        problems = []
        frames = self.token_grid[0]
        if self.sequence_length != layouts.sequence_length(self.order, frames, self.num_codebooks):
            problems.append(f"sequence_length {self.sequence_length} does not fit {frames} frames x "
                            f"{self.num_codebooks} codebook(s) in the {self.order!r} layout")
        if self.vocab_size != layouts.prior_vocab_size(self.order, self.codebook_size):
            problems.append(f"vocab_size {self.vocab_size} != {self.order!r} vocabulary of {self.codebook_size} codes")
        if self.pad_token != layouts.pad_token(self.order, self.codebook_size):
            problems.append(f"pad_token {self.pad_token} is not the {self.order!r} pad id")
        if len(self.image_shape) != 2 or self.sample_rate < 1 or self.hop_length < 1:
            problems.append(f"audio needs (c, t) image_shape, sample_rate and hop_length: {self.image_shape}, "
                            f"{self.sample_rate}, {self.hop_length}")
        if self.train_shifted_copies < 0 or (self.train_shifted_copies > 0) != (self.max_shift_samples > 0):
            problems.append(f"train_shifted_copies {self.train_shifted_copies} and max_shift_samples "
                            f"{self.max_shift_samples} must both be positive or both 0")
        return problems

    def valid_token_mask(self, num_frames: torch.Tensor) -> torch.Tensor:
        """(n,) real frames per clip -> (n L) bool: the positions a prior scores (see `layouts`)."""
        return layouts.valid_token_mask(num_frames, self.order, self.token_grid[0], self.num_codebooks)


@dataclass
class TokenSet:
    directory: Path
    manifest: Manifest
    splits: dict[str, datasets.Dataset]  # torch format: input_ids (L,) int, label () int64 per row

    def tensors(self, split: str) -> dict[str, torch.Tensor]:
        """One whole split as `{"input_ids": (n L) int64, "label": (n,) int64}` (label only when labelled).

        Audio token sets add `num_frames` and `num_samples` (n,) int64 and `loss_mask` (n L) bool, the
        positions a prior scores. `datasets` >= 4 returns a lazy `Column` for `split["input_ids"]`,
        which torch cannot convert; this is the one-call way to get tensors.
        """
        return _split_tensors(self.splits[split], self.manifest)

    def torch_dataset(self, split: str) -> "TokenTensorDataset":
        return TokenTensorDataset(self.splits[split], self.manifest)


def _split_tensors(dataset: datasets.Dataset, manifest: Manifest | None = None) -> dict[str, torch.Tensor]:
    columns = [name for name in ("input_ids", "label", *LENGTH_COLUMNS) if name in dataset.column_names]
    rows = dataset.with_format("numpy", columns=columns)[:]
    tensors = {"input_ids": torch.from_numpy(np.asarray(rows["input_ids"], dtype=np.int64).reshape(len(dataset), -1))}
    for name in ("label", *LENGTH_COLUMNS):
        if name in rows:
            tensors[name] = torch.from_numpy(np.asarray(rows[name], dtype=np.int64))
    if manifest is not None and manifest.has_lengths and "num_frames" in tensors:
        tensors["loss_mask"] = manifest.valid_token_mask(tensors["num_frames"])
    return tensors


class TokenTensorDataset(torch.utils.data.Dataset):
    """A token split as `{"input_ids": (L,) int64, "label": () int64}` items; batches to (b L) and (b,).

    With the manifest of an audio token set, items also carry `loss_mask` (L,) bool, so that a
    prior's loss leaves the padding of short clips out. The split is read into one tensor up
    front: a prior step then costs an index, not an Arrow read.
    """

    def __init__(self, dataset: datasets.Dataset, manifest: Manifest | None = None):
        tensors = _split_tensors(dataset, manifest)
        self.input_ids, self.labels = tensors["input_ids"], tensors.get("label")
        self.loss_mask = tensors.get("loss_mask")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.input_ids[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.loss_mask is not None:
            item["loss_mask"] = self.loss_mask[index]
        return item


# --- export -------------------------------------------------------------------------------------


def encode_images(tokenizer, images: np.ndarray, batch_size: int, device, progress: bool, name: str) -> np.ndarray:
    """uint8 (n h w c) -> (n L) int64 tokens, flattened row-major (codebook index fastest)."""
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"encode {name}", disable=not progress or not len(starts), leave=False):
        pixel_values = to_tensor_images(images[start : start + batch_size]).to(device)
        tokens = tokenizer.encode(pixel_values)
        if tokens.ndim == 3:
            tokens = tokens[..., None]
        chunks.append(rearrange(tokens, "b h w q -> b (h w q)").long().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.int64)


def encode_clips(tokenizer, waveforms: np.ndarray, layout: str, batch_size: int, device, progress: bool,
                 name: str) -> np.ndarray:
    """float32 (n c t) clips -> (n L) int64 tokens in `layout` (padding is zeros, encoded like any audio)."""
    chunks = []
    starts = range(0, len(waveforms), batch_size)
    for start in tqdm(starts, desc=f"encode {name}", disable=not progress or not len(starts), leave=False):
        clips = torch.from_numpy(np.ascontiguousarray(waveforms[start : start + batch_size])).to(device)
        codes = tokenizer.encode(clips)
        chunks.append(layouts.apply_layout(codes, layout, tokenizer.vocab_size).long().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.int64)


def frames_of(num_samples, hop_length: int):
    """Real frames of clips of `num_samples` samples (an array or tensor): a partial last frame counts."""
    return -(-num_samples // hop_length)


def iter_shifted_copies(waveforms: np.ndarray, lengths: np.ndarray, copies: int, max_shift: int,
                        seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`copies` delayed versions of each (c t) clip, one copy of the whole set at a time.

    Token augmentation for a prior: a strided codec is not shift-invariant below its hop, so the
    same speech delayed by a few samples gives other, equally valid token sequences. Each clip gets
    1..max_shift zeros in front and its end cut at t. Yields each copy, (n c t), and its real lengths
    in samples; the shifts are drawn up front, so memory holds one copy and the draw never changes.
    """
    if copies < 1 or max_shift < 1:
        raise ValueError(f"copies and max_shift must be positive, got {copies} and {max_shift}")
    count, total = len(waveforms), waveforms.shape[-1]
    shifts = np.random.default_rng(seed).integers(1, max_shift + 1, size=copies * count)
    lengths = np.asarray(lengths, dtype=np.int64)
    for copy_shifts in shifts.reshape(copies, count):
        delayed = np.zeros_like(waveforms)
        for row, shift in enumerate(copy_shifts):
            shift = min(int(shift), total)
            delayed[row, ..., shift:] = waveforms[row, ..., : total - shift]
        yield delayed, np.minimum(lengths + copy_shifts, total)


def _token_dataset(tokens: np.ndarray, labels: np.ndarray | None, sequence_length: int,
                   lengths: dict[str, np.ndarray] | None = None) -> datasets.Dataset:
    # int32 halves the files; every vocabulary tokgen builds is far below 2**31.
    features = {"input_ids": datasets.List(datasets.Value("int32"))}
    columns = {"input_ids": _list_column(tokens.reshape(len(tokens), sequence_length).astype(np.int32))}
    if labels is not None:
        features["label"] = datasets.Value("int64")
        columns["label"] = pa.array(labels.astype(np.int64))
    for name, values in (lengths or {}).items():
        features[name] = datasets.Value("int64")
        columns[name] = pa.array(values.astype(np.int64))
    features = datasets.Features(features)
    return datasets.Dataset(pa.table(columns).cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))


LIST_CHUNK_TOKENS = 2**30  # tokens per Arrow chunk in `_list_column`, below the int32 offsets' limit


def _list_column(rows: np.ndarray) -> pa.ChunkedArray:
    """(n L) int32 -> an Arrow list column straight from the buffer.

    `Dataset.from_dict` would build a Python list per row first: about 360 MB more for 6 M tokens.
    Chunks keep each one's int32 offsets below 2**31.
    """
    width = rows.shape[1]
    step = max(1, LIST_CHUNK_TOKENS // max(width, 1))
    chunks = [pa.ListArray.from_arrays(pa.array(np.arange(len(part) + 1, dtype=np.int32) * width),
                                       pa.array(part.reshape(-1)))
              for part in (rows[start : start + step] for start in range(0, len(rows), step))]
    return pa.chunked_array(chunks, type=pa.list_(pa.int32()))


@contextlib.contextmanager
def _quiet_datasets_progress():
    """Hide `datasets`' per-write progress bars (noise beside our own), restoring the caller's setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _eval_mode(tokenizer):
    was_training = getattr(tokenizer, "training", False)
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    try:
        with torch.no_grad(), _quiet_datasets_progress():
            yield
    finally:
        if was_training:
            tokenizer.train()


def _check_tokens(tokens: np.ndarray, sequence_length: int, vocab_size: int) -> None:
    if len(tokens) and tokens.shape[1] != sequence_length:
        raise TokenSetError(f"tokenizer gave {tokens.shape[1]} tokens per item, its grid says {sequence_length}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise TokenSetError(f"tokenizer gave tokens in [{tokens.min()}, {tokens.max()}], outside [0, {vocab_size})")


def _write_split(token_dataset: datasets.Dataset, out_dir: Path, name: str) -> int:
    token_dataset.save_to_disk(str(out_dir / name))
    token_dataset.to_parquet(str(out_dir / f"{name}.parquet"))
    return len(token_dataset)


def _refuse_empty_splits(dataset) -> None:
    """Before any encoding: a token set holds every split, and `datasets` cannot read back an empty one."""
    empty = [name for name, split in dataset.splits().items() if not len(split)]
    if empty:
        raise TokenSetError(f"the {' and '.join(empty)} split(s) of the data hold no example: raise "
                            f"data.val_fraction (or add examples) so that every split has some")


def _tokenizer_weights(tokenizer_dir: Path) -> Path:
    weights = tokenizer_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise TokenSetError(f"{weights} does not exist; export needs the saved tokenizer the tokens come from")
    return weights


def _tokenizer_record(tokenizer) -> tuple[str, dict]:
    config = getattr(tokenizer, "config", None)
    kind = str(getattr(config, "kind", type(tokenizer).__name__.lower()))
    return kind, _jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else {}


def _write_manifest(manifest: Manifest, out_dir: Path) -> Manifest:
    """Written last, so a half-written export never loads."""
    manifest.check()
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    logger.info("exported %s tokens (vocab %d, length %d) to %s", manifest.split_sizes, manifest.vocab_size,
                manifest.sequence_length, out_dir)
    return manifest


def export_tokens(tokenizer, tokenizer_dir: str | Path, dataset: ImageDataset, out_dir: str | Path, *,
                  batch_size: int = 256, device="cpu", progress: bool = True) -> Manifest:
    """Encode train/val/test with `tokenizer` (already on `device`) and write the token set to `out_dir`.

    The manifest is written last, so a half-written export never loads.
    """
    _refuse_empty_splits(dataset)
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    weights = _tokenizer_weights(tokenizer_dir)
    image_shape = (dataset.channels, *dataset.image_size)
    token_grid = tuple(int(size) for size in tokenizer.token_grid(image_shape))
    num_codebooks = int(getattr(tokenizer, "num_codebooks", 1))
    sequence_length = math.prod(token_grid) * num_codebooks
    vocab_size = int(tokenizer.vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    split_sizes = {}
    with _eval_mode(tokenizer):
        for name, split in dataset.splits().items():
            tokens = encode_images(tokenizer, split.images, batch_size, device, progress, name)
            _check_tokens(tokens, sequence_length, vocab_size)
            split_sizes[name] = _write_split(_token_dataset(tokens, split.labels, sequence_length), out_dir, name)
    kind, config = _tokenizer_record(tokenizer)
    return _write_manifest(Manifest(
        format_version=FORMAT_VERSION, tokenizer_kind=kind, tokenizer_config=config,
        tokenizer_sha256=sha256_file(weights), vocab_size=vocab_size, token_grid=list(token_grid),
        sequence_length=sequence_length, order=ORDER, num_codebooks=num_codebooks, num_classes=dataset.num_classes,
        class_names=list(dataset.class_names), data_source=_jsonable(dataset.source), split_sizes=split_sizes,
        image_shape=list(image_shape),
    ), out_dir)


def export_audio_tokens(tokenizer, tokenizer_dir: str | Path, dataset, out_dir: str | Path, *,
                        layout: str = "flattened", batch_size: int = 64, device="cpu",
                        progress: bool = True, train_shifted_copies: int = 0, max_shift_samples: int = 0,
                        seed: int = 0) -> Manifest:
    """Encode the clips of an `AudioDataset` into a token set in `layout` (see `pipelines.layouts`).

    Each row keeps its clip's real length, `num_samples`, and the frames that hold any of it,
    `num_frames = ceil(num_samples / hop)`; `TokenSet.tensors` turns them into the prior's loss mask.
    With `train_shifted_copies`, the train split also gets that many copies of every clip delayed
    by 1..`max_shift_samples` samples (`iter_shifted_copies`), more token sequences for the prior to learn from.
    """
    layouts.check_layout(layout)
    _refuse_empty_splits(dataset)
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    weights = _tokenizer_weights(tokenizer_dir)
    clip_shape = tuple(int(size) for size in dataset.train.waveforms.shape[1:])  # (c, t)
    frames = int(tokenizer.token_grid(clip_shape)[0])
    hop_length = int(getattr(tokenizer, "hop_length", 0) or math.ceil(clip_shape[-1] / frames))
    num_codebooks = int(getattr(tokenizer, "num_codebooks", 1))
    codebook_size = int(tokenizer.vocab_size)
    vocab_size = layouts.prior_vocab_size(layout, codebook_size)
    sequence_length = layouts.sequence_length(layout, frames, num_codebooks)
    out_dir.mkdir(parents=True, exist_ok=True)
    split_sizes = {}
    with _eval_mode(tokenizer):
        for name, split in dataset.splits().items():
            waveforms, samples = split.waveforms, np.asarray(split.lengths, dtype=np.int64)
            labels = split.labels
            tokens = encode_clips(tokenizer, waveforms, layout, batch_size, device, progress, name)
            if name == "train" and train_shifted_copies:
                # Encoded copy by copy: memory holds one delayed copy of the clips, not all of them.
                token_parts, sample_parts = [tokens], [samples]
                for number, (delayed, delayed_samples) in enumerate(iter_shifted_copies(
                        waveforms, samples, train_shifted_copies, max_shift_samples, seed), start=1):
                    token_parts.append(encode_clips(tokenizer, delayed, layout, batch_size, device, progress,
                                                    f"train copy {number}/{train_shifted_copies}"))
                    sample_parts.append(delayed_samples)
                tokens, samples = np.concatenate(token_parts), np.concatenate(sample_parts)
                labels = None if labels is None else np.tile(labels, train_shifted_copies + 1)
            _check_tokens(tokens, sequence_length, vocab_size)
            lengths = {"num_frames": frames_of(samples, hop_length), "num_samples": samples}
            token_dataset = _token_dataset(tokens, labels, sequence_length, lengths)
            split_sizes[name] = _write_split(token_dataset, out_dir, name)
    kind, config = _tokenizer_record(tokenizer)
    return _write_manifest(Manifest(
        format_version=FORMAT_VERSION, tokenizer_kind=kind, tokenizer_config=config,
        tokenizer_sha256=sha256_file(weights), vocab_size=vocab_size, token_grid=[frames],
        sequence_length=sequence_length, order=layout, num_codebooks=num_codebooks, num_classes=dataset.num_classes,
        class_names=list(dataset.class_names), data_source=_jsonable(dataset.source), split_sizes=split_sizes,
        image_shape=list(clip_shape), modality="audio", codebook_size=codebook_size,
        pad_token=layouts.pad_token(layout, codebook_size), sample_rate=int(dataset.sample_rate),
        hop_length=hop_length, train_shifted_copies=int(train_shifted_copies),
        max_shift_samples=int(max_shift_samples) if train_shifted_copies else 0,
    ), out_dir)


# --- load and validate --------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise TokenSetError(f"{path} does not exist; is {directory} a token set written by `tokgen export-tokens`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenSetError(f"{path} is not valid JSON: {error}") from error
    try:
        return Manifest.from_json(data)
    except TokenSetError as error:
        raise TokenSetError(f"{path}: {error}") from error


def _check_expectations(manifest: Manifest, directory: Path, **expected: int | None) -> None:
    """A prior built for (vocab, length, classes) must not be fed tokens of another shape."""
    actual = {"vocab_size": manifest.vocab_size, "sequence_length": manifest.sequence_length,
              "num_classes": manifest.num_classes}
    wrong = [f"{name}={actual[name]} (expected {value})" for name, value in expected.items()
             if value is not None and actual[name] != value]
    if wrong:
        raise TokenSetMismatchError(
            f"token set {directory} has {', '.join(wrong)}: these tokens were made for another model; "
            f"train the prior on this token set, or re-export tokens with the matching tokenizer"
        )


def _check_split(dataset: datasets.Dataset, manifest: Manifest, name: str, path: Path) -> None:
    expected_size = manifest.split_sizes[name]
    if len(dataset) != expected_size:
        raise TokenSetError(f"{path} has {len(dataset)} rows, the manifest says {expected_size}")
    wanted = {"input_ids", "label"} if manifest.num_classes else {"input_ids"}
    if manifest.has_lengths:
        wanted |= set(LENGTH_COLUMNS)
    if set(dataset.column_names) != wanted:
        raise TokenSetError(f"{path} has columns {dataset.column_names}, expected {sorted(wanted)}")
    if not len(dataset):
        return
    table = dataset.data
    input_ids = table.column("input_ids")
    lengths = pc.min_max(pc.list_value_length(input_ids)).as_py()
    if lengths["min"] != manifest.sequence_length or lengths["max"] != manifest.sequence_length:
        raise TokenSetError(f"{path} has sequences of length {lengths['min']}..{lengths['max']}, "
                            f"the manifest says {manifest.sequence_length}")
    values = pc.min_max(pc.list_flatten(input_ids)).as_py()
    if values["min"] < 0 or values["max"] >= manifest.vocab_size:
        raise TokenSetError(f"{path} has tokens in [{values['min']}, {values['max']}], "
                            f"outside [0, {manifest.vocab_size})")
    if manifest.num_classes:
        labels = pc.min_max(table.column("label")).as_py()
        if labels["min"] < 0 or labels["max"] >= manifest.num_classes:
            raise TokenSetError(f"{path} has labels in [{labels['min']}, {labels['max']}], "
                                f"outside [0, {manifest.num_classes})")
    if manifest.has_lengths:
        frames = pc.min_max(table.column("num_frames")).as_py()
        if frames["min"] < 0 or frames["max"] > manifest.token_grid[0]:
            raise TokenSetError(f"{path} has num_frames in [{frames['min']}, {frames['max']}], "
                                f"outside [0, {manifest.token_grid[0]}]")


def load_tokenset(directory: str | Path, *, tokenizer_dir: str | Path | None = None,
                  expected_vocab_size: int | None = None, expected_sequence_length: int | None = None,
                  expected_num_classes: int | None = None) -> TokenSet:
    """Open and validate a token set; with `tokenizer_dir`, also prove it was made by that tokenizer."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if tokenizer_dir is not None:
        weights = Path(tokenizer_dir) / WEIGHTS_NAME
        if not weights.is_file():
            raise TokenSetError(f"{weights} does not exist; cannot check which tokenizer made {directory}")
        given = sha256_file(weights)
        if given != manifest.tokenizer_sha256:
            raise TokenSetMismatchError(
                f"the tokens in {directory} were made with a {manifest.tokenizer_kind!r} tokenizer whose weights have "
                f"sha256 {manifest.tokenizer_sha256}, but {tokenizer_dir} holds weights with sha256 {given}; "
                f"re-export the tokens with this tokenizer (tokgen export-tokens) or use the one they were made with"
            )
    _check_expectations(manifest, directory, vocab_size=expected_vocab_size,
                        sequence_length=expected_sequence_length, num_classes=expected_num_classes)
    splits = {}
    for name in SPLITS:
        path = directory / name
        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as error:  # missing folder, corrupt Arrow file, DatasetDict instead of Dataset ...
            raise TokenSetError(f"cannot load split {name!r} from {path}: {type(error).__name__}: {error}") from error
        if not isinstance(dataset, datasets.Dataset):
            raise TokenSetError(f"{path} holds a {type(dataset).__name__}, expected one Dataset per split")
        _check_split(dataset, manifest, name, path)
        dataset.set_format("torch", columns=dataset.column_names)
        splits[name] = dataset
    return TokenSet(directory, manifest, splits)
