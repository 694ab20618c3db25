"""The Bernoulli VQ-VAE decoder and the two-stage bound -log p(x | z) - log p_prior(z) on enumerable cases."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from priors import HistogramConfig, HistogramPrior
from tokenizers_vq import VQVAE, VQVAEConfig, load_tokenizer
from tokenizers_vq.quantizers import VQConfig


def tiny_bernoulli_vqvae(codebook_size: int = 3, seed: int = 0) -> VQVAE:
    """4x4 binary images -> 2x2 tokens of `codebook_size` codes: every token grid can be enumerated."""
    torch.manual_seed(seed)
    config = VQVAEConfig(in_channels=1, hidden_channels=4, channel_multipliers=(1,), embedding_dim=4,
                         quantizer=VQConfig(codebook_size=codebook_size), reconstruction_loss="bernoulli")
    return VQVAE(config).eval()


def binary_images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (count, 1, 4, 4), generator=generator).float() * 2.0 - 1.0


def hand_logits(model: VQVAE, tokens: torch.Tensor) -> torch.Tensor:
    """Decoder logits computed from the parts: codebook lookup, then the decoder network."""
    codes = model.quantizer.lookup(rearrange(tokens, "b h w -> b (h w)"))
    return model.decoder(rearrange(codes, "b (h w) d -> b d h w", h=tokens.shape[1], w=tokens.shape[2]))


def prior_index(tokens: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(b 2 2) grids -> (b,) their row in `itertools.product(range(codebook_size), repeat=4)`."""
    place = codebook_size ** torch.arange(3, -1, -1)
    return (rearrange(tokens, "b h w -> b (h w)") * place).sum(dim=1)


def test_decoder_log_likelihood_matches_a_hand_computation():
    model = tiny_bernoulli_vqvae()
    x = binary_images(6)
    tokens = model.encode(x)
    with torch.no_grad():
        probability = torch.sigmoid(hand_logits(model, tokens).double())
    ink = (x > 0).double()
    expected = (ink * probability.log() + (1 - ink) * (1 - probability).log()).sum(dim=(1, 2, 3))
    got = model.decoder_log_likelihood(x, tokens)
    assert got.shape == (6,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert (got < 0).all()


def test_decode_is_the_bernoulli_mean_in_range():
    model = tiny_bernoulli_vqvae()
    tokens = model.encode(binary_images(4))
    with torch.no_grad():
        expected = 2.0 * torch.sigmoid(hand_logits(model, tokens)) - 1.0
    images = model.decode(tokens)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-6)
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_training_loss_is_the_mean_binary_cross_entropy():
    model = tiny_bernoulli_vqvae()
    x = binary_images(5, seed=1)
    with torch.no_grad():
        loss, metrics = model.loss({"pixel_values": x}, "main", step=0)
    expected = -model.decoder_log_likelihood(x, model.encode(x)).mean() / 16
    assert metrics["reconstruction_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["reconstruction_nats_per_image"].item() == pytest.approx(expected.item() * 16, rel=1e-5)
    assert loss.item() == pytest.approx((metrics["reconstruction_loss"] + metrics["quantizer_loss"]).item(), rel=1e-6)
    # gradients reach the encoder through the straight-through estimator
    loss, _ = model.loss({"pixel_values": x}, "main", step=0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_two_stage_bound_is_above_the_exact_nll_of_the_induced_model():
    """p(x) = sum_z p_prior(z) p(x | z) over all 3^4 token grids; the bound uses only z = encode(x)."""
    codebook_size = 3
    model = tiny_bernoulli_vqvae(codebook_size)
    train = binary_images(64, seed=2)
    prior = HistogramPrior(HistogramConfig(vocab_size=codebook_size, seq_len=4, mode="joint", smoothing=0.5))
    prior.fit(rearrange(model.encode(train), "b h w -> b (h w)"))

    x = binary_images(8, seed=3)
    z = model.encode(x)
    bound = -model.decoder_log_likelihood(x, z).double() - prior.log_prob(rearrange(z, "b h w -> b (h w)")).double()

    grids = torch.tensor(list(itertools.product(range(codebook_size), repeat=4)))  # (81, 4)
    log_prior = prior.log_prob(grids).double()
    assert torch.logsumexp(log_prior, dim=0).item() == pytest.approx(0.0, abs=1e-5)  # the prior is normalised
    grid_tokens = rearrange(grids, "k (h w) -> k h w", h=2)
    joint = torch.stack([
        model.decoder_log_likelihood(x, grid_tokens[k].expand(len(x), -1, -1)).double() + log_prior[k]
        for k in range(len(grids))
    ])  # (81, 8): log p(x, z) for every z
    exact_nll = -torch.logsumexp(joint, dim=0)
    assert torch.isfinite(bound).all()
    assert (bound >= exact_nll - 1e-6).all()
    assert (bound >= -prior.log_prob(rearrange(z, "b h w -> b (h w)")).double()).all()  # decoder term is >= 0 nats
    # the gap is -log p(z | x) of the chosen grid under the induced model's posterior
    posterior_of_chosen = joint.gather(0, rearrange(prior_index(z, codebook_size), "b -> 1 b"))[0] + exact_nll
    torch.testing.assert_close(bound - exact_nll, -posterior_of_chosen, rtol=1e-6, atol=1e-6)


def test_bernoulli_vqvae_round_trips_through_its_folder(tmp_path):
    model = tiny_bernoulli_vqvae()
    model.save_pretrained(tmp_path / "tokenizer")
    loaded = load_tokenizer(tmp_path / "tokenizer")
    assert isinstance(loaded, VQVAE) and loaded.config.reconstruction_loss == "bernoulli"
    assert loaded.has_decoder_likelihood
    x = binary_images(4, seed=5)
    tokens = model.encode(x)
    assert torch.equal(loaded.encode(x), tokens)
    torch.testing.assert_close(loaded.decoder_log_likelihood(x, tokens), model.decoder_log_likelihood(x, tokens))
    torch.testing.assert_close(loaded.decode(tokens), model.decode(tokens))


def test_decoders_without_a_likelihood_refuse():
    model = VQVAE(VQVAEConfig(in_channels=1, hidden_channels=4, channel_multipliers=(1,), embedding_dim=4,
                              quantizer=VQConfig(codebook_size=3)))
    assert not model.has_decoder_likelihood
    x = binary_images(2)
    with pytest.raises(ValueError, match="bernoulli"):
        model.decoder_log_likelihood(x, model.encode(x))
    with pytest.raises(ValueError, match="reconstruction_loss"):
        VQVAEConfig(reconstruction_loss="poisson")


def test_bernoulli_forward_returns_the_mean_image():
    x = binary_images(3)
    model = tiny_bernoulli_vqvae()
    with torch.no_grad():
        output = model(x)
        logits = hand_logits(model, model.encode(x))
    torch.testing.assert_close(output.reconstruction, torch.tanh(logits / 2), rtol=1e-5, atol=1e-6)
    assert F.mse_loss(output.reconstruction, model.decode(model.encode(x))).item() < 1e-10
