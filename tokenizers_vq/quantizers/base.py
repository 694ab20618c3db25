"""What every quantizer shares: its output type, code-usage statistics, and cross-process sums.

A quantizer maps encoder outputs `(b n d)` to codes from a finite codebook and returns a
`QuantizerOutput`. The usage statistics here (fraction of the codebook in use, perplexity of
the code distribution, as reported for VQ-VAE by van den Oord et al. 2017, "Neural Discrete
Representation Learning", and for codebook collapse by Razavi et al. 2019, "Generating Diverse
High-Fidelity Images with VQ-VAE-2") are computed from a vector of index counts, so the same
functions serve one training batch, a whole test split, or counts summed over processes.
Collectives are only issued when `torch.distributed` is initialised, so the same code runs
unchanged on one CPU and under `accelerate launch`. `config_from_dict` rebuilds the frozen
config dataclasses of this package from their JSON form, choosing among a `Union` of configs by
the nested dict's `kind`; `seeded_linear` builds the projections some quantizers put around their
code space with weights drawn from the module's own generator.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import NamedTuple

import math
import types

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn


class QuantizerOutput(NamedTuple):
    """The result of quantising `(b n d)` encoder outputs.

    quantized: (b n d) codes with a straight-through gradient to the input, in the input's dtype.
    indices: (b n) int64 code indices.
    aux_loss: scalar, already weighted (codebook + commitment terms).
    metrics: 0-d tensors "usage", "perplexity", "dead_codes".
    """

    quantized: Tensor
    indices: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]


# --- code-usage statistics -------------------------------------------------------------------


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """How often each code occurs in `indices` (any shape): `(codebook_size,)` int64."""
    flat = rearrange(indices, "... -> (...)").long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=codebook_size)


def usage_and_perplexity(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of codes used at least once and exp(entropy) of the code distribution.

    Perplexity ranges from 1 (one code takes everything) to the codebook size (uniform use).
    Both are 0-d float32 tensors; an all-zero count vector gives usage 0 and perplexity 1.
    """
    counts = counts.detach().double()
    usage = (counts > 0).double().mean()
    total = counts.sum()
    probabilities = counts / total.clamp_min(1.0)
    # 0 * log 0 is taken as 0: unused codes add nothing to the entropy.
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum()
    return usage.float(), torch.exp(entropy).float()


# --- collectives (no-ops on a single process) ---------------------------------------------------


def distributed_is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all processes in place (and return it); unchanged on one process."""
    if distributed_is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank_zero(tensor: Tensor) -> Tensor:
    """Overwrite `tensor` in place with rank 0's copy, so random choices agree on every rank."""
    if distributed_is_active():
        dist.broadcast(tensor, src=0)
    return tensor


def is_rank_zero() -> bool:
    return not distributed_is_active() or dist.get_rank() == 0


# --- configs ------------------------------------------------------------------------------------

# `field(default=..., metadata=ADDED_LATER)` marks a config field added after runs were fingerprinted
# (`pipelines.config.fingerprint`): at its default it is left out of stage fingerprints, so a run made
# before it keeps its stages instead of retraining them after an upgrade.
FINGERPRINT_WHEN_SET = "fingerprint_when_set"
ADDED_LATER = {FINGERPRINT_WHEN_SET: True}


def config_from_dict(cls, data: dict):
    """Build the frozen dataclass `cls` from a plain (e.g. JSON) dict.

    Unknown keys are rejected with the list of valid ones; nested dataclass fields are rebuilt
    by their own `from_dict`, and lists become tuples where the field is a tuple.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a dict of fields, got {type(data).__name__}")
    names = sorted(field.name for field in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for {cls.__name__}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if _is_union(hint) and isinstance(value, dict):
            hint = _union_member(hint, value, fields[key], f"{cls.__name__}.{key}")
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            builder = getattr(hint, "from_dict", None)
            value = builder(value) if builder is not None else config_from_dict(hint, value)
        elif (hint is tuple or typing.get_origin(hint) is tuple) and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def whole_numbers_as_floats(cls, data: dict) -> dict:
    """A copy of `data` (the plain dict of config `cls`) whose whole numbers given for float fields are
    floats, in nested configs too. `1` and `1.0` are one setting; a stage's fingerprint hashes the JSON,
    where they differ, so without this a key moved between the TOML and the command line could retrain a stage."""
    if not dataclasses.is_dataclass(cls):
        return dict(data)
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        hint = hints.get(key)
        if _is_union(hint) and isinstance(value, dict):
            hint = _union_member(hint, value, fields[key], f"{cls.__name__}.{key}")
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = whole_numbers_as_floats(hint, value)
        elif takes_float_not_int(hint) and type(value) is int:
            value = float(value)
        out[key] = value
    return out


def takes_float_not_int(hint) -> bool:
    """`float`, or a Union such as `float | None` with float in it and int not: a field where a whole
    number given is read as a float (here and in `pipelines.config_tables.build_dataclass`)."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    return float in options and int not in options


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _kind_of(config_cls) -> str | None:
    for field in dataclasses.fields(config_cls):
        if field.name == "kind" and isinstance(field.default, str):
            return field.default
    return None


def _union_member(hint, value: dict, field: dataclasses.Field, where: str):
    """The dataclass in the Union `hint` whose `kind` the nested dict names.

    A dict without `kind` takes the kind of the field's default (so a VQ-VAE's JSON written before
    quantizers had kinds still loads as VQ, and an LFQ tokenizer's `[quantizer]` table stays LFQ).
    """
    members = {_kind_of(member): member for member in typing.get_args(hint) if dataclasses.is_dataclass(member)}
    kind = value.get("kind")
    if kind is None:
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        kind = getattr(default, "kind", next(iter(members)))
    if kind not in members:
        raise ValueError(f"{where}: unknown kind {kind!r}; valid kinds: {', '.join(sorted(k for k in members if k))}")
    return members[kind]


def check_kind(config, expected: str) -> None:
    """Refuse a config whose `kind` field was set to another family's name."""
    if config.kind != expected:
        raise ValueError(f"{type(config).__name__}.kind must be {expected!r}, got {config.kind!r}")


# --- projections --------------------------------------------------------------------------------


def seeded_linear(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """`nn.Linear` with PyTorch's default uniform(+-1/sqrt(fan_in)) init, drawn from `generator`.

    Drawing from the module's generator keeps a quantizer's initial state a function of its config
    alone, independent of the global RNG and of the order in which models are built.
    """
    linear = nn.Linear(in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        linear.weight.copy_(torch.rand(out_features, in_features, generator=generator) * 2 * bound - bound)
        linear.bias.copy_(torch.rand(out_features, generator=generator) * 2 * bound - bound)
    return linear
