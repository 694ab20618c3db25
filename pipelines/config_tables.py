"""TOML tables (plain dicts) -> the frozen config dataclasses of `pipelines`.

One function builds every pipeline config (`[data]`, `[tokenizer_training]`, the classifier a
run caches...), so each rejects unknown keys, and turns TOML lists into tuples, the same way.
It lives apart from `pipelines.config` because the modules that define those dataclasses
(`loop`, `data`, `classifier`...) need it, and `pipelines.config` imports all of them.
"""

from __future__ import annotations

import dataclasses
import typing

from tokenizers_vq.quantizers.base import takes_float_not_int


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid run config."""


def _valid_keys_message(cls) -> str:
    return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))


def build_dataclass(cls, data: dict, where: str):
    """Build dataclass `cls` from a plain dict, recursing into nested dataclass fields.

    Rejects unknown keys (naming the section `where` and the valid keys), turns TOML lists into
    tuples where the field is a tuple and whole numbers into floats where it is a float. The
    dataclass's own validation errors become `ConfigError`s that name the section.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; valid keys: {_valid_keys_message(cls)}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            value = build_dataclass(hint, value, f"{where}.{key}")
        elif (hint is tuple or origin is tuple) and isinstance(value, list):
            value = tuple(value)
        elif takes_float_not_int(hint) and type(value) is int:  # 1 and 1.0 are one setting, and one fingerprint
            value = float(value)
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[{where}]: {error}") from error
