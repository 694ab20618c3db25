"""Lossless compression of token sequences with a trained prior: each sequence becomes its own
arithmetic-coded byte string of about `-log2 p(x)` bits, so the prior's NLL turns into a measured
bit rate (the entropy-coding stage of EnCodec, Defossez et al. 2022, section 3.3, which codes
codec tokens under a small transformer).

Encoder and decoder must see bit-identical probabilities, so both run the same step-by-step
computation over the same batch: the conditioning token, then one token per step with the
prior's cache (`Stepper`). A batch's rows are coded together but each row writes its own stream;
decoding a stream needs the batch it was encoded in (same sequences, same order) and the same
arithmetic (device, dtype, and on the CPU the thread count: a transformer's sums are split by thread
and by batch shape, and one differing bit of a probability derails the decoder), which
`pipelines.compression` records. Positions where a row's mask is False (the padding
of a short clip) are neither coded nor decoded; the model reads them as token 0, as in training.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from priors.arithmetic_coding import ArithmeticDecoder, ArithmeticEncoder, quantized_cdf
from priors.baselines.common import AutoregressiveDensityModel
from priors.rnn import RNNPrior
from priors.transformer import TransformerPrior


def prior_device(prior) -> torch.device:
    """Where the prior's tensors live."""
    # The baselines name their device (the histogram has buffers only); the transformer has parameters.
    return prior.device if isinstance(prior, AutoregressiveDensityModel) else next(prior.parameters()).device


class Stepper:
    """Next-token log-probabilities of a batch, one position at a time: `first()` gives those of
    position 0, `advance(tokens)` reads the `(b,)` tokens of the current position and gives the next."""

    def first(self) -> Tensor:
        raise NotImplementedError

    def advance(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError


class TransformerStepper(Stepper):
    """The transformer prior with its KV cache, as its sampler runs it eagerly."""

    def __init__(self, prior: TransformerPrior, label: Tensor | None, rows: int):
        self.prior, self.cache, self.position = prior, prior.new_kv_cache(), 0
        self.cond = prior.condition_tokens(label, rows, prior_device(prior))

    def _step(self, ids: Tensor) -> Tensor:
        positions = torch.full_like(ids, self.position)
        self.position += 1
        return self.prior._next_log_probs(ids, positions, self.cache)

    def first(self) -> Tensor:
        return self._step(rearrange(self.cond, "b -> b 1"))

    def advance(self, tokens: Tensor) -> Tensor:
        return self._step(rearrange(tokens, "b -> b 1"))


class RNNStepper(Stepper):
    """The recurrent prior carrying its state."""

    def __init__(self, prior: RNNPrior, label: Tensor | None, rows: int):
        self.prior, self.state = prior, None
        self.classes = prior.class_index(label, rows)

    def _step(self, ids: Tensor) -> Tensor:
        logits, self.state = self.prior.run(ids, self.state)
        return logits[:, -1].float().log_softmax(dim=-1)

    def first(self) -> Tensor:
        return self._step(self.prior.start_tokens(self.classes))

    def advance(self, tokens: Tensor) -> Tensor:
        return self._step(rearrange(tokens, "b -> b 1"))


class RecomputingStepper(Stepper):
    """Any other autoregressive prior (FVSBN, NADE, MADE, histogram): its whole forward at every position."""

    def __init__(self, prior: AutoregressiveDensityModel, label: Tensor | None, rows: int):
        self.prior, self.position = prior, 0
        self.classes = prior.class_index(label, rows)
        self.tokens = torch.zeros((rows, prior.config.seq_len), dtype=torch.long, device=prior.device)

    def _log_probs(self) -> Tensor:
        logits = self.prior.next_token_logits(self.tokens, self.position, self.classes)
        return logits.float().log_softmax(dim=-1)

    def first(self) -> Tensor:
        return self._log_probs()

    def advance(self, tokens: Tensor) -> Tensor:
        self.tokens[:, self.position] = tokens
        self.position += 1
        return self._log_probs()


def can_entropy_code(prior) -> bool:
    """Whether the prior gives exact next-token probabilities step by step (not the VAE or the GAN)."""
    return isinstance(prior, (TransformerPrior, RNNPrior, AutoregressiveDensityModel))


def make_stepper(prior, label: Tensor | None, rows: int) -> Stepper:
    """The stepper of a prior kind; priors without exact next-token probabilities (VAE, GAN) cannot code."""
    if isinstance(prior, TransformerPrior):
        return TransformerStepper(prior, label, rows)
    if isinstance(prior, RNNPrior):
        return RNNStepper(prior, label, rows)
    if isinstance(prior, AutoregressiveDensityModel):
        return RecomputingStepper(prior, label, rows)
    raise ValueError(f"a {type(prior).__name__} has no exact next-token probabilities to entropy-code with")


def _check_batch(prior, sequences: Tensor, mask: Tensor) -> None:
    expected = (sequences.shape[0], prior.config.seq_len)
    if sequences.dim() != 2 or tuple(sequences.shape) != expected or tuple(mask.shape) != expected:
        raise ValueError(f"need (b, {expected[1]}) sequences and mask for this prior, got "
                         f"{tuple(sequences.shape)} and {tuple(mask.shape)}")


def _intervals(cdf: Tensor, symbols: Tensor) -> tuple[list[int], list[int], list[int]]:
    """Each row's symbol share `[low, high)` of its table's total, as Python ints for the coder."""
    lows = cdf.gather(1, rearrange(symbols, "r -> r 1")).squeeze(1)
    highs = cdf.gather(1, rearrange(symbols + 1, "r -> r 1")).squeeze(1)
    return lows.tolist(), highs.tolist(), cdf[:, -1].tolist()


@torch.no_grad()
def encode_batch(prior, sequences: Tensor, mask: Tensor, label: Tensor | None = None) -> list[bytes]:
    """`(b L)` token sequences and `(b L)` bool mask -> one byte string per row (its masked-in tokens)."""
    _check_batch(prior, sequences, mask)
    was_training = prior.training
    prior.eval()
    try:
        device = prior_device(prior)
        sequences, mask = sequences.to(device), mask.to(device).bool()
        stepper = make_stepper(prior, label, sequences.shape[0])
        encoders = [ArithmeticEncoder() for _ in range(sequences.shape[0])]
        log_probs = stepper.first()
        for position in range(sequences.shape[1]):
            coded = mask[:, position]
            if bool(coded.any()):
                cdf = quantized_cdf(log_probs[coded])
                symbols = sequences[coded, position]
                lows, highs, totals = _intervals(cdf, symbols)
                for row, low, high, total in zip(coded.nonzero().squeeze(1).tolist(), lows, highs, totals):
                    encoders[row].encode(low, high, total)
            if position + 1 < sequences.shape[1]:
                log_probs = stepper.advance(torch.where(coded, sequences[:, position], 0))
        return [encoder.finish() for encoder in encoders]
    finally:
        prior.train(was_training)


@torch.no_grad()
def decode_batch(prior, streams: list[bytes], mask: Tensor, label: Tensor | None = None) -> Tensor:
    """The inverse of `encode_batch`: byte strings and the same `(b L)` mask -> `(b L)` int64 tokens,
    0 where the mask is False."""
    device = prior_device(prior)
    mask = mask.to(device).bool()
    if mask.dim() != 2 or mask.shape[0] != len(streams) or mask.shape[1] != prior.config.seq_len:
        raise ValueError(f"need a ({len(streams)}, {prior.config.seq_len}) mask, got {tuple(mask.shape)}")
    was_training = prior.training
    prior.eval()
    try:
        stepper = make_stepper(prior, label, len(streams))
        decoders = [ArithmeticDecoder(stream) for stream in streams]
        tokens = torch.zeros(mask.shape, dtype=torch.long, device=device)
        log_probs = stepper.first()
        for position in range(mask.shape[1]):
            coded = mask[:, position]
            if bool(coded.any()):
                rows = coded.nonzero().squeeze(1).tolist()
                cdf = quantized_cdf(log_probs[coded])
                totals = cdf[:, -1].tolist()
                targets = torch.tensor([decoders[row].target(total) for row, total in zip(rows, totals)],
                                       dtype=torch.long, device=cdf.device)
                # The symbol whose share [cdf[s], cdf[s+1]) holds the target.
                symbols = torch.searchsorted(cdf, rearrange(targets, "r -> r 1"), right=True).squeeze(1) - 1
                lows, highs, _ = _intervals(cdf, symbols)
                for row, low, high, total in zip(rows, lows, highs, totals):
                    decoders[row].consume(low, high, total)
                tokens[coded, position] = symbols
            if position + 1 < mask.shape[1]:
                log_probs = stepper.advance(tokens[:, position])
        return tokens
    finally:
        prior.train(was_training)
