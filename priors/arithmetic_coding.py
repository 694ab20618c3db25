"""Binary arithmetic coding of symbols under integer frequency tables: the lossless back end that
turns a prior's next-token probabilities into a bit stream whose length is the sequence's NLL in
bits plus about two bits.

The coder keeps `low`/`high` as `PRECISION`-bit integers and renormalises bit by bit, with the
"pending bits" rule for the middle straddle (Witten, Neal & Cleary 1987, "Arithmetic Coding for
Data Compression", CACM 30(6)). Python integers never overflow, so the precision is set by what
the tables need: every symbol's interval stays non-empty as long as the table total is at most a
quarter of the coding range.

`quantized_cdf` maps float log-probabilities to such tables. The map is a pure function of its
input, so an encoder and a decoder that compute bit-identical log-probabilities build identical
tables; a single differing bit in a probability may change a table and derail decoding from that
point on, which is why the callers compute probabilities the same way on both sides.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PRECISION = 48  # bits of low/high; tables may total up to 2^(PRECISION - 2)
TABLE_BITS = 24  # total of each frequency table: 2^24, so a symbol's probability is kept to ~6e-8
_FULL = (1 << PRECISION) - 1
_HALF = 1 << (PRECISION - 1)
_QUARTER = 1 << (PRECISION - 2)


def quantized_cdf(log_probs: Tensor, table_bits: int = TABLE_BITS) -> Tensor:
    """`(b V)` log-probabilities -> `(b V+1)` int64 cumulative frequencies, starting at 0.

    Every symbol gets at least frequency 1 (a token the model thought impossible stays codable, at
    a cost of about `table_bits` bits) and the rest is shared in proportion to its probability.
    """
    vocab_size = log_probs.shape[-1]
    spare = (1 << table_bits) - vocab_size
    if spare < vocab_size:
        raise ValueError(f"a {table_bits}-bit frequency table cannot code a vocabulary of {vocab_size}")
    frequencies = torch.floor(log_probs.double().exp() * spare).long().clamp_(0, spare) + 1
    return torch.nn.functional.pad(frequencies.cumsum(dim=-1), (1, 0))


class ArithmeticEncoder:
    """Encode symbols, each under its own cumulative table, into bytes (`finish`)."""

    def __init__(self):
        self.low, self.high, self.pending = 0, _FULL, 0
        self.bits: list[int] = []

    def _emit(self, bit: int) -> None:
        self.bits.append(bit)
        self.bits.extend([1 - bit] * self.pending)
        self.pending = 0

    def encode(self, cumulative_low: int, cumulative_high: int, total: int) -> None:
        """Narrow the interval to the symbol's share `[cumulative_low, cumulative_high)` of `total`."""
        if not 0 <= cumulative_low < cumulative_high <= total <= _QUARTER:
            raise ValueError(f"bad interval [{cumulative_low}, {cumulative_high}) of {total}")
        width = self.high - self.low + 1
        self.high = self.low + width * cumulative_high // total - 1
        self.low = self.low + width * cumulative_low // total
        while True:
            if self.high < _HALF:
                self._emit(0)
            elif self.low >= _HALF:
                self._emit(1)
                self.low -= _HALF
                self.high -= _HALF
            elif self.low >= _QUARTER and self.high < _HALF + _QUARTER:
                self.pending += 1
                self.low -= _QUARTER
                self.high -= _QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def finish(self) -> bytes:
        """Two more bits pick a point inside the final interval; pad to whole bytes with zeros."""
        self.pending += 1
        self._emit(0 if self.low < _QUARTER else 1)
        return pack_bits(self.bits)


class ArithmeticDecoder:
    """Read back what `ArithmeticEncoder` wrote, given the same tables in the same order."""

    def __init__(self, data: bytes):
        self.data, self.position = data, 0
        self.low, self.high, self.value = 0, _FULL, 0
        for _ in range(PRECISION):
            self.value = 2 * self.value + self._next_bit()

    def _next_bit(self) -> int:
        # Past the end the stream reads as zeros, as the encoder's padding did.
        byte_index, bit_index = divmod(self.position, 8)
        self.position += 1
        if byte_index >= len(self.data):
            return 0
        return (self.data[byte_index] >> (7 - bit_index)) & 1

    def target(self, total: int) -> int:
        """Where the coded value falls in `[0, total)`: the symbol is the one whose share holds it."""
        width = self.high - self.low + 1
        return ((self.value - self.low + 1) * total - 1) // width

    def consume(self, cumulative_low: int, cumulative_high: int, total: int) -> None:
        """Narrow the interval exactly as the encoder did for the symbol just identified."""
        width = self.high - self.low + 1
        self.high = self.low + width * cumulative_high // total - 1
        self.low = self.low + width * cumulative_low // total
        while True:
            if self.high < _HALF:
                pass
            elif self.low >= _HALF:
                self.low -= _HALF
                self.high -= _HALF
                self.value -= _HALF
            elif self.low >= _QUARTER and self.high < _HALF + _QUARTER:
                self.low -= _QUARTER
                self.high -= _QUARTER
                self.value -= _QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._next_bit()


def pack_bits(bits: list[int]) -> bytes:
    """Bits, most significant first, -> bytes; the last byte is padded with zeros."""
    padded = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, padded[i : i + 8])), 2) for i in range(0, len(padded), 8))


def ideal_bits(log_probs_nats: float) -> float:
    """The code length an ideal entropy coder reaches for a sequence of log-probability `log_probs_nats`."""
    return -log_probs_nats / math.log(2.0)
