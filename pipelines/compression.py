"""Entropy-coded token files: a run's prior turns a token split into bytes, and back, losslessly.

`priors.entropy_coding` writes one arithmetic-coded stream per item; this module frames the streams
into one file and measures what they cost. What a file holds, in order:

- `MAGIC`, a 4-byte big-endian header length, and a deflated (zlib) JSON header: the sha256 of the prior's weights
  and of the tokenizer's (a file is decoded only by the prior that wrote it), the token layout and
  sizes, the batch size (decoding redoes the encoder's batches: a batch of one runs other kernels
  than a batch of many), whether streams were coded under the class label, and the device, dtype and
  CPU thread count that computed the probabilities (decoding uses as many threads);
- per item: a varint for the real samples of an audio clip (they give its real frames, so a short
  clip's padding is neither coded nor stored, and trim the decoded clip), the label when coded under it, the stream's length, a CRC-32 of the
  item's tokens (decoding under other arithmetic, another device say, is caught, not returned), and
  the stream.

The bit rate a codec user pays is the streams plus that per-item framing; `CompressionReport` keeps
the two apart, and the header (a few hundred bytes per file) apart again.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines.stages import RunError, check_prior_matches_tokens
from pipelines.tokenset import Manifest, frames_of, load_tokenset, sha256_file
from priors import load_prior
from priors.entropy_coding import can_entropy_code, decode_batch, encode_batch, prior_device

logger = logging.getLogger(__name__)

MAGIC = b"TOKGEN-AC1\n"
FORMAT_VERSION = 2  # 1 stored the header as plain JSON; 2 deflates it (a short file's largest part)


class CompressedFileError(ValueError):
    """A token file that cannot be decoded here: not ours, truncated, or for another prior."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, offset: int, path) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise CompressedFileError(f"{path}: truncated (a length field runs past the end of the file)")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not byte & 0x80:
            return value, offset


def tokens_checksum(tokens: torch.Tensor, mask: torch.Tensor) -> int:
    """CRC-32 of one item's coded tokens (those where `mask` is True), as little-endian int64."""
    return zlib.crc32(tokens[mask.bool()].cpu().numpy().astype("<i8").tobytes())


@dataclass
class Item:
    """One coded sequence: its stream, checksum, and the side information decoding needs."""

    stream: bytes
    checksum: int
    num_samples: int | None = None  # audio: the clip's real length (sets the mask, trims the decoded clip)
    label: int | None = None

    def framing(self) -> bytes:
        fields = [v for v in (self.num_samples, self.label) if v is not None]
        return b"".join(_varint(v) for v in fields) + _varint(len(self.stream)) + struct.pack(">I", self.checksum)


@dataclass
class CompressedTokens:
    header: dict
    items: list[Item]

    def to_bytes(self) -> bytes:
        header = zlib.compress(json.dumps(self.header, sort_keys=True, separators=(",", ":")).encode(), 9)
        body = b"".join(item.framing() + item.stream for item in self.items)
        return MAGIC + struct.pack(">I", len(header)) + header + body

    @classmethod
    def from_bytes(cls, data: bytes, path="<bytes>") -> "CompressedTokens":
        if not data.startswith(MAGIC):
            raise CompressedFileError(f"{path} is not a tokgen token file (it does not start with {MAGIC!r})")
        offset = len(MAGIC) + 4
        if len(data) < offset:
            raise CompressedFileError(f"{path}: truncated header")
        (header_length,) = struct.unpack(">I", data[len(MAGIC) : offset])
        raw = data[offset : offset + header_length]
        try:
            header = json.loads(zlib.decompress(raw))
        except (zlib.error, ValueError) as error:
            if raw.startswith(b"{"):  # format 1 kept it plain
                raise CompressedFileError(f"{path}: an older tokgen's token file (plain header); this tokgen reads "
                                          f"format {FORMAT_VERSION}") from None
            raise CompressedFileError(f"{path}: unreadable header ({error})") from None
        if header.get("format") != FORMAT_VERSION:
            raise CompressedFileError(f"{path}: format {header.get('format')!r}, this tokgen reads {FORMAT_VERSION}")
        missing = sorted({"items", "batch_size", "conditioned", "has_lengths", "threads", "device"} - set(header))
        if missing:
            raise CompressedFileError(f"{path}: the header lacks {missing}")
        offset += header_length
        items = []
        for _ in range(header["items"]):
            fields = {}
            if header["has_lengths"]:
                fields["num_samples"], offset = _read_varint(data, offset, path)
            if header["conditioned"]:
                fields["label"], offset = _read_varint(data, offset, path)
            length, offset = _read_varint(data, offset, path)
            if offset + 4 + length > len(data):
                raise CompressedFileError(f"{path}: truncated (item {len(items)} runs past the end of the file)")
            (checksum,) = struct.unpack(">I", data[offset : offset + 4])
            items.append(Item(data[offset + 4 : offset + 4 + length], checksum, **fields))
            offset += 4 + length
        if offset != len(data):
            raise CompressedFileError(f"{path}: {len(data) - offset} trailing byte(s) after the last item")
        return cls(header, items)


@dataclass(frozen=True)
class CompressionReport:
    """What a split costs: bits of the streams alone, with each item's framing, and of the whole file."""

    items: int
    tokens: int  # coded tokens (padding excluded)
    stream_bits: int
    framed_bits: int
    file_bits: int
    ideal_bits: float  # the prior's NLL of the same tokens, in bits: what an ideal coder would spend
    raw_bits: float  # the codes written plainly, log2(codebook size) bits each
    seconds: float | None = None  # audio: the real length of the items, so the bits become bit rates

    def as_dict(self) -> dict:
        seconds = self.seconds
        record = {"items": self.items, "coded_tokens": self.tokens, "stream_bits": self.stream_bits,
                  "framed_bits": self.framed_bits, "file_bits": self.file_bits, "ideal_bits": self.ideal_bits,
                  "raw_bits": self.raw_bits,
                  "stream_bits_per_token": self.stream_bits / self.tokens,
                  "ideal_bits_per_token": self.ideal_bits / self.tokens,
                  "raw_bits_per_token": self.raw_bits / self.tokens}
        if seconds:
            record.update(seconds=seconds, stream_bits_per_second=self.stream_bits / seconds,
                          framed_bits_per_second=self.framed_bits / seconds,
                          file_bits_per_second=self.file_bits / seconds, raw_bits_per_second=self.raw_bits / seconds)
        return record


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def compress(prior, sequences: torch.Tensor, mask: torch.Tensor, header: dict, labels: torch.Tensor | None = None,
             num_samples: torch.Tensor | None = None, batch_size: int = 64,
             progress: bool = False) -> CompressedTokens:
    """`(n L)` tokens and `(n L)` mask -> a `CompressedTokens`; `header` gets the coding settings added."""
    device = prior_device(prior)
    dtype = next((t.dtype for t in prior.state_dict().values() if t.is_floating_point()), torch.float32)
    header = dict(header, format=FORMAT_VERSION, items=len(sequences), batch_size=batch_size,
                  conditioned=labels is not None, has_lengths=num_samples is not None, threads=torch.get_num_threads(),
                  device=str(device), dtype=str(dtype).removeprefix("torch."), torch=torch.__version__)
    items = []
    for rows in tqdm(list(_batches(len(sequences), batch_size)), desc="entropy coding", disable=not progress):
        label = None if labels is None else labels[rows].to(device)
        streams = encode_batch(prior, sequences[rows], mask[rows], label)
        for offset, stream in enumerate(streams):
            index = rows.start + offset
            items.append(Item(stream, tokens_checksum(sequences[index], mask[index]),
                              None if num_samples is None else int(num_samples[index]),
                              None if labels is None else int(labels[index])))
    return CompressedTokens(header, items)


def decompress(prior, compressed: CompressedTokens, mask: torch.Tensor, progress: bool = False,
               path="<bytes>") -> torch.Tensor:
    """The `(n L)` tokens of `compressed` (0 where `mask` is False), checked against each item's CRC."""
    header, items = compressed.header, compressed.items
    labels = torch.tensor([item.label for item in items]) if header["conditioned"] else None
    if prior_device(prior).type != torch.device(header["device"]).type:
        logger.warning("%s was coded on %s; decoding on %s may compute other probabilities (the CRCs will tell)",
                       path, header["device"], prior_device(prior))
    decoded = []
    threads = torch.get_num_threads()
    torch.set_num_threads(header["threads"])  # CPU matmuls split their sums by thread: as many as the encoder had
    try:
        for rows in tqdm(list(_batches(len(items), header["batch_size"])), desc="entropy decoding",
                         disable=not progress):
            label = None if labels is None else labels[rows]
            decoded.append(decode_batch(prior, [item.stream for item in items[rows]], mask[rows], label).cpu())
    finally:
        torch.set_num_threads(threads)
    tokens = torch.cat(decoded) if decoded else torch.zeros(mask.shape, dtype=torch.long)
    for index, item in enumerate(items):
        if tokens_checksum(tokens[index], mask[index]) != item.checksum:
            raise CompressedFileError(
                f"{path}: item {index} decodes to other tokens than were coded; the probabilities differ from the "
                f"encoder's (coded on {header['device']} in {header['dtype']}, {header['threads']} thread(s), "
                f"torch {header['torch']})")
    return tokens


# --- a run's token splits ------------------------------------------------------------------------


def run_parts(run_dir: Path):
    """The prior and token set of a finished run, refused if they were not made for each other."""
    prior_dir = run_dir / "prior"
    tokenset = load_tokenset(run_dir / "tokens", tokenizer_dir=run_dir / "tokenizer")
    prior = load_prior(prior_dir).eval()
    if not can_entropy_code(prior):
        raise RunError(f"the prior in {prior_dir} is a {type(prior).__name__}, which gives no exact next-token "
                       "probabilities to entropy-code with (the transformer, the RNN and the autoregressive baselines do)")
    check_prior_matches_tokens(prior, prior_dir, tokenset.manifest)
    return prior, tokenset, sha256_file(prior_dir / "model.safetensors")


def _split_mask(tensors: dict) -> torch.Tensor:
    mask = tensors.get("loss_mask")
    return torch.ones_like(tensors["input_ids"], dtype=torch.bool) if mask is None else mask


def compress_split(run_dir: str | Path, split: str = "test", out_path: str | Path | None = None,
                   conditioned: bool = False, batch_size: int = 64, limit: int | None = None,
                   progress: bool = True) -> tuple[Path, CompressionReport]:
    """Entropy-code a run's token split (the first `limit` items) into `out_path`, decode it again to
    check the round trip, and report the bits."""
    run_dir = Path(run_dir)
    prior, tokenset, prior_sha256 = run_parts(run_dir)
    manifest = tokenset.manifest
    tensors = {name: values[:limit] for name, values in tokenset.tensors(split).items()}
    if conditioned and ("label" not in tensors or not prior.config.num_classes):
        raise ValueError(f"conditioned coding needs a class-conditional prior and a labelled split; {run_dir} has "
                         f"{prior.config.num_classes} classes and split {split!r} is "
                         f"{'labelled' if 'label' in tensors else 'unlabelled'}")
    coded = TokensToCode(tensors["input_ids"], _split_mask(tensors), tensors["label"] if conditioned else None,
                         tensors["num_samples"] if manifest.has_lengths else None)
    out_path = Path(out_path or run_dir / "compressed" / f"{split}.tgac")
    _, report = write_checked(prior, prior_sha256, manifest, coded, {"split": split}, out_path, run_dir,
                              batch_size, progress)
    return out_path, report


class TokensToCode(NamedTuple):
    """What a token file codes: `(n L)` sequences and mask, and per item its label and real samples, if any."""

    sequences: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None = None
    num_samples: torch.Tensor | None = None


def write_checked(prior, prior_sha256: str, manifest: Manifest, coded: TokensToCode, header: dict, out_path: Path,
                  run_dir: Path, batch_size: int, progress: bool) -> tuple[CompressedTokens, CompressionReport]:
    """Code `coded` into `out_path` (its header: the run's identity, plus `header`), decode the bytes as
    written with the same prior, refuse any difference, and report the bits."""
    header = {"prior_sha256": prior_sha256, "tokenizer_sha256": manifest.tokenizer_sha256, "order": manifest.order,
              "sequence_length": manifest.sequence_length, "vocab_size": manifest.vocab_size, **header}
    compressed = compress(prior, coded.sequences, coded.mask, header, coded.labels, coded.num_samples, batch_size,
                          progress)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = compressed.to_bytes()
    out_path.write_bytes(data)
    decoded = _decode(CompressedTokens.from_bytes(data, out_path), prior, manifest, prior_sha256, out_path,
                      run_dir, progress)
    if not torch.equal(decoded, torch.where(coded.mask, coded.sequences, 0)):
        raise CompressedFileError(f"{out_path}: the round trip changed tokens")  # the CRCs should have said so
    return compressed, _report(prior, manifest, coded, compressed, len(data), batch_size)


def _report(prior, manifest: Manifest, coded: TokensToCode, compressed: CompressedTokens, file_bytes: int,
            batch_size: int) -> CompressionReport:
    sequences, mask, labels = coded.sequences, coded.mask, coded.labels
    with torch.no_grad():
        log_prob = sum(float(prior.log_prob(sequences[rows], None if labels is None else labels[rows],
                                            mask[rows]).sum()) for rows in _batches(len(sequences), batch_size))
    has_lengths = coded.num_samples is not None
    real_codes = (int(frames_of(coded.num_samples, manifest.hop_length).sum()) * manifest.num_codebooks
                  if has_lengths else int(mask.sum()))  # a delayed layout's pads are coded but are no codes
    return CompressionReport(
        items=len(sequences), tokens=int(mask.sum()),
        stream_bits=8 * sum(len(item.stream) for item in compressed.items),
        framed_bits=8 * sum(len(item.framing()) + len(item.stream) for item in compressed.items),
        file_bits=8 * file_bytes, ideal_bits=-log_prob / np.log(2.0),
        raw_bits=real_codes * float(np.log2(manifest.codebook_size)),
        seconds=float(coded.num_samples.sum()) / manifest.sample_rate if has_lengths else None)


def _decode(compressed: CompressedTokens, prior, manifest: Manifest, prior_sha256: str, path, run_dir: Path,
            progress: bool) -> torch.Tensor:
    """The `(n L)` tokens of a parsed file, refused unless `prior` (of weights `prior_sha256`) wrote it."""
    if compressed.header["prior_sha256"] != prior_sha256:
        raise CompressedFileError(f"{path} was coded with the prior of sha256 {compressed.header['prior_sha256']}, "
                                  f"but {run_dir / 'prior'} has {prior_sha256}; only the encoder's prior can decode it")
    if compressed.header["has_lengths"]:
        num_samples = torch.tensor([item.num_samples for item in compressed.items], dtype=torch.long)
        mask = manifest.valid_token_mask(frames_of(num_samples, manifest.hop_length))
    else:
        mask = torch.ones((len(compressed.items), manifest.sequence_length), dtype=torch.bool)
    return decompress(prior, compressed, mask, progress, path)


class DecodedFile(NamedTuple):
    tokens: torch.Tensor  # (n L), 0 at padding
    compressed: CompressedTokens  # the parsed file: per item its samples and label, if it carries them
    manifest: Manifest  # of the run's token set


def decompress_file(path: str | Path, run_dir: str | Path, progress: bool = False) -> DecodedFile:
    """The tokens a file holds, decoded with the run's prior (refused if it is not the encoder's)."""
    path, run_dir = Path(path), Path(run_dir)
    compressed = CompressedTokens.from_bytes(path.read_bytes(), path)
    prior, tokenset, prior_sha256 = run_parts(run_dir)
    tokens = _decode(compressed, prior, tokenset.manifest, prior_sha256, path, run_dir, progress)
    return DecodedFile(tokens, compressed, tokenset.manifest)
