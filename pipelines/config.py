"""Run configuration: TOML files -> typed, validated dataclasses.

A run config has one section per stage. Component sections (`[tokenizer]`, `[prior]`) name a
registered `kind` and that component's fields; everything else maps onto the dataclasses below.
Unknown kinds and unknown keys are rejected with the list of what is valid, `key=value` overrides
from the command line are applied before validation, and the fully resolved config is dumped as
JSON beside the run so that a run folder always says exactly what produced it. TOML (via the
standard library's `tomllib`) types values correctly, which YAML 1.1 does not (`no`, `2e-5`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.resources
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.audio_data import AudioDataConfig
from pipelines.audio_eval import SpokenDigitClassifierConfig
from pipelines.classifier import ClassifierConfig
from pipelines.config_tables import ConfigError, build_dataclass
from pipelines.data import DataConfig
from pipelines.layouts import LAYOUTS
from pipelines.loop import TrainConfig
from priors import PRIORS
from tokenizers_vq import TOKENIZERS
from tokenizers_vq.quantizers.base import FINGERPRINT_WHEN_SET, whole_numbers_as_floats

# The prior learns these from the token manifest; a user never sets them by hand.
PRIOR_FIELDS_FROM_MANIFEST = ("vocab_size", "seq_len", "num_classes")
DEFAULT_CONFIG = "default_run.toml"


@dataclass(frozen=True)
class SamplingConfig:
    """How samples are drawn for the grid and for the sample-quality metrics."""

    grid_samples_per_class: int = 10
    eval_samples_per_class: int = 50
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 2.0
    batch_size: int = 250
    seed: int = 1234


@dataclass(frozen=True)
class EvaluationConfig:
    """Evaluation settings: the project's own classifier defines the sample feature space."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    batch_size: int = 256
    reconstruction_grid_images: int = 32


@dataclass(frozen=True)
class AudioConfig:
    """Audio-only settings of a run whose data is an `[audio_data]` section (see `pipelines.audio_stages`)."""

    layout: str = "flattened"  # how residual-VQ codes become one sequence: "flattened" | "delayed"
    prefix_seconds: float = 0.2  # prefix continuation: real test clips give this much, the prior continues
    completions: int = 10  # test clips continued from their prefix (WAVs + spectrogram PNG)
    spectrogram_clips: int = 3  # per class: generated clips shown beside as many real clips
    # Token augmentation for the prior: the train token set also holds this many copies of each clip
    # delayed by up to max_shift_seconds (a codec is not shift-invariant below its hop, so they
    # give new token sequences of the same speech). 0 = the clips once, as they are.
    train_shifted_copies: int = 0
    max_shift_seconds: float = 0.05
    classifier: SpokenDigitClassifierConfig = field(default_factory=SpokenDigitClassifierConfig)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"audio.layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.prefix_seconds < 0 or self.completions < 0 or self.spectrogram_clips < 1:
            raise ValueError("audio.prefix_seconds and audio.completions must be >= 0, audio.spectrogram_clips >= 1")
        if self.train_shifted_copies < 0 or self.max_shift_seconds <= 0:
            raise ValueError("audio.train_shifted_copies must be >= 0 and audio.max_shift_seconds > 0, got "
                             f"{self.train_shifted_copies} and {self.max_shift_seconds}")


@dataclass(frozen=True)
class ComponentSection:
    """A `[tokenizer]` or `[prior]` table: a registered kind and that kind's own fields."""

    kind: str
    fields: dict


@dataclass(frozen=True)
class RunConfig:
    name: str = "mnist_cpu"
    output_dir: str = "runs"
    seed: int = 0
    # A saved tokenizer folder (config.json + model.safetensors) whose weights, codebooks included, start
    # the tokenizer's training instead of random ones: a longer training split over calls, or fine-tuning
    # on new data. Its tensors must fit the [tokenizer] built here; the schedule and optimizer start afresh.
    tokenizer_init: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    audio_data: AudioDataConfig | None = None  # set: an audio run (then [data] is unused and refused)
    audio: AudioConfig = field(default_factory=AudioConfig)
    tokenizer: ComponentSection = field(default_factory=lambda: ComponentSection("vqvae", {}))
    tokenizer_training: TrainConfig = field(default_factory=TrainConfig)
    prior: ComponentSection = field(default_factory=lambda: ComponentSection("transformer", {}))
    prior_training: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def is_audio(self) -> bool:
        return self.audio_data is not None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def tokenizer_config(self):
        config_cls, _ = TOKENIZERS[self.tokenizer.kind]
        return config_cls.from_dict(copy.deepcopy(self.tokenizer.fields))

    def prior_config(self, vocab_size: int, seq_len: int, num_classes: int):
        config_cls, _ = PRIORS[self.prior.kind]
        fields = dict(copy.deepcopy(self.prior.fields), vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes)
        return config_cls.from_dict(fields)

    def to_dict(self) -> dict:
        """The config in the form of a config file (what `run_config_from_dict` reads back): components as
        `{"kind": ..., **fields}`, and only the data section the run reads."""
        data = dataclasses.asdict(self)
        for name in ("tokenizer", "prior"):
            section = getattr(self, name)
            data[name] = {"kind": section.kind, **copy.deepcopy(section.fields)}
        data.pop("data" if self.is_audio else "audio_data")
        return data


def _component_section(registry: dict, data: dict, where: str, reserved: tuple[str, ...] = ()) -> ComponentSection:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in registry:
        raise ConfigError(f"[{where}] kind {kind!r} is not one of {sorted(registry)}")
    for key in reserved:
        if key in data:
            raise ConfigError(f"[{where}] sets {key!r}, which is read from the token manifest; remove it")
    config_cls, _ = registry[kind]
    probe = dict(data, **{key: 2 for key in reserved})
    try:  # validate now so a bad key fails before hours of tokenizer training
        config_cls.from_dict(copy.deepcopy(probe))
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"[{where}] (kind {kind!r}): {error}") from error
    return ComponentSection(kind=kind, fields=whole_numbers_as_floats(config_cls, data))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: name=my_run
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def run_config_from_dict(data: dict) -> RunConfig:
    data = dict(data)
    simple = {}
    for key in ("name", "output_dir", "seed", "tokenizer_init"):
        if key in data:
            simple[key] = data.pop(key)
    sections = {
        "data": DataConfig,
        "tokenizer_training": TrainConfig,
        "prior_training": TrainConfig,
        "sampling": SamplingConfig,
        "evaluation": EvaluationConfig,
        "audio_data": AudioDataConfig,
        "audio": AudioConfig,
    }
    if "data" in data and "audio_data" in data:
        raise ConfigError("a run reads either images ([data]) or audio ([audio_data]), not both; remove one section")
    built = {}
    for key, cls in sections.items():
        if key in data:
            built[key] = build_dataclass(cls, data.pop(key), key)
    if "tokenizer" in data:
        built["tokenizer"] = _component_section(TOKENIZERS, data.pop("tokenizer"), "tokenizer")
    if "prior" in data:
        built["prior"] = _component_section(PRIORS, data.pop("prior"), "prior", PRIOR_FIELDS_FROM_MANIFEST)
    if data:
        valid = ["name", "output_dir", "seed", "tokenizer_init", "tokenizer", "prior", *sections]
        raise ConfigError(f"unknown top-level key(s) {sorted(data)}; valid: {sorted(valid)}")
    return RunConfig(**simple, **built)


def read_toml_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The tables of a TOML config file; a missing file or bad TOML is a `ConfigError` naming the file.

    A file may start from another: `extends = "base.toml"` (a path relative to the file) reads that one
    first, then lays this file's tables over it key by key, so a variant config holds only what it changes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    if "extends" not in data:
        return data
    base = data.pop("extends")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*_seen, path.resolve())
    if base_path in chain:
        raise ConfigError(f"{path}: extends {base!r} comes back to itself: "
                          + " -> ".join(str(p) for p in (*chain, base_path)))
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends {base!r}, but {base_path} does not exist")
    return merged_tables(read_toml_file(base_path, chain), data)


def merged_tables(base: dict, over: dict) -> dict:
    """`base` with `over` laid on it: tables merge key by key, any other value (lists too) replaces. A
    table that names another `kind` (a VQ-GAN over a VQ-VAE) replaces the base's: its fields are another's."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("kind", old.get("kind")) == old.get("kind"):
            merged[key] = merged_tables(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML run config (or the packaged CPU default when `path` is None) and apply overrides."""
    if path is None:  # the packaged copy of configs/pipeline/mnist_cpu.toml, so pip installs have it
        data = tomllib.loads(importlib.resources.files("pipelines").joinpath(DEFAULT_CONFIG).read_text())
    else:
        data = read_toml_file(path)
    data = apply_overrides(data, list(overrides))
    try:
        return run_config_from_dict(data)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from error


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts; decides whether a stage's outputs can be reused.

    Dataclasses are hashed as dicts, so their keys are sorted too: a config section's `fields` keep
    the order they were written in, and the same settings in another order (a key moved from the
    command line into the TOML) must not look like a new config and retrain a stage.
    """
    text = json.dumps(parts, sort_keys=True, default=_as_json)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_json(value: Any) -> Any:
    """A dataclass as the dict of its fields (json.dumps comes back here for nested ones), less the fields
    marked `ADDED_LATER` that hold their defaults; anything else as its str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                if not (f.metadata.get(FINGERPRINT_WHEN_SET) and getattr(value, f.name) == f.default)}
    return str(value)
