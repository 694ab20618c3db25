"""Shared machinery of the comparison priors: an exact autoregressive density over token sequences.

Every comparison model (histogram, FVSBN, NADE, MADE, and the LSTM/GRU prior) factorises
p(x | c) = prod_t p(x_t | x_<t, c) in the natural (row-major) order and differs only in how it
computes the logits of each conditional. `AutoregressiveDensityModel` turns one method,
`token_logits(input_ids, class_index) -> (b L V)`, into the whole stage-two API of
docs/INTERFACES.md: exact `log_prob` in nats, the mean-NLL `loss` with label dropout (the null
class of classifier-free guidance, Ho & Salimans 2022), position-by-position `sample` with
temperature / top-k / top-p / guidance / prefix, and a self-describing checkpoint folder
(`tokgen.json` + `model.safetensors`, loaded strictly). Class conditioning uses a class index in
`[0, C]`: `0..C-1` are the classes and `C` is the null class (unconditional, or a dropped label);
an unconditional model (`num_classes == 0`) has only the null index 0. The masked linear layer of
MADE (Germain et al. 2015) and FVSBN (Frey 1998) also lives here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from priors.sampling import SamplingOptions, apply_guidance, draw, filter_logits
from priors.token_nll import mean_token_nll, nll_metrics

logger = logging.getLogger(__name__)

TOKGEN_NAME = "tokgen.json"
WEIGHTS_NAME = "model.safetensors"


def config_from_dict(config_cls, data: dict):
    """Build a (flat) config dataclass from a dict, refusing unknown keys with the list of valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} key(s) {unknown}; valid keys: {valid}")
    return config_cls(**data)


def check_sizes(vocab_size: int, seq_len: int, num_classes: int) -> None:
    if vocab_size < 2 or seq_len < 1 or num_classes < 0:
        raise ValueError(
            f"need vocab_size >= 2, seq_len >= 1, num_classes >= 0; got {vocab_size}, {seq_len}, {num_classes}"
        )


def load_state_strictly(module: nn.Module, tensors: dict[str, Tensor], source: str | Path) -> None:
    """`load_state_dict(strict=True)` with an error that names every missing, extra or mis-shaped tensor."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(tensors)
        if tensors[name].shape != expected[name].shape
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{source} does not match the model built from its {TOKGEN_NAME}: missing tensors {missing}, "
            f"unexpected tensors {unexpected}, wrong shapes {misshaped}"
        )
    module.load_state_dict(tensors, strict=True)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out_features, in_features).

    The mask is derived from the config, so it is a non-persistent buffer: checkpoints hold only
    the weights, and a reloaded model rebuilds the same mask.
    """

    def __init__(self, mask: Tensor, bias: bool = True):
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def masked_weight(self) -> Tensor:
        """(out_features, in_features) the weight as the layer applies it, zero where the mask is."""
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def binary_to_categorical_logits(logit: Tensor) -> Tensor:
    """(... ) Bernoulli logit of token 1 -> (... 2) categorical logits [0, logit].

    log_softmax([0, a]) = [log(1 - sigmoid(a)), log sigmoid(a)]: the Bernoulli likelihood exactly,
    so binary models share the categorical code path.
    """
    return torch.stack([torch.zeros_like(logit), logit], dim=-1)


class BaselinePrior(nn.Module):
    """Label, token and checkpoint plumbing of every comparison prior (autoregressive, VAE, GAN).

    It reads only `config` (with `vocab_size`, `seq_len`, `num_classes`), `kind` and `config_class`.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = object

    def __init__(self, config):
        super().__init__()
        check_sizes(config.vocab_size, config.seq_len, config.num_classes)
        self.config = config

    # ---- conditioning -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def class_index(self, label: Tensor | int | None, batch_size: int) -> Tensor:
        """label (b,), an int for every row, or None -> (b,) int64 indices in [0, C]; None is the null class C."""
        if label is None:
            return torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.device)
        if self.config.num_classes == 0:
            raise ValueError("this prior is unconditional (num_classes=0) but a label was given")
        label = torch.as_tensor(label, device=self.device).long()
        label = label.expand(batch_size) if label.ndim == 0 else label
        if label.shape != (batch_size,):
            raise ValueError(f"label must be an int or have shape ({batch_size},), got {tuple(label.shape)}")
        if label.numel() and (label.min() < 0 or label.max() >= self.config.num_classes):
            raise ValueError(f"labels must lie in [0, {self.config.num_classes}), got {label.tolist()}")
        return label

    def check_tokens(self, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] != self.config.seq_len:
            raise ValueError(f"input_ids must be (b {self.config.seq_len}), got {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size})")
        return input_ids.long()

    def drop_labels(self, label: Tensor | None, batch_size: int) -> Tensor:
        """Class indices with each label replaced by the null class with probability `label_dropout`."""
        classes = self.class_index(label, batch_size)
        dropout = getattr(self.config, "label_dropout", 0.0)
        if label is None or not self.training or dropout <= 0:
            return classes
        # the loop re-seeds torch's RNG per step, so this draw is reproducible on resume
        dropped = torch.rand(batch_size, device=classes.device) < dropout
        return torch.where(dropped, torch.full_like(classes, self.null_class), classes)


    # ---- checkpoints ---------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """`tokgen.json` ({"kind", "config"}) + `model.safetensors` (persistent state only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"kind": self.kind, "config": dataclasses.asdict(self.config)}
        (directory / TOKGEN_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        logger.info("saved %s prior to %s", self.kind, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        """Build from `tokgen.json`, load `model.safetensors` strictly; returns the model in eval mode."""
        directory = Path(directory)
        record_path, weights_path = directory / TOKGEN_NAME, directory / WEIGHTS_NAME
        for path in (record_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; a prior folder holds {TOKGEN_NAME} and {WEIGHTS_NAME}")
        record = json.loads(record_path.read_text())
        if record.get("kind") != cls.kind or "config" not in record:
            raise ValueError(f"{record_path} describes kind {record.get('kind')!r}, not a {cls.kind!r} prior")
        model = cls(cls.config_class.from_dict(record["config"]))
        load_state_strictly(model, load_file(weights_path), weights_path)
        return model.eval()


class AutoregressiveDensityModel(BaselinePrior):
    """Base of the autoregressive comparison priors. Subclasses set `kind`, `config_class` and `token_logits`.

    `token_logits(input_ids (b L), class_index (b,)) -> (b L V)`: logits of p(x_t | x_<t, c), which
    must not depend on `input_ids[:, t:]`. `next_token_logits` may be overridden with a cheaper
    computation of a single position for sampling.
    """

    log_prob_is_bound: ClassVar[bool] = False  # every model here gives exact likelihoods
    fit_by_counting: ClassVar[bool] = False  # True: trained by `fit`, not by the gradient loop

    # ---- density -------------------------------------------------------------------------
    def token_logits(self, input_ids: Tensor, class_index: Tensor) -> Tensor:
        raise NotImplementedError

    def next_token_logits(self, input_ids: Tensor, position: int, class_index: Tensor) -> Tensor:
        """(b L) tokens (only [:, :position] are read), (b,) -> (b V) logits of token `position`."""
        return self.token_logits(input_ids, class_index)[:, position]

    @staticmethod
    def mask_inputs(input_ids: Tensor, mask: Tensor | None) -> Tensor:
        """Masked positions (padding of a short clip) read as token 0, so no scored position depends on them."""
        return input_ids if mask is None else torch.where(mask.bool(), input_ids, torch.zeros_like(input_ids))

    def token_log_probs(self, input_ids: Tensor, label: Tensor | int | None = None,
                        mask: Tensor | None = None) -> Tensor:
        """(b L) -> (b L) log p(x_t | x_<t, label) in nats; 0 where the optional (b L) mask is False."""
        input_ids = self.check_tokens(input_ids.to(self.device))
        logits = self.token_logits(self.mask_inputs(input_ids, mask), self.class_index(label, input_ids.shape[0]))
        log_probs = F.log_softmax(logits.float(), dim=-1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
        return log_probs if mask is None else log_probs * mask.to(log_probs.device, log_probs.dtype)

    def log_prob(self, input_ids: Tensor, label: Tensor | int | None = None, mask: Tensor | None = None) -> Tensor:
        """(b L) -> (b,) exact log-likelihood of each sequence in nats (of its unmasked tokens)."""
        if mask is None:
            return self.token_log_probs(input_ids, label).sum(dim=-1)
        # Through the two-argument form, which subclasses (the histogram) may override.
        mask = mask.to(self.device).bool()
        log_probs = self.token_log_probs(self.mask_inputs(input_ids.to(self.device), mask), label)
        return (log_probs * mask.to(log_probs.dtype)).sum(dim=-1)

    # ---- training (`Trainable`) ----------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def phases(self, step: int) -> list[str]:
        return ["main"]

    def training_batch(self, batch: dict) -> tuple[Tensor, Tensor | None, Tensor]:
        """(checked tokens, `loss_mask` or None, class indices with labels dropped) of a training batch."""
        input_ids = self.check_tokens(batch["input_ids"].to(self.device))
        label = batch.get("label") if self.config.num_classes > 0 else None
        return input_ids, batch.get("loss_mask"), self.drop_labels(label, input_ids.shape[0])

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean negative log-likelihood per token (nats) of `batch["input_ids"]`, over the tokens of
        `batch["loss_mask"]` when the batch has one."""
        input_ids, mask, class_index = self.training_batch(batch)
        logits = self.token_logits(self.mask_inputs(input_ids, mask), class_index)
        nll = mean_token_nll(logits, input_ids, mask)
        return nll, nll_metrics(nll)

    # ---- sampling -------------------------------------------------------------------------
    def prepare_sampling(self, n: int, label: Tensor | int | None, prefix: Tensor | None, options: SamplingOptions):
        """Validate the inputs; returns (tokens (r L), class_index (r,), prefix_len, guided).

        `prefix` is (n P) or (P,) for every row. With guidance the batch is doubled, r = 2n: rows [:n] carry the labels, rows [n:] the null
        class, so one forward pass gives both logits of classifier-free guidance.
        """
        seq_len = self.config.seq_len
        classes = self.class_index(label, n)
        tokens = torch.zeros(n, seq_len, dtype=torch.long, device=self.device)
        prefix_len = 0
        if prefix is not None:
            prefix = torch.as_tensor(prefix, device=self.device).long()
            prefix = prefix.expand(n, -1) if prefix.ndim == 1 else prefix
            if prefix.ndim != 2 or prefix.shape[0] != n or prefix.shape[1] > seq_len:
                raise ValueError(f"prefix must be (n P) with n={n}, P <= {seq_len}; got {tuple(prefix.shape)}")
            if prefix.numel() and (prefix.min() < 0 or prefix.max() >= self.vocab_size):
                raise ValueError(f"prefix tokens must lie in [0, {self.vocab_size})")
            prefix_len = prefix.shape[1]
            tokens[:, :prefix_len] = prefix
        # guidance needs a label to move towards; without one the sample is simply unconditional
        guided = label is not None and options.guidance_scale != 1.0
        if guided:
            classes = torch.cat([classes, torch.full_like(classes, self.null_class)])
            tokens = torch.cat([tokens, tokens])
        return tokens, classes, prefix_len, guided

    @staticmethod
    def choose_tokens(logits: Tensor, options: SamplingOptions, generator, guided: bool) -> Tensor:
        """(r V) logits -> (r,) tokens; with guidance the two halves get the same guided draw."""
        # guidance combines log-likelihood ratios, so normalise first (in the logits' own precision)
        logits = F.log_softmax(logits, dim=-1).float()
        if guided:
            n = logits.shape[0] // 2
            logits = apply_guidance(logits[:n], logits[n:], options.guidance_scale)
        chosen = draw(filter_logits(logits, options), generator)
        return torch.cat([chosen, chosen]) if guided else chosen

    @torch.no_grad()
    def sample(self, n: int, label: Tensor | int | None = None, prefix: Tensor | None = None,
               options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None) -> Tensor:
        """-> (n L) int64 tokens; the first P positions equal `prefix` when given.

        Guidance runs when `options.guidance_scale != 1` and a label is given. Dropout is off while
        sampling; the training mode is restored afterwards.
        """
        tokens, classes, prefix_len, guided = self.prepare_sampling(n, label, prefix, options)
        was_training = self.training
        self.eval()
        try:
            self.decode(tokens, classes, prefix_len, guided, options, generator)
        finally:
            self.train(was_training)
        return tokens[:n]

    def decode(self, tokens: Tensor, classes: Tensor, prefix_len: int, guided: bool, options: SamplingOptions,
               generator) -> None:
        """Fill `tokens[:, prefix_len:]` (r L) in place, one position at a time, recomputing from the tokens."""
        for position in range(prefix_len, self.config.seq_len):
            logits = self.next_token_logits(tokens, position, classes)
            tokens[:, position] = self.choose_tokens(logits, options, generator, guided)
