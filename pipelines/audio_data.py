"""Audio data sources: the Free Spoken Digit Dataset npz, or a folder of sound files, as masked clips.

A run names its audio with an `AudioDataConfig`: source "fsdd" (the npz of Jackson et al.'s Free
Spoken Digit Dataset, with its official split: recordings 0-4 of every speaker and digit are test)
or "audiofolder" (sound files read with `soundfile`, one sub-folder per class optional, optional
`train/` and `test/` sub-folders). Every clip is converted to float32 in [-1, 1], downmixed or
refused when its channel count differs from the config's, resampled to the config's rate with a
windowed-sinc polyphase resampler (`resample`), optionally scaled to a common peak level
(`peak_level`: FSDD's speakers were recorded at levels 15x apart, and a codec's waveform loss
barely sees the quiet ones), and cropped or zero-padded to `clip_seconds`; its
true length is kept, so a `(n t)` mask marks real samples and padding is never scored as data.
Validation is carved from train (seeded, class-stratified), and `max_train`/`max_test` take
class-balanced subsets. Unreadable files, wrong channel counts and rate mismatches fail with a
`DataError` that names the file. Batches for the models are `{"waveform": (b c t) float32,
"mask": (b t) bool, "label": (b,) int64}`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from pipelines.config_tables import build_dataclass
from pipelines.data import DataError, balanced_subset

logger = logging.getLogger(__name__)

AUDIO_SOURCES = ("fsdd", "audiofolder")
CROPS = ("start", "center")
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".au", ".mp3"}
FSDD_RATE = 8000


@dataclass(frozen=True)
class AudioDataConfig:
    source: str = "fsdd"  # "fsdd" | "audiofolder"
    path: str = ""  # the fsdd npz file, or the audio folder
    sample_rate: int = 8000  # every clip is brought to this rate
    channels: int = 1
    clip_seconds: float = 1.0  # crop/pad length; 0 pads every clip to the longest one
    crop: str = "start"  # where a longer clip is cut: "start" keeps its beginning, "center" its middle
    resample: bool = True  # False: a file at another rate is an error
    strict_channels: bool = False  # True: a file with more channels than `channels` is an error, not downmixed
    val_fraction: float = 0.1  # carved from train (stratified)
    test_fraction: float = 0.1  # carved from train for an audio folder without a test/ sub-folder
    max_train: int = 0  # 0 = all; otherwise a class-balanced subset (taken before carving val)
    max_test: int = 0  # 0 = all; caps test and val
    peak_level: float = 0.0  # > 0: every clip is scaled so its largest |sample| is this; 0 keeps recorded levels
    seed: int = 0

    def __post_init__(self):
        if self.source not in AUDIO_SOURCES:
            raise ValueError(f"data.source must be one of {list(AUDIO_SOURCES)}, got {self.source!r}")
        if not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path")
        if self.sample_rate < 1 or self.channels < 1 or self.clip_seconds < 0:
            raise ValueError("data.sample_rate and data.channels must be positive, data.clip_seconds >= 0")
        if self.crop not in CROPS:
            raise ValueError(f"data.crop must be one of {list(CROPS)}, got {self.crop!r}")
        if self.max_train < 0 or self.max_test < 0:
            raise ValueError("data.max_train and data.max_test must be >= 0")
        if not 0.0 <= self.peak_level <= 1.0:
            raise ValueError(f"data.peak_level must lie in [0, 1] (0 = off), got {self.peak_level}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> "AudioDataConfig":
        return build_dataclass(cls, data, "audio_data")

    @property
    def clip_samples(self) -> int:
        """Samples per clip at `sample_rate`; 0 when clips are padded to the longest instead."""
        return round(self.clip_seconds * self.sample_rate)


@dataclass
class AudioSplit:
    waveforms: np.ndarray  # float32 (n c t) in [-1, 1], zero after each clip's length
    lengths: np.ndarray  # int64 (n,) real samples per clip
    labels: np.ndarray | None  # int64 (n,), None for unlabelled data

    def __len__(self) -> int:
        return len(self.waveforms)

    def take(self, index: np.ndarray) -> "AudioSplit":
        labels = None if self.labels is None else self.labels[index]
        return AudioSplit(self.waveforms[index], self.lengths[index], labels)


@dataclass
class AudioDataset:
    train: AudioSplit
    val: AudioSplit
    test: AudioSplit
    num_classes: int  # 0 when the data has no labels
    class_names: list[str]
    sample_rate: int
    channels: int
    source: dict = field(default_factory=dict)  # JSON-able description, recorded in the token manifest

    def splits(self) -> dict[str, AudioSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}


# --- tensors ------------------------------------------------------------------------------------


def lengths_to_mask(lengths: torch.Tensor | np.ndarray, max_length: int) -> torch.Tensor:
    """(n,) lengths -> (n t) bool, True on the first `length` samples of each row."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return rearrange(torch.arange(max_length), "t -> 1 t") < rearrange(lengths, "n -> n 1")


class AudioTensorDataset(torch.utils.data.Dataset):
    """An `AudioSplit` as `{"waveform": (c t) float32, "mask": (t,) bool, "label": int64}` items."""

    def __init__(self, split: AudioSplit):
        self.waveforms = torch.from_numpy(np.ascontiguousarray(split.waveforms, dtype=np.float32))
        self.masks = lengths_to_mask(split.lengths, self.waveforms.shape[-1])
        self.labels = None if split.labels is None else torch.as_tensor(split.labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.waveforms)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"waveform": self.waveforms[index], "mask": self.masks[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


# --- resampling ---------------------------------------------------------------------------------


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int, zero_crossings: int = 16,
             rolloff: float = 0.945) -> torch.Tensor:
    """(... t) at `orig_rate` -> (... ceil(t * new / orig)) at `new_rate`, by windowed-sinc interpolation.

    With the rates reduced to coprime L = new / g and M = orig / g, output sample j sits at input
    time j * M / L; it is a weighted sum of the input samples around that time, with weights from
    a sinc low-pass at `rolloff` times the lower Nyquist frequency (so downsampling does not alias)
    under a Hann window spanning `zero_crossings` zero crossings on each side. The L output
    phases repeat every M input samples, so one strided convolution with L kernels computes all
    of them (the polyphase form, as in Smith's "Digital Audio Resampling" and torchaudio).
    Zeros are assumed outside the signal.
    """
    if orig_rate == new_rate:
        return waveform
    if orig_rate < 1 or new_rate < 1:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    divisor = math.gcd(orig_rate, new_rate)
    up, down = new_rate // divisor, orig_rate // divisor
    # Time is counted in input samples. The low-pass h(t) = 2fc sinc(2fc t) has its cutoff fc
    # (cycles per input sample) at rolloff * min(1, up / down) / 2, so 2fc = cutoff / down and
    # `width` input samples span `zero_crossings` of its zero crossings on each side.
    cutoff = rolloff * min(up, down)
    width = math.ceil(zero_crossings * down / cutoff)
    if up * (2 * width + down) > 50_000_000:
        raise ValueError(f"resampling {orig_rate} -> {new_rate} Hz needs {up} kernels of {2 * width + down} "
                         "taps; convert the files to a common rate first")
    offsets = torch.arange(-width, width + down, dtype=torch.float64)  # input positions relative to a block
    phases = torch.arange(up, dtype=torch.float64) * down / up  # output times within a block
    times = rearrange(offsets, "k -> 1 k") - rearrange(phases, "l -> l 1")  # (l k)
    scaled = times * cutoff / down  # 2fc t: in zero crossings of the sinc
    window = torch.where(scaled.abs() <= zero_crossings, torch.cos(scaled * math.pi / zero_crossings / 2) ** 2, 0.0)
    kernels = torch.sinc(scaled) * window * cutoff / down  # 2fc sinc(2fc t) w(t): unit gain at DC
    length = waveform.shape[-1]
    flat = rearrange(waveform.to(torch.float64), "... t -> (...) 1 t")
    padded = F.pad(flat, (width, width + down))
    # Input index of offset k for block b is b * down + k - width; the padding shifts it by width.
    output = F.conv1d(padded, rearrange(kernels, "l k -> l 1 k"), stride=down)  # (n l blocks)
    output = rearrange(output, "n l blocks -> n (blocks l)")[:, : math.ceil(length * up / down)]
    return output.reshape(*waveform.shape[:-1], -1).to(waveform.dtype)


# --- clips ----------------------------------------------------------------------------------------


def _crop(clip: np.ndarray, samples: int, crop: str) -> np.ndarray:
    """(c t) -> (c min(t, samples)), cut at the start or around the centre."""
    excess = clip.shape[-1] - samples
    if excess <= 0:
        return clip
    start = 0 if crop == "start" else excess // 2
    return clip[:, start : start + samples]


def _stack_clips(clips: list[np.ndarray], config: AudioDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(c t_i) float32 clips -> (n c t) zero-padded array and (n,) lengths (after cropping)."""
    if config.peak_level:  # the whole clip's peak, before cropping, so a crop keeps the recording's balance
        clips = [normalize_peak(clip, config.peak_level) for clip in clips]
    if config.clip_samples:
        clips = [_crop(clip, config.clip_samples, config.crop) for clip in clips]
    lengths = np.array([clip.shape[-1] for clip in clips], dtype=np.int64)
    target = config.clip_samples or int(lengths.max(initial=0))
    waveforms = np.zeros((len(clips), config.channels, target), dtype=np.float32)
    for row, clip in enumerate(clips):
        waveforms[row, :, : clip.shape[-1]] = clip
    return waveforms, lengths


def normalize_peak(clip: np.ndarray, level: float) -> np.ndarray:
    """`clip` scaled so that max |sample| = `level`; a silent clip is returned unchanged."""
    peak = float(np.abs(clip).max(initial=0.0))
    return clip if peak == 0.0 else (clip * (level / peak)).astype(np.float32)


def _to_rate(clip: np.ndarray, rate: int, config: AudioDataConfig, where: str) -> np.ndarray:
    if rate == config.sample_rate:
        return clip
    if not config.resample:
        raise DataError(f"{where}: sample rate {rate} Hz, but the data config asks for {config.sample_rate} Hz "
                        "and data.resample is off")
    return resample(torch.from_numpy(clip), rate, config.sample_rate).numpy()


def _to_channels(clip: np.ndarray, config: AudioDataConfig, where: str) -> np.ndarray:
    """(c t) -> (config.channels t): many channels downmixed to mono unless strict; anything else refused."""
    channels = clip.shape[0]
    if channels == config.channels:
        return clip
    if config.channels == 1 and not config.strict_channels:
        logger.info("%s: downmixing %d channels to mono", where, channels)
        return clip.mean(axis=0, keepdims=True)
    advice = ("mono expected; set data.strict_channels = false to downmix" if config.channels == 1
              else "convert the files first")
    raise DataError(f"{where}: {channels} channel(s), but the data config asks for {config.channels} ({advice})")


# --- sources: each returns ({split: (clips, labels)}, class names) ---------------------------------


def _load_fsdd(config: AudioDataConfig) -> tuple[dict[str, tuple[list, np.ndarray]], list[str]]:
    path = Path(config.path)
    if not path.is_file():
        raise DataError(f"FSDD file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"audio", "offsets", "labels", "is_test"} - set(arrays.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(arrays.files)}")
            audio, offsets = arrays["audio"], arrays["offsets"].astype(np.int64)
            labels, is_test = arrays["labels"].astype(np.int64), arrays["is_test"].astype(bool)
            rate = int(arrays["sample_rate"]) if "sample_rate" in arrays.files else FSDD_RATE
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {path} as the FSDD npz: {error}") from error
    if len(offsets) != len(labels) + 1 or len(is_test) != len(labels):
        raise DataError(f"{path}: offsets ({len(offsets)}), labels ({len(labels)}) and is_test ({len(is_test)}) "
                        "disagree in length")
    # int16 PCM -> [-1, 1): the usual 1 / 32768 scale, so full scale (-32768) maps to exactly -1.
    scale = 1.0 / 32768.0 if audio.dtype == np.int16 else 1.0
    splits = {}
    for split, selection in (("train", ~is_test), ("test", is_test)):
        index = np.flatnonzero(selection)
        clips = [rearrange(audio[offsets[i] : offsets[i + 1]].astype(np.float32) * scale, "t -> 1 t") for i in index]
        clips = [_to_rate(_to_channels(clip, config, f"{path} clip {i}"), rate, config, f"{path} clip {i}")
                 for clip, i in zip(clips, index)]
        splits[split] = (clips, labels[index])
    return splits, [str(digit) for digit in range(10)]


def read_audio_file(path: Path, config: AudioDataConfig) -> np.ndarray:
    """One file -> float32 (config.channels t) at config.sample_rate; `DataError` naming the file."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as error:
        raise DataError(f"cannot read audio file {path}: {error}") from error
    if data.shape[0] == 0:
        raise DataError(f"audio file {path} holds no samples")
    clip = _to_channels(np.ascontiguousarray(rearrange(data, "t c -> c t")), config, str(path))
    return _to_rate(clip, rate, config, str(path))


def _audio_files(folder: Path) -> list[Path]:
    return sorted(file for file in folder.rglob("*") if file.is_file() and file.suffix.lower() in AUDIO_EXTENSIONS)


def _read_class_folder(folder: Path, config: AudioDataConfig, class_names: list[str] | None):
    """All files under `folder` with labels from their first sub-folder (None without sub-folders)."""
    files = _audio_files(folder)
    clips = [read_audio_file(file, config) for file in files]
    if class_names is None:
        return clips, None
    labels = []
    for file in files:
        relative = file.relative_to(folder).parts
        if len(relative) < 2 or relative[0] not in class_names:
            raise DataError(f"{file}: not inside a class folder of {folder} (classes: {class_names})")
        labels.append(class_names.index(relative[0]))
    return clips, np.array(labels, dtype=np.int64)


def _load_audiofolder(config: AudioDataConfig) -> tuple[dict[str, tuple[list, np.ndarray | None]], list[str]]:
    root = Path(config.path)
    if not root.is_dir():
        raise DataError(f"audio folder {root} does not exist or is not a folder")
    if not _audio_files(root):
        raise DataError(f"audio folder {root} holds no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
    split_folders = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" not in split_folders:
        split_folders = {"train": root}
    class_roots = list(split_folders.values())
    sub_folders = sorted({p.name for folder in class_roots for p in folder.iterdir() if p.is_dir()})
    class_names = sub_folders or None
    splits = {name: _read_class_folder(folder, config, class_names) for name, folder in split_folders.items()}
    return splits, class_names or []


# --- splitting ------------------------------------------------------------------------------------


def _stratified_holdout(split: AudioSplit, fraction: float, rng: np.random.Generator) -> tuple[AudioSplit, AudioSplit]:
    """(rest, held out): `fraction` of every class (or of all clips when unlabelled), seeded."""
    labels = split.labels if split.labels is not None else np.zeros(len(split), dtype=np.int64)
    held = [rng.permutation(np.flatnonzero(labels == value))[: round(fraction * np.sum(labels == value))]
            for value in np.unique(labels)]
    chosen = np.zeros(len(split), dtype=bool)
    chosen[np.concatenate(held).astype(np.int64)] = True
    return split.take(np.flatnonzero(~chosen)), split.take(np.flatnonzero(chosen))


def _subset(split: AudioSplit, size: int, rng: np.random.Generator) -> AudioSplit:
    if not size or size >= len(split):
        return split
    if split.labels is None:
        return split.take(np.sort(rng.permutation(len(split))[:size]))
    return split.take(balanced_subset(split.labels, size, rng))


def load_audio_dataset(config: AudioDataConfig) -> AudioDataset:
    """Load the audio an `AudioDataConfig` names as train/val/test masked clips (seeded, deterministic)."""
    if config.source == "fsdd":
        raw, class_names = _load_fsdd(config)
    else:
        raw, class_names = _load_audiofolder(config)
    where = config.path
    splits = {}
    for name, (clips, labels) in raw.items():
        if clips:
            waveforms, lengths = _stack_clips(clips, config)
            splits[name] = AudioSplit(waveforms, lengths, labels)
    if "train" not in splits:
        raise DataError(f"{where}: the data set has no training clips")
    rng = np.random.default_rng(config.seed)
    train = _subset(splits["train"], config.max_train, rng)
    test = splits.get("test")
    if test is None:
        if not config.test_fraction:
            raise DataError(f"{where}: no test split; set data.test_fraction > 0 to carve one from train")
        train, test = _stratified_holdout(train, config.test_fraction, rng)
    val = splits.get("val")
    if val is None:
        train, val = _stratified_holdout(train, config.val_fraction, rng)
    test, val = _subset(test, config.max_test, rng), _subset(val, config.max_test, rng)
    if not len(train) or not len(test):
        raise DataError(f"{where}: the {'test' if not len(test) else 'train'} split is empty after splitting")
    # Without a fixed clip length, each split was padded to its own longest clip: pad all to one.
    longest = max(split.waveforms.shape[-1] for split in (train, val, test))
    train, val, test = (_pad_to(split, longest) for split in (train, val, test))
    num_classes = len(class_names) if train.labels is not None else 0
    source = {**dataclasses.asdict(config),
              "origin": "Free Spoken Digit Dataset npz" if config.source == "fsdd" else "local audio folder"}
    logger.info("audio %s: train %d, val %d, test %d clips of %d samples at %d Hz, %d classes",
                where, len(train), len(val), len(test), longest, config.sample_rate, num_classes)
    return AudioDataset(train, val, test, num_classes, list(class_names) if num_classes else [],
                        config.sample_rate, config.channels, source)


def _pad_to(split: AudioSplit, length: int) -> AudioSplit:
    extra = length - split.waveforms.shape[-1]
    if extra <= 0:
        return split
    return AudioSplit(np.pad(split.waveforms, ((0, 0), (0, 0), (0, extra))), split.lengths, split.labels)
