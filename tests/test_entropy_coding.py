"""Entropy coding with a prior: the arithmetic coder is lossless and spends about the ideal number of
bits, every autoregressive prior kind codes and decodes masked batches exactly, and the token file
refuses what it cannot decode (another prior's file, a truncated or corrupted one)."""

import math

import pytest
import torch

from pipelines.compression import CompressedFileError, CompressedTokens, compress, decompress
from priors import PRIORS
from priors.arithmetic_coding import ArithmeticDecoder, ArithmeticEncoder, quantized_cdf
from priors.entropy_coding import decode_batch, encode_batch

V, L, C = 12, 20, 3
SIZES = {"transformer": dict(hidden_size=32, num_layers=2, num_heads=2), "rnn": dict(embedding_dim=16, hidden_size=32),
         "fvsbn": {}, "nade": {}, "made": {}, "histogram": {}}


def coded_length_and_round_trip(log_probs: torch.Tensor, symbols: torch.Tensor) -> tuple[int, list[int]]:
    cdf = quantized_cdf(log_probs)
    encoder = ArithmeticEncoder()
    for row, symbol in zip(cdf.tolist(), symbols.tolist()):
        encoder.encode(row[symbol], row[symbol + 1], row[-1])
    data = encoder.finish()
    decoder, decoded = ArithmeticDecoder(data), []
    for row in cdf.tolist():
        target = decoder.target(row[-1])
        symbol = next(s for s in range(len(row) - 1) if row[s] <= target < row[s + 1])
        decoder.consume(row[symbol], row[symbol + 1], row[-1])
        decoded.append(symbol)
    return 8 * len(data), decoded


@pytest.mark.parametrize("sharpness", [0.1, 3.0, 30.0])
def test_arithmetic_coder_is_lossless_and_near_ideal(sharpness):
    generator = torch.Generator().manual_seed(0)
    log_probs = (sharpness * torch.randn(400, 50, generator=generator)).log_softmax(-1)
    symbols = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
    bits, decoded = coded_length_and_round_trip(log_probs, symbols)
    assert decoded == symbols.tolist()
    ideal = -float(log_probs.gather(1, symbols[:, None]).sum()) / math.log(2.0)
    assert ideal <= bits <= ideal + 1.0 + 8 + 0.001 * len(symbols)  # 2 closing bits, byte padding, table rounding


def test_a_symbol_the_model_ruled_out_still_codes():
    log_probs = torch.full((3, 4), -1e4)
    log_probs[:, 0] = 0.0  # all mass on symbol 0
    symbols = torch.tensor([0, 3, 0])
    bits, decoded = coded_length_and_round_trip(log_probs, symbols)
    assert decoded == [0, 3, 0] and bits <= 8 * math.ceil((24 + 2) / 8)


def test_quantized_cdf_refuses_a_vocabulary_its_table_cannot_hold():
    with pytest.raises(ValueError, match="cannot code a vocabulary"):
        quantized_cdf(torch.zeros(1, 3000).log_softmax(-1), table_bits=12)


def make_prior(kind: str):
    torch.manual_seed(0)
    config_class, model_class = PRIORS[kind]
    return model_class(config_class(vocab_size=V, seq_len=L, num_classes=C, **SIZES[kind]))


def masked_batch():
    tokens = torch.randint(0, V, (5, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, L, dtype=torch.bool)
    mask[1, 9:] = False  # a short clip
    mask[3, ::3] = False  # gaps, as a delayed layout's trailing pads leave
    return tokens, mask, torch.tensor([0, 1, 2, 0, 1])


@pytest.mark.parametrize("kind", sorted(SIZES))
@pytest.mark.parametrize("conditioned", [False, True])
def test_every_autoregressive_prior_codes_masked_batches_exactly(kind, conditioned):
    prior = make_prior(kind)
    tokens, mask, labels = masked_batch()
    label = labels if conditioned else None
    streams = encode_batch(prior, tokens, mask, label)
    assert torch.equal(decode_batch(prior, streams, mask, label), torch.where(mask, tokens, 0))
    ideal = -prior.log_prob(tokens, label, mask).detach() / math.log(2.0)
    bits = torch.tensor([8.0 * len(stream) for stream in streams])
    assert (bits >= ideal - 0.01).all() and (bits <= ideal + 10).all()


def test_padding_is_not_coded():
    prior = make_prior("transformer")
    tokens, mask, _ = masked_batch()
    other = torch.where(mask, tokens, (tokens + 1) % V)  # differs only where the mask is False
    assert encode_batch(prior, tokens, mask) == encode_batch(prior, other, mask)


def test_priors_without_exact_next_token_probabilities_are_refused():
    config_class, model_class = PRIORS["vae"]
    vae = model_class(config_class(vocab_size=V, seq_len=L))
    with pytest.raises(ValueError, match="no exact next-token probabilities"):
        encode_batch(vae, *masked_batch()[:2])


def compressed_file(prior):
    tokens, mask, labels = masked_batch()
    compressed = compress(prior, tokens, mask, {"prior_sha256": "x"}, labels, 80 * mask.sum(1) - 3, batch_size=2)
    return tokens, mask, compressed.to_bytes()


def test_token_file_round_trip_keeps_side_information():
    prior = make_prior("rnn")
    tokens, mask, data = compressed_file(prior)
    compressed = CompressedTokens.from_bytes(data)
    assert [item.label for item in compressed.items] == [0, 1, 2, 0, 1]
    assert [item.num_samples for item in compressed.items] == (80 * mask.sum(1) - 3).tolist()
    assert compressed.header["batch_size"] == 2 and compressed.header["conditioned"]
    assert torch.equal(decompress(prior, compressed, mask), torch.where(mask, tokens, 0))


def test_token_file_errors_name_the_problem():
    prior = make_prior("rnn")
    _, mask, data = compressed_file(prior)
    with pytest.raises(CompressedFileError, match="not a tokgen token file"):
        CompressedTokens.from_bytes(b"RIFF" + data[4:], "clip.wav")
    with pytest.raises(CompressedFileError, match="truncated"):
        CompressedTokens.from_bytes(data[:-3], "cut.tgac")
    with pytest.raises(CompressedFileError, match="trailing"):
        CompressedTokens.from_bytes(data + b"\0", "long.tgac")
    corrupted = bytearray(data)
    corrupted[-2] ^= 0x10  # a bit inside the last item's stream
    with pytest.raises(CompressedFileError, match="item 4 decodes to other tokens"):
        decompress(prior, CompressedTokens.from_bytes(bytes(corrupted)), mask)
    other = make_prior("rnn")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    with pytest.raises(CompressedFileError, match="decodes to other tokens"):
        decompress(other, CompressedTokens.from_bytes(data), mask)


def test_a_file_decodes_under_the_encoders_thread_count():
    """CPU matmuls split their sums by thread, so a transformer's probabilities depend on the thread
    count; the file records it and decoding uses it, whatever the process is set to."""
    torch.manual_seed(0)
    config_class, model_class = PRIORS["transformer"]
    prior = model_class(config_class(vocab_size=256, seq_len=60, hidden_size=64, num_layers=2, num_heads=4,
                                     initializer_range=0.2))
    tokens = torch.randint(0, 256, (8, 60), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        compressed = CompressedTokens.from_bytes(compress(prior, tokens, mask, {}, batch_size=8).to_bytes())
        torch.set_num_threads(2)
        assert torch.equal(decompress(prior, compressed, mask), tokens)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
