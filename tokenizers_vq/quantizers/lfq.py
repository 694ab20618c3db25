"""Lookup-free quantisation: each of `bits` latent channels is quantised to its sign.

Implements the quantiser of Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is Key to
Visual Generation" (MAGVIT-v2): the codebook is the implicit set {-s, +s}^bits, so quantising
is taking signs and the index of a code is its bit pattern, `sum_i [x_i > 0] 2^i` (a bijection
onto [0, 2^bits)). There is no codebook to learn; instead an entropy penalty keeps each token's
code confident (low per-sample entropy) while spreading the batch over the codebook (high
codebook entropy, weighted by `diversity_gamma`), plus a commitment term. Both entropies use the
soft assignment q(c | x) = softmax_c(-||x - c||^2 / temperature). Because every code has the
same norm, q factorises over bits into Bernoulli(sigmoid(4 s x_i / temperature)), so the
per-sample entropy is exactly a sum of binary entropies; the codebook entropy H(mean_x q) does not
factorise, but its batch average does split over any two halves of the bits: the sum over tokens
of q over all 2^k codes is one (2^(k/2) x tokens) @ (tokens x 2^(k/2)) matrix product of the
halves' probabilities, with no (tokens x 2^k) tensor, accumulated over chunks of tokens so that
memory stays bounded. Up to `exact_entropy_max_bits` (20) the codebook entropy is exact; above,
the bits are split into the fewest near-equal groups of at most that many bits and the exact
entropies of the groups' sub-codebooks are summed, an upper bound like Open-MAGVIT2's
sub-codebooks (Luo et al. 2024). Bounds are weaker than the exact term: on CIFAR-10 at 2^14 codes
(benchmarks/codebook_usage.py, BENCHMARKS.md) the sum of per-bit marginal entropies (Zhao et al.
2024, "Image and Video Tokenization with Binary Spherical Quantization") let the test tokens
collapse onto 19% of the codebook, two 2^7 groups reached 58%, the exact entropy 98%. All of it
runs in float32, whatever autocast says; usage counts are summed over processes in training mode
only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import (
    QuantizerOutput,
    all_reduce_sum,
    check_kind,
    code_counts,
    config_from_dict,
    seeded_linear,
    usage_and_perplexity,
)

MAX_BITS = 24  # usage counts are a (2^bits,) vector: 2^24 int64 is already 128 MiB


@dataclass(frozen=True)
class LFQConfig:
    """Settings of a `LookupFreeQuantizer`; the input dimension comes from the model that owns it."""

    kind: str = "lfq"
    bits: int = 10  # codebook size 2^bits
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    diversity_gamma: float = 1.0  # weight of the codebook entropy inside the entropy loss
    entropy_temperature: float = 0.01
    entropy_subsample: float = 1.0  # fraction of a training batch's tokens in the entropy terms
    exact_entropy_max_bits: int = 20  # entropy over all codes up to here; bit groups above
    code_scale: float = 1.0  # codes are +-code_scale per bit
    seed: int = 0

    def __post_init__(self):
        check_kind(self, "lfq")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must lie in [1, {MAX_BITS}], got {self.bits}")
        if min(self.entropy_weight, self.commitment_weight, self.diversity_gamma) < 0:
            raise ValueError("entropy_weight, commitment_weight and diversity_gamma must be >= 0")
        if self.entropy_temperature <= 0 or self.code_scale <= 0:
            raise ValueError("entropy_temperature and code_scale must be positive")
        if not 0.0 < self.entropy_subsample <= 1.0:
            raise ValueError(f"entropy_subsample must lie in (0, 1], got {self.entropy_subsample}")
        if self.exact_entropy_max_bits < 1:
            raise ValueError(f"exact_entropy_max_bits must be >= 1, got {self.exact_entropy_max_bits}")

    @classmethod
    def from_dict(cls, data: dict) -> "LFQConfig":
        return config_from_dict(cls, data)


# --- bits <-> indices -------------------------------------------------------------------------


def bits_to_indices(bits: Tensor) -> Tensor:
    """(... k) bool/{0,1} -> (...) int64, bit i weighted 2^i."""
    powers = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.int64)
    return (bits.long() * powers).sum(dim=-1)


def indices_to_bits(indices: Tensor, num_bits: int) -> Tensor:
    """(...) int64 -> (... k) int64 in {0, 1}; the inverse of `bits_to_indices`."""
    shifts = torch.arange(num_bits, device=indices.device, dtype=torch.int64)
    return (rearrange(indices.long(), "... -> ... 1") >> shifts) & 1


# --- entropy terms ------------------------------------------------------------------------------


def binary_entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise, stable for large |logits|."""
    probabilities = torch.sigmoid(logits)
    # -p log p - (1 - p) log(1 - p), with log p = -softplus(-l) and log(1 - p) = -softplus(l).
    return probabilities * F.softplus(-logits) + (1 - probabilities) * F.softplus(logits)


def binary_entropy(probabilities: Tensor) -> Tensor:
    p = probabilities.clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def factorised_entropy_terms(x: Tensor, code_scale: float, temperature: float) -> tuple[Tensor, Tensor]:
    """(t k) -> (mean per-sample entropy, codebook-entropy upper bound), using only (t k) tensors.

    The per-sample entropy is exact (q factorises over bits); the codebook entropy is the sum of
    the marginal entropies of the batch-averaged bit probabilities, >= the joint entropy.
    """
    logits = 4.0 * code_scale * x / temperature  # log q(bit = 1) - log q(bit = 0)
    per_sample = binary_entropy_from_logits(logits).sum(dim=-1).mean()
    codebook = binary_entropy(torch.sigmoid(logits).mean(dim=0)).sum()
    return per_sample, codebook


CHUNK_ELEMENTS = 2**24  # (tokens x sub-codes) probabilities formed at once by the exact codebook entropy


def sub_code_probabilities(x: Tensor, code_scale: float, temperature: float) -> Tensor:
    """(t k) -> (t 2^k): q(c | x) = softmax_c(2 x.c / temperature) over the 2^k codes of k bits.

    That is softmax(-||x - c||^2 / temperature) (every code has the same norm); code index
    `sum_i bit_i 2^i`. With k = 0 it is a column of ones.
    """
    num_bits = x.shape[-1]
    codes = code_scale * (2.0 * indices_to_bits(torch.arange(2**num_bits, device=x.device), num_bits) - 1.0)
    return (2.0 * x @ codes.to(x.dtype).t() / temperature).softmax(dim=-1)


def code_probability_sums(x: Tensor, code_scale: float, temperature: float) -> Tensor:
    """(t k) -> (2^k,) sum over tokens of q(c | x), as one (2^h x t) @ (t x 2^l) product.

    q factorises over bits, so q(c) = q_low(c mod 2^l) q_high(c // 2^l) for any split of the bits
    into l low and h = k - l high ones: the sum over tokens of q over all 2^k codes is the product
    of the two halves' probability matrices, t 2^k multiply-adds in one matrix product instead of
    t 2^k k for the logits plus t 2^k exponentials, and no (t x 2^k) tensor.
    """
    low_bits = (x.shape[-1] + 1) // 2
    low = sub_code_probabilities(x[:, :low_bits], code_scale, temperature)
    high = sub_code_probabilities(x[:, low_bits:], code_scale, temperature)
    return (high.t() @ low).flatten()  # row-major (high, low): index low + 2^l high


def _token_chunks(x: Tensor) -> tuple[Tensor, ...]:
    num_bits = x.shape[-1]
    half_codes = 2 ** ((num_bits + 1) // 2) + 2 ** (num_bits // 2)
    return x.split(max(1, CHUNK_ELEMENTS // half_codes))


class AverageCodeProbabilities(torch.autograd.Function):
    """(t k) x -> (2^k,) mean over tokens of q(c | x), in bounded memory forward and backward.

    Tokens go through `code_probability_sums` in chunks of at most `CHUNK_ELEMENTS` sub-code
    probabilities; the backward recomputes each chunk under autograd, so what is kept is the
    (t k) input, not the (t x 2^(k/2)) probabilities autograd would store.
    """

    @staticmethod
    def forward(ctx, x: Tensor, code_scale: float, temperature: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.code_scale, ctx.temperature = code_scale, temperature
        total = x.new_zeros(2 ** x.shape[-1])
        for chunk in _token_chunks(x):
            total += code_probability_sums(chunk, code_scale, temperature)
        return total / x.shape[0]

    @staticmethod
    def backward(ctx, grad_average: Tensor):
        (x,) = ctx.saved_tensors
        grads = []
        for chunk in _token_chunks(x):
            with torch.enable_grad():
                leaf = chunk.detach().requires_grad_()
                sums = code_probability_sums(leaf, ctx.code_scale, ctx.temperature)
                grads.append(torch.autograd.grad(sums, leaf, grad_average / x.shape[0])[0])
        return torch.cat(grads), None, None


def exact_entropy_terms(x: Tensor, code_scale: float, temperature: float) -> tuple[Tensor, Tensor]:
    """(t k) -> (mean per-sample entropy, codebook entropy), the latter over all 2^k codes.

    The per-sample entropy is the factorised one, which is exact; only the batch average of q
    needs every code (`AverageCodeProbabilities`).
    """
    per_sample, _ = factorised_entropy_terms(x, code_scale, temperature)
    average = AverageCodeProbabilities.apply(x, code_scale, temperature)
    codebook = -(average * average.clamp_min(1e-30).log()).sum()
    return per_sample, codebook


def bit_groups(num_bits: int, max_group_bits: int) -> list[int]:
    """Sizes of the fewest near-equal groups of at most `max_group_bits` bits covering `num_bits`."""
    groups = -(-num_bits // max_group_bits)
    return [num_bits // groups + (1 if index < num_bits % groups else 0) for index in range(groups)]


def grouped_entropy_terms(x: Tensor, code_scale: float, temperature: float,
                          max_group_bits: int) -> tuple[Tensor, Tensor]:
    """(t k) -> (mean per-sample entropy, sum of the exact codebook entropies of bit groups).

    The sum over groups bounds the joint codebook entropy from above (subadditivity) and equals it
    with a single group; the largest tensor is (t 2^max_group_bits).
    """
    per_sample, _ = factorised_entropy_terms(x, code_scale, temperature)
    codebook = sum(exact_entropy_terms(group, code_scale, temperature)[1]
                   for group in x.split(bit_groups(x.shape[-1], max_group_bits), dim=-1))
    return per_sample, codebook


# --- the quantizer ------------------------------------------------------------------------------


class LookupFreeQuantizer(nn.Module):
    """(b n d) -> QuantizerOutput with (b n) indices in [0, 2^bits).

    When the input dimension `d` differs from `bits`, linear projections d -> bits and bits -> d
    surround the sign quantiser (and requantising `lookup(i)` need not return `i`); with d = bits
    there are no parameters and `to_indices(lookup(i)) == i`. State: `training_steps` (seeds the
    entropy subsampling) and the projections if any. `dead_codes` counts the codes unused in
    this batch (summed over processes in training): there are no per-code statistics to keep.
    """

    def __init__(self, config: LFQConfig, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        self.bits = config.bits
        self.codebook_size = 2**config.bits
        self.num_codebooks = 1
        self.generator = torch.Generator().manual_seed(config.seed)
        if dim != config.bits:
            self.project_in = seeded_linear(dim, config.bits, self.generator)
            self.project_out = seeded_linear(config.bits, dim, self.generator)
        else:
            self.project_in = self.project_out = None
        self.register_buffer("training_steps", torch.tensor(0, dtype=torch.int64))

    @property
    def uses_exact_entropy(self) -> bool:
        return self.bits <= self.config.exact_entropy_max_bits

    def _project(self, layer: nn.Linear | None, x: Tensor) -> Tensor:
        return x if layer is None else F.linear(x, layer.weight.float(), layer.bias.float())

    def _bits_to_codes(self, bits: Tensor) -> Tensor:
        return self.config.code_scale * (2.0 * bits.float() - 1.0)

    # --- inference ------------------------------------------------------------------------------

    def lookup(self, indices: Tensor) -> Tensor:
        """(b n) int64 -> (b n d) float32 codes."""
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, "
                             f"{int(indices.max())}]")
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self._project(self.project_out, self._bits_to_codes(indices_to_bits(indices, self.bits)))

    @torch.no_grad()
    def to_indices(self, z: Tensor) -> Tensor:
        """(b n d) -> (b n) indices, with no state change and no collectives."""
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return bits_to_indices(self._project(self.project_in, z.float()) > 0)

    # --- training -------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._project(self.project_in, z.float())  # (b n k)
            positive = x > 0
            codes = self._bits_to_codes(positive)
            indices = bits_to_indices(positive)
            per_sample, codebook = self._entropy_terms(rearrange(x, "b n k -> (b n) k"))
            entropy_loss = per_sample - self.config.diversity_gamma * codebook
            commitment = F.mse_loss(x, codes)
            aux_loss = self.config.entropy_weight * entropy_loss + self.config.commitment_weight * commitment
            counts = code_counts(indices, self.codebook_size)
            if self.training:
                all_reduce_sum(counts)
                self.training_steps.add_(1)
            usage, perplexity = usage_and_perplexity(counts)
            if self.project_in is None:
                # No projection: d quantized / d z is exactly the identity.
                quantized = z + (codes.to(z.dtype) - z).detach()
            else:
                quantized = self._project(self.project_out, x + (codes - x).detach()).to(z.dtype)
        metrics = {
            "usage": usage,
            "perplexity": perplexity,
            "dead_codes": (counts == 0).sum().float(),
            "per_sample_entropy": per_sample.detach(),
            "codebook_entropy": codebook.detach(),
        }
        return QuantizerOutput(quantized, indices, aux_loss, metrics)

    def _entropy_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Entropy terms on (t k) projected inputs, on a seeded random subset of them in training."""
        if self.training and self.config.entropy_subsample < 1.0:
            keep = max(1, round(self.config.entropy_subsample * x.shape[0]))
            self.generator.manual_seed(self.config.seed * 1_000_003 + int(self.training_steps))
            x = x[torch.randperm(x.shape[0], generator=self.generator)[:keep].to(x.device)]
        if self.uses_exact_entropy:
            return exact_entropy_terms(x, self.config.code_scale, self.config.entropy_temperature)
        return grouped_entropy_terms(x, self.config.code_scale, self.config.entropy_temperature,
                                     self.config.exact_entropy_max_bits)

    def _check_input(self, z: Tensor) -> None:
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"expected (b n d) input with d={self.dim}, got shape {tuple(z.shape)}")
